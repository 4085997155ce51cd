"""The proof on one known distribution: every method distilled from one teacher, exact distances.

    w2svd bench toy --out DIR [--fast] [--set KEY=VALUE ...]

Trains a flow-matching teacher on the default caption-conditioned Gaussian mixture
(``w2svd.toy.problems.default_problem``: 4 captions × 4 motion modes, 4 frames × 8 numbers),
distills it with W2SVD, DMD2 and LCM at 1 and 4 steps under one budget, compares against teacher
Euler sampling at 1, 4 and 28 steps, prints the table and writes ``DIR/results.json`` (rows with
``method``, ``steps``, ``fd``, ``modes_lost``, ``fd_floor``, ``mode_tv``, …), ``DIR/curves.json``
and ``DIR/curves.png``. The family study over many problems is ``w2svd bench toy-family``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml


def parse_sets(settings, pairs: list[str]):
    fields = {f.name for f in dataclasses.fields(settings)}
    updates = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--set {pair!r}: expected key=value with key one of {sorted(fields)}")
        updates[key] = yaml.safe_load(value)
    return dataclasses.replace(settings, **updates)


def main(argv: list[str] | None = None) -> int:
    import torch

    from bench._toy_runner import ToySettings, format_table, run_toy, write_results

    parser = argparse.ArgumentParser(prog="w2svd bench toy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for results.json and curves.json")
    parser.add_argument("--fast", action="store_true", help="a smaller teacher and evaluation set")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a ToySettings field for every method (repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps runs reproducible)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        settings = parse_sets(ToySettings.fast() if args.fast else ToySettings(), args.set)
    except ValueError as err:
        parser.error(str(err))
    result = run_toy(settings)
    write_results(result, args.out)
    plot_curves(result["curves"], args.out / "curves.png")
    print()
    print(format_table(result["rows"]))
    print(f"\nwrote results.json, curves.json and curves.png in {args.out} ({result['seconds']:.0f} s)")
    return 0


def plot_curves(curves: dict, path: Path) -> None:
    """Fréchet distance against updates of the evaluated network, one panel per student step count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({int(name.rsplit("-", 1)[1].removesuffix("step")) for name in curves})
    fig, axes = plt.subplots(1, len(steps), figsize=(6 * len(steps), 4), squeeze=False)
    for ax, n in zip(axes[0], steps):
        for name, curve in curves.items():
            if name.endswith(f"-{n}step"):
                ax.plot([p["gen_updates"] for p in curve], [p["fd"] for p in curve], label=name.rsplit("-", 1)[0])
        ax.set(title=f"{n}-step students", xlabel="updates of the evaluated network (generator / LCM student)",
               ylabel="Fréchet distance to the true distribution", yscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
