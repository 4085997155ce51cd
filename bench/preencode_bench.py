"""Pre-encode throughput: the Ray Data pipeline vs a naive single-process loop doing the same work.

    python bench/preencode_bench.py --clips 32 [--config debug] [overrides...]

Both sides run the same functions (``decode_clip`` → ``EncodeClips`` → ``write_shard`` from
``pipelines.preencode``) on the same synthetic clips; the naive loop calls them one clip at a
time in this process, the pipeline streams them through Ray Data. Pipeline time includes
starting the encoder actors (not ``ray.init``), since every real run pays it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pyarrow as pa  # noqa: E402
import ray  # noqa: E402

from pipelines import preencode  # noqa: E402
from w2svd.config import load_config, to_dict  # noqa: E402
from w2svd.data import storage, synth  # noqa: E402
from w2svd.data.clips import decode_clip, list_inputs, precheck  # noqa: E402


def naive_loop(raw: str, out: str, cfg) -> dict:
    options = storage.StorageOptions.from_env()
    start = time.perf_counter()
    inputs = [r for r in list_inputs(raw, cfg, options) if not precheck(r, cfg)]
    cfg_dict = to_dict(cfg)
    t0 = time.perf_counter()
    encoder = preencode.EncodeClips(cfg_dict, options)
    stage = Counter(setup=time.perf_counter() - t0)
    pending = []
    for record in inputs:
        t0 = time.perf_counter()
        row = decode_clip(record, cfg, options)
        stage["decode"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        pending += encoder(pa.Table.from_pylist([row])).to_pylist()
        stage["encode"] += time.perf_counter() - t0
        if len(pending) >= cfg.data.shard_rows:
            t0 = time.perf_counter()
            preencode.write_shard(pa.Table.from_pylist(pending), output_uri=out, options=options)
            stage["write"] += time.perf_counter() - t0
            pending = []
    if pending:
        t0 = time.perf_counter()
        preencode.write_shard(pa.Table.from_pylist(pending), output_uri=out, options=options)
        stage["write"] += time.perf_counter() - t0
    wall = time.perf_counter() - start
    return {"wall_s": wall, "clips": len(inputs), "clips_per_s": len(inputs) / wall,
            "stages_s": {k: round(v, 2) for k, v in stage.items()}}


def pipeline(raw: str, out: str, cfg) -> dict:
    result = preencode.run(raw, out, cfg, log=lambda *_: None)
    s = result["this_run"]
    n = s["encoded"] + s["quarantined"]
    return {"wall_s": s["wall_s"], "clips": n, "clips_per_s": n / s["wall_s"],
            "stages_busy_s": {k: v["busy_s"] for k, v in s["stages"].items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--config", default="debug")
    p.add_argument("--num-cpus", type=float, default=4)
    p.add_argument("--portrait-size", default="144x256")
    p.add_argument("--landscape-size", default="256x144")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    size = lambda text: (tuple(int(v) for v in text.split("x")),)  # noqa: E731

    work = Path(tempfile.mkdtemp(prefix="preencode-bench-"))
    try:
        raw = str(work / "raw")
        t0 = time.perf_counter()
        synth.write_dataset(raw, args.clips, seed=0, portrait_sizes=size(args.portrait_size),
                            landscape_sizes=size(args.landscape_size), lengths=(25, 33, 49), fps_choices=(12.0, 24.0))
        print(f"rendered {args.clips} clips in {time.perf_counter() - t0:.1f}s", flush=True)

        naive = naive_loop(raw, str(work / "naive"), cfg)
        print("naive:", json.dumps(naive), flush=True)
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        piped = pipeline(raw, str(work / "ray"), cfg)
        print("ray data:", json.dumps(piped), flush=True)
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    d = cfg.data
    print("\n| setup | clips | wall (s) | clips/s |\n| --- | --- | --- | --- |")
    print(f"| naive single-process loop | {naive['clips']} | {naive['wall_s']:.1f} | {naive['clips_per_s']:.2f} |")
    print(f"| Ray Data (decode tasks {d.decode_num_cpus} CPU, {d.encoder_pool_size} encoder actor(s), "
          f"batch {d.encode_batch_size}) | {piped['clips']} | {piped['wall_s']:.1f} | {piped['clips_per_s']:.2f} |")
    print(f"\nnaive per-stage seconds: {naive['stages_s']}; pipeline per-stage busy seconds: {piped['stages_busy_s']}")
    print(f"machine: {os.cpu_count()} cores ({cpu}), ray.init(num_cpus={args.num_cpus}), config {cfg.name}, "
          f"clips {args.portrait_size} / {args.landscape_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
