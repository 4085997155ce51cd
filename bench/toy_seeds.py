"""Seed spread of the toy's key comparison: W2SVD (α_weak 0.25 and 0) vs DMD2 at 1 and 4 steps.

    w2svd bench toy-seeds --out runs/toy-seeds [--seeds 0 1 2] [--fast]

Each seed draws a new mixture (the default problem's construction), teacher and training stream;
every method shares them. The study over a family of problems is ``w2svd bench toy-family``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import torch

from bench._toy_runner import Run, ToySettings, run_toy
from w2svd.toy.problems import GaussianMixtureProblem

RUNS = [Run("w2svd", 1), Run("w2svd", 1, "alpha0", {"alpha_weak": 0.0}), Run("dmd2", 1),
        Run("w2svd", 4), Run("w2svd", 4, "alpha0", {"alpha_weak": 0.0}), Run("dmd2", 4)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="w2svd bench toy-seeds")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fast", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for seed in args.seeds:
        settings = dataclasses.replace(ToySettings.fast() if args.fast else ToySettings(), seed=seed)
        problem = GaussianMixtureProblem(name=f"iso-4x4-seed{seed}", seed=seed)
        result = run_toy(settings, RUNS, euler_steps=(1, 4, 28), problem=problem)
        rows += [{**r, "seed": seed} for r in result["rows"]]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seeds.json").write_text(json.dumps(rows, indent=2))
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["method"], r.get("variant", ""), r["steps"]), []).append(r["fd"])
    print("| method | variant | steps | Fréchet mean ± sd over seeds | per seed |")
    print("|---|---|---|---|---|")
    for (method, variant, steps), fds in groups.items():
        sd = statistics.stdev(fds) if len(fds) > 1 else 0.0
        print(f"| {method} | {variant or '—'} | {steps} | {statistics.mean(fds):.2f} ± {sd:.2f} | "
              f"{', '.join(f'{v:.2f}' for v in fds)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
