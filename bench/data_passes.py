"""What a pass over the latent shards costs the training side, read from the shards on every pass
(``parallel.materialize_data=false``) or read once into Ray's object store (``true``).

    w2svd bench data-passes --latents DIR [--passes 4] [--batch-size 4] [--out passes.json]

Both modes go through the training jobs' reader (``training_dataset``, ``iter_latent_batches``),
in one Ray on this machine; ``DIR`` is a world teacher's shards (``w2svd world show --config
portrait --path latents``) or any pre-encoded folder. Each pass's batches are hashed: resume
replays the stream by position, so both modes must give the same batches in the same order
(``same_batches``). Results: ``docs/benchmarks.md``, "Portrait world".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path


def timed_passes(ds, passes: int, batch_size: int) -> tuple[list[float], list[str], int]:
    """Seconds and a digest of the batches of each of ``passes`` passes over ``ds``."""
    from pipelines.reader import iter_latent_batches

    seconds, digests, count = [], [], 0
    for _ in range(passes):
        t0, h, count = time.perf_counter(), hashlib.sha256(), 0
        for batch in iter_latent_batches(ds, batch_size, drop_last=True):
            h.update(batch.latents.numpy().tobytes())
            count += 1
        seconds.append(time.perf_counter() - t0)
        digests.append(h.hexdigest())
    return seconds, digests, count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latents", required=True, help="a folder of latent shards")
    p.add_argument("--passes", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", default=None, help="write the report here as JSON")
    args = p.parse_args(argv)
    if args.passes < 1 or args.batch_size < 1:
        p.error(f"--passes {args.passes} and --batch-size {args.batch_size} must be at least 1")

    import ray

    from pipelines.reader import training_dataset
    from pipelines.startup import init_ray

    started = init_ray()
    rows = {}
    for mode in ("read", "materialized"):
        t0 = time.perf_counter()
        ds = training_dataset(args.latents, None, materialize=mode == "materialized")
        setup = time.perf_counter() - t0
        seconds, digests, count = timed_passes(ds, args.passes, args.batch_size)
        rows[mode] = {"setup_s": round(setup, 3), "pass_s": [round(s, 3) for s in seconds],
                      "batches_per_pass": count, "digests": digests}
        print(f"{mode}: {count} batches per pass; setup {setup:.2f} s; seconds per pass "
              f"{', '.join(f'{s:.2f}' for s in seconds)}", flush=True)
    same = rows["read"]["digests"] == rows["materialized"]["digests"] and len(set(rows["read"]["digests"])) == 1
    report = {"latents": str(args.latents), "passes": args.passes, "batch_size": args.batch_size,
              "cpus": os.cpu_count(), "load_average": os.getloadavg(), "same_batches": same, **rows}
    print(f"same batches in the same order in both modes and every pass: {same}")
    if started:
        ray.shutdown()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0 if same else 1
