"""``w2svd bench NAME``: the project's benchmarks.

    w2svd bench toy --out DIR [--fast] [--set key=value ...]
    w2svd bench portrait --out DIR [--fast] [--study table|collapse|all]   (bench/portrait.py)

``toy`` trains a flow-matching teacher on a known Gaussian-mixture "video" distribution,
distills it with W2SVD, DMD2 and LCM at 1 and 4 steps under one budget, compares against
teacher Euler sampling at 1, 4 and 28 steps, prints the table and writes ``DIR/results.json``
(rows with ``method``, ``steps``, ``fd``, ``modes_lost``, …) and ``DIR/curves.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml


def _parse_sets(settings, pairs: list[str]):
    fields = {f.name for f in dataclasses.fields(settings)}
    updates = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--set {pair!r}: expected key=value with key one of {sorted(fields)}")
        updates[key] = yaml.safe_load(value)
    return dataclasses.replace(settings, **updates)


def toy_main(argv: list[str]) -> int:
    import torch

    from w2svd.toybench import ToySettings, format_table, run_toy, write_results

    parser = argparse.ArgumentParser(prog="w2svd bench toy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for results.json and curves.json")
    parser.add_argument("--fast", action="store_true", help="the small version the tests run (~1 min)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a ToySettings field for every method (repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps runs reproducible)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        settings = _parse_sets(ToySettings.fast() if args.fast else ToySettings(), args.set)
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
    """Fréchet distance against generator updates, one panel per student step count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({int(name.rsplit("-", 1)[1].removesuffix("step")) for name in curves})
    fig, axes = plt.subplots(1, len(steps), figsize=(6 * len(steps), 4), squeeze=False)
    for ax, n in zip(axes[0], steps):
        for name, curve in curves.items():
            if name.endswith(f"-{n}step"):
                ax.plot([p["gen_updates"] for p in curve], [p["fd"] for p in curve], label=name.rsplit("-", 1)[0])
        ax.set(title=f"{n}-step students", xlabel="generator updates (LCM: student updates / 5)",
               ylabel="Fréchet distance to the true distribution", yscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def script_main(name: str):
    """``bench/NAME.py``'s ``main(argv)``: benchmarks that live as scripts in the repository's
    ``bench/`` folder (not an installed package), loaded from their file."""
    import importlib.util

    def run(argv: list[str]) -> int:
        path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return int(module.main(argv) or 0)

    return run


BENCHMARKS = {"toy": toy_main, "portrait": script_main("portrait")}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: w2svd bench {{{','.join(BENCHMARKS)}}} ...", file=sys.stderr)
        return 2
    return BENCHMARKS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
