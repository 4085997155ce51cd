"""Which training-time signal tracks sample quality? The collapse runs' exports, measured again.

    w2svd bench guard-signals --runs DIR [DIR ...] --out F.json [--rows 64] [--config portrait]

Each DIR is the output of ``w2svd bench portrait --study collapse``: its ``collapse.json`` (every
scored point's domain FVD) and the exports it scored (``DIR/collapse/exports/METHOD-ITERS``).
Every export samples the same ``--rows`` conditions of the world's training shards from the same
noise, and each candidate signal is measured as the drift guard measures ``proj_gap``
(``w2svd.drift``: a sample beside its pooled condition, 16 fixed projections, sliced W1 over the
reference's projected std), on two summaries (the guard's pooled means; ``_detail``: with each
pooled cell's local std, ``summarize_BF(local_std=True)``) and against two references:

    data      the training latents of those conditions: the guard's own signal
    teacher   the teacher's samples for those conditions (its Euler sampler at
              ``method.teacher_steps``, its guidance, its own noise): what distillation matches

The starting point (the teacher's weights under the students' sampler, iteration 0) is measured
too, without an FVD. Written: every point's signals beside its FVD, and the rank correlation
(Spearman) of each signal with the FVD within each run and over all points.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench._machine import start_local

# reference × summary: the pooled means alone (the guard's), or with each cell's local std.
SIGNALS = ("data", "data_detail", "teacher", "teacher_detail")


def projected_gap_to(reference_BCTHW, samples_BCTHW, pooled_BD, local_std: bool = False, seed: int = 0) -> float:
    """``w2svd.drift.projected_gap`` of ``samples`` against ``reference`` (each row beside its
    pooled condition), in the reference's units, on the guard's fixed projection."""
    from w2svd.drift import joint_features, projected_gap, random_projection_FK, summarize_BF

    scale_x = float(summarize_BF(reference_BCTHW, local_std=local_std).std().clamp_min(1e-12))
    scale_c = float(summarize_BF(pooled_BD).pow(2).mean().sqrt().clamp_min(1e-12))
    ref = joint_features(reference_BCTHW, pooled_BD, scale_x, scale_c, local_std)
    ours = joint_features(samples_BCTHW, pooled_BD, scale_x, scale_c, local_std)
    proj_FK = random_projection_FK(ref.shape[1], 16, seed)
    return projected_gap(ours @ proj_FK, ref @ proj_FK)


def spearman(a: list[float], b: list[float]) -> float | None:
    """Rank correlation; None for fewer than three pairs."""
    from scipy.stats import spearmanr

    return None if len(a) < 3 else float(spearmanr(a, b).statistic)


def measure(runs: list[Path], config: str, rows: int, batch: int = 16, log=print) -> dict:
    import torch

    from bench.portrait_teacher import load_world_latents
    from pipelines.world import teacher_latents
    from w2svd.config import load_config
    from w2svd.generate import load_export_bundle, load_teacher_bundle

    t0 = time.time()
    x0, captions = load_world_latents(teacher_latents(config, log))
    picked = list(range(0, len(x0), max(1, len(x0) // rows)))[:rows]
    data, prompts = x0[picked], [captions[i] for i in picked]
    seeds = list(range(len(picked)))  # one fixed noise per row for every model
    teacher = load_teacher_bundle(config, load_config(config).method.teacher_steps, config, device="cpu")
    frames = teacher.default_size()
    pooled = teacher.encoders.encode_text(prompts)[2]

    def sample(bundle, offset: int = 0) -> torch.Tensor:
        return torch.cat([bundle.generate_latents(prompts[lo:lo + batch], [s + offset for s in seeds[lo:lo + batch]],
                                                  *frames) for lo in range(0, len(prompts), batch)])

    def gaps(ours: torch.Tensor, references: dict[str, torch.Tensor]) -> dict[str, float]:
        return {f"{name}{'_detail' if detail else ''}": projected_gap_to(ref, ours, pooled, detail)
                for name, ref in references.items() for detail in (False, True)}

    # The teacher's own noise (offset): against the students' noise it would favour a student
    # that kept the teacher's map from noise to sample over one that found another.
    target = sample(teacher, offset=10_000)
    log(f"[guard-signals] teacher: {len(prompts)} samples ({time.time() - t0:.0f} s)")
    starts: dict[str, dict] = {}  # the start's signals, per student sampler (alike in every run)

    def signals(bundle) -> dict:
        return gaps(sample(bundle), {"data": data, "teacher": target})

    out = {"config": config, "rows": len(prompts), "runs": {}, "teacher_vs_data": gaps(target, {"data": data})}
    for run in runs:
        collapse = json.loads((run / "collapse.json").read_text())
        record = {}
        for method, curve in collapse["curves"].items():
            points = []
            first = run / "collapse" / "exports" / f"{method}-{curve[0]['iterations']:05d}"
            start = load_export_bundle(first, device="cpu")
            if repr(start.settings) not in starts:
                start.backbone = teacher.backbone  # the teacher's weights under the students' sampler
                starts[repr(start.settings)] = signals(start)
            points.append({"iterations": 0, "generator_updates": 0, "fvd_domain": None, **starts[repr(start.settings)]})
            for p in curve:
                bundle = load_export_bundle(run / "collapse" / "exports" / f"{method}-{p['iterations']:05d}", device="cpu")
                points.append({k: p[k] for k in ("iterations", "generator_updates", "fvd_domain", "face_rate")}
                              | signals(bundle))
                log(f"[guard-signals] {run.name} {method} {points[-1]} ({time.time() - t0:.0f} s)")
            scored = [q for q in points if q["fvd_domain"] is not None]
            record[method] = {"points": points, "spearman_with_fvd": {
                s: spearman([q[s] for q in scored], [q["fvd_domain"] for q in scored]) for s in SIGNALS}}
        out["runs"][run.name] = {"lr": collapse.get("lr"), "overrides": collapse["settings"].get("overrides"),
                                 "methods": record}
    every = [q for r in out["runs"].values() for m in r["methods"].values() for q in m["points"]
             if q["fvd_domain"] is not None]
    out["pooled_spearman_with_fvd"] = {s: spearman([q[s] for q in every], [q["fvd_domain"] for q in every])
                                       for s in SIGNALS}
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="w2svd bench guard-signals", description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, type=Path, help="collapse study outputs (DIR/collapse.json)")
    p.add_argument("--config", default="portrait", help="the world's config (its teacher and shards)")
    p.add_argument("--rows", type=int, default=64, help="training conditions every model samples")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "collapse.json").is_file()]
    if missing:
        p.error(f"no collapse.json in {', '.join(missing)}: give `w2svd bench portrait --study collapse` outputs")
    if args.rows < 2:
        p.error("--rows must be at least 2")
    start_local(args.threads)
    result = measure(args.runs, args.config, args.rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"pooled_spearman_with_fvd": result["pooled_spearman_with_fvd"]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
