"""Seed spread of the toy's key comparison: W2SVD (α_weak 0.25 and 0) vs DMD2 at 1 and 4 steps.

    .venv/bin/python bench/toy_seeds.py --out runs/toy-seeds [--seeds 0 1 2] [--fast]

Each seed draws a new distribution, teacher and training stream; every method shares them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import torch

from w2svd.toybench import Run, ToySettings, run_toy

RUNS = [Run("w2svd", 1), Run("w2svd", 1, "alpha0", {"alpha_weak": 0.0}), Run("dmd2", 1),
        Run("w2svd", 4), Run("w2svd", 4, "alpha0", {"alpha_weak": 0.0}), Run("dmd2", 4)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fast", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for seed in args.seeds:
        settings = dataclasses.replace(ToySettings.fast() if args.fast else ToySettings(), seed=seed)
        result = run_toy(settings, RUNS, euler_steps=(1, 4, 28))
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


if __name__ == "__main__":
    main()
