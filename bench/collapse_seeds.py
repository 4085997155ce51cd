"""Collapse studies of one setting on several seeds, side by side: curves, the guard, what a stop keeps.

    w2svd bench collapse-seeds --runs DIR [DIR ...] --out PREFIX [--label NAME]

Each DIR is the output of ``w2svd bench portrait --study collapse`` (its ``collapse.json``), one
training seed each (``optim.seed=N``) at the same settings. Writes ``PREFIX.json`` (per run and
method: the domain FVD at every point, its best, its end, where the drift guard fired and the
scored point a stop at the firing would have exported, ``bench.portrait.stop_would_keep``; per
method and point: the mean and the spread over the runs; the paired end-of-run difference
DMD2 − W2SVD), ``PREFIX.md`` (the table) and ``PREFIX.png`` (every run's FVD curve, the mean, the
guard's firings).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench.portrait import stop_would_keep


def summarize(results: dict[str, dict]) -> dict:
    """``results``: run name → its ``collapse.json``."""
    runs, by_point = {}, {}
    for name, result in results.items():
        runs[name] = {}
        for method, curve in result["curves"].items():
            guard = result.get("drift_guard", {}).get(method, {})
            kept = stop_would_keep(curve, guard)
            best = min(curve, key=lambda p: p["fvd_domain"])
            runs[name][method] = {
                "generator_updates": [p["generator_updates"] for p in curve],
                "fvd_domain": [p["fvd_domain"] for p in curve],
                "best": {"fvd_domain": best["fvd_domain"], "generator_updates": best["generator_updates"]},
                "end": curve[-1]["fvd_domain"], "fired_at": guard.get("fired_at_generator_update"),
                "stop_would_keep": kept,
                "keep_minus_end": None if kept is None else kept["fvd_domain"] - curve[-1]["fvd_domain"]}
            for p in curve:
                by_point.setdefault(method, {}).setdefault(p["generator_updates"], []).append(p["fvd_domain"])
    mean = {m: {u: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else None, "runs": len(v)}
                for u, v in sorted(points.items())} for m, points in by_point.items()}
    paired = [r["dmd2"]["end"] - r["w2svd"]["end"] for r in runs.values() if {"dmd2", "w2svd"} <= r.keys()]
    changes = [r[m]["keep_minus_end"] for r in runs.values() for m in r if r[m]["keep_minus_end"] is not None]
    return {"runs": runs, "mean": mean,
            "end_dmd2_minus_w2svd": {"values": paired, "mean": float(np.mean(paired)) if paired else None,
                                     "se": float(np.std(paired, ddof=1) / np.sqrt(len(paired))) if len(paired) > 1 else None},
            "fired": sum(r[m]["fired_at"] is not None for r in runs.values() for m in r),
            "run_methods": sum(len(r) for r in runs.values()),
            "keep_minus_end_mean": float(np.mean(changes)) if changes else None}


def markdown(summary: dict) -> str:
    lines = ["| run | method | domain FVD at each point | best (updates) | end | guard fired | a stop keeps (updates) | keep − end |",
             "|---|---|---|---|---|---|---|---|"]
    for name, methods in summary["runs"].items():
        for method, r in methods.items():
            kept = r["stop_would_keep"]
            cells = [name, "DMD2" if method == "dmd2" else "W2SVD" if method == "w2svd" else method,
                     " → ".join(f"{v:.3f}" for v in r["fvd_domain"]),
                     f"{r['best']['fvd_domain']:.3f} ({r['best']['generator_updates']:g})", f"{r['end']:.3f}",
                     "—" if r["fired_at"] is None else f"{r['fired_at']:g}",
                     "—" if kept is None else f"{kept['fvd_domain']:.3f} ({kept['generator_updates']:g})",
                     "—" if r["keep_minus_end"] is None else f"{r['keep_minus_end']:+.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, floor: float | None, path: Path, label: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    colors = {"dmd2": "tab:blue", "w2svd": "tab:orange"}
    for method, points in summary["mean"].items():
        color = colors.get(method)
        for r in summary["runs"].values():
            if method in r:
                ax.plot(r[method]["generator_updates"], r[method]["fvd_domain"], color=color, alpha=0.3, lw=1)
                if r[method]["fired_at"] is not None:  # on the run's curve, where it fired
                    ax.plot([r[method]["fired_at"]], [np.interp(r[method]["fired_at"], r[method]["generator_updates"],
                                                                r[method]["fvd_domain"])],
                            marker="v", ms=8, color=color, alpha=0.7)
        x = list(points)
        ax.plot(x, [points[u]["mean"] for u in x], color=color, lw=2.2, marker="o",
                label=f"{method} (mean of {max(p['runs'] for p in points.values())} seeds)")
    if floor is not None:
        ax.axhline(floor, color="k", ls="--", lw=1, label="real clips")
    ax.set(title=f"{label}: domain FVD per seed (thin), mean (thick); ▼ guard fired", xlabel="generator updates",
           ylabel="domain FVD (lower is better)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="w2svd bench collapse-seeds", description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, type=Path, help="collapse study outputs, one seed each")
    p.add_argument("--out", required=True, type=Path, help="PREFIX of PREFIX.json, PREFIX.md and PREFIX.png")
    p.add_argument("--label", default="collapse study", help="the setting, for the figure's title")
    args = p.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "collapse.json").is_file()]
    if missing:
        p.error(f"no collapse.json in {', '.join(missing)}: give `w2svd bench portrait --study collapse` outputs")
    results = {r.name: json.loads((r / "collapse.json").read_text()) for r in args.runs}
    summary = summarize(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(summary))
    floor = next(iter(results.values())).get("floor", {}).get("fvd_domain")
    plot(summary, floor, args.out.with_suffix(".png"), args.label)
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
