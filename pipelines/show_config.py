"""``w2svd config [NAME] [dotted overrides]``: print the resolved, validated config as YAML."""

from __future__ import annotations

import argparse
import sys

from w2svd.config import available_configs, load_config, to_yaml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="w2svd config", description=__doc__)
    parser.add_argument("name", nargs="?", default="debug", help=f"one of {available_configs()} or a YAML path")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.alpha_weak=0.5")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.name, args.overrides)
    except ValueError as err:
        print(f"w2svd config: {err}", file=sys.stderr)
        return 2
    print(to_yaml(cfg), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
