"""Training step time and memory: W2SVD (full generator), W2SVD shared-base (LoRA generator) and
vanilla DMD2 on one model size, plus 1- vs 2-worker throughput — all in one process, one Ray.

    .venv/bin/python bench/train_bench.py [--size tiny|small] [--steps 10] [--out bench/results/train.json]

Each variant is a real `pipelines.distill` run (Ray Train, DeepSpeed ZeRO-2 on gloo, synthetic
latents) with tracking and sample videos off; the numbers come from its result.json stats:
median step time without the first step, samples/s over all workers, peak RSS of the busiest
worker (the whole process: Python, torch, Ray worker), and bytes of distinct parameter
storages per worker (the memory the method itself decides).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import distill  # noqa: E402
from pipelines.training import train  # noqa: E402
from w2svd.config import load_config  # noqa: E402
from w2svd.data.synthetic_latents import write_synthetic_latents  # noqa: E402

SIZES = {
    "tiny": [],  # the debug config's model
    "small": ["model.arch.num_attention_heads=4", "model.arch.attention_head_dim=32",
              "model.arch.rope_axes_dim=[8,8,16]", "model.arch.num_layers=2", "model.arch.num_single_layers=2",
              "method.lora_rank=8", "method.generator_lora_rank=8"],
}
VARIANTS = [
    ("W2SVD, full generator", ["method.name=w2svd", "method.generator=full"], 2),
    ("W2SVD, shared base (LoRA generator)", ["method.name=w2svd", "method.generator=lora"], 2),
    ("vanilla DMD2", ["method.name=dmd2", "method.generator=full"], 2),
    ("W2SVD, full generator", ["method.name=w2svd", "method.generator=full"], 1),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default="bench/results/train.json")
    args = p.parse_args(argv)

    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    common = [*SIZES[args.size], f"optim.steps={args.steps}", "optim.checkpoint_every=1000",
              "optim.log_every=1000", "tracking.log_samples=false", "tracking.tracking_uri=null",
              "parallel.materialize_data=true", "method.gen_update_every=2"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="w2svd-train-bench-") as tmp:
        data = write_synthetic_latents(f"{tmp}/latents", load_config("debug", common), clips_per_bucket=16)
        for name, overrides, workers in VARIANTS:
            cfg = load_config("debug", [*common, *overrides, f"parallel.num_workers={workers}"])
            t0 = time.perf_counter()
            result = train("distill", distill.train_loop_per_worker, cfg, data, f"{tmp}/run-{len(rows)}")
            stats = result["stats"]
            rows.append({"variant": name, "workers": workers, "steps": result["steps"],
                         "step_time_s": stats["stats/step_time_s"], "samples_per_s": stats["stats/samples_per_s"],
                         "peak_rss_mb_per_worker": stats["stats/peak_memory_mb_per_worker"],
                         "param_mb_per_worker": stats["stats/param_bytes_per_worker"] / 2**20,
                         "wall_s": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), flush=True)
    ray.shutdown()
    report = {"size": args.size, "steps": args.steps, "batch_size_per_worker": load_config("debug").optim.batch_size,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), torch CPU, gloo",
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = ["| variant | workers | step time (s) | samples/s | peak RSS / worker (MB) | parameters / worker (MB) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        lines.append(f"| {r['variant']} | {r['workers']} | {r['step_time_s']:.3f} | {r['samples_per_s']:.1f} | "
                     f"{r['peak_rss_mb_per_worker']:.0f} | {r['param_mb_per_worker']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
