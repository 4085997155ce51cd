"""``w2svd config [NAME] [dotted overrides]``: print the resolved, validated config as YAML."""

from __future__ import annotations

import sys

from pipelines.errors import ArgumentParser, run_main
from w2svd.config import available_configs, load_config, to_yaml


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="w2svd config", description=__doc__)
    parser.add_argument("name", nargs="?", default="debug", help=f"one of {available_configs()} or a YAML path")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.alpha_weak=0.5")

    def body() -> int:
        args = parser.parse_args(argv)
        print(to_yaml(load_config(args.name, args.overrides)), end="")
        return 0

    return run_main("w2svd config", body)


if __name__ == "__main__":
    sys.exit(main())
