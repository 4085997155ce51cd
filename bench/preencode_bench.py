"""Pre-encode throughput: the Ray Data pipeline against a naive single-process loop, same work.

    python bench/preencode_bench.py --clips 24,240 [--config debug] [overrides...]

Both sides run the same library calls on the same synthetic clips: ``decode_clip`` →
``encode_clips`` → ``write_batch`` (w2svd/data). The naive loop is what a user would write: a
fresh Python process that imports the encoders, loads them and does one clip at a time, torch
with its default threads (every core). The pipeline is ``pipelines.preencode.run`` (decode
tasks, an encoder actor pool, shard writers, streaming concurrently) with the config's data
settings, ``--encoders`` actors of one CPU and one torch thread each (default: one per core),
plus the overrides. For each clip count it reports the fixed start-up (naive: importing and
loading the models; pipeline: until the first shard is written — scheduling, starting the
actors, importing and loading their models, filling the pipeline) and the steady-state rate
after it, the per-stage seconds and the load average, then a scaling estimate from the measured
per-stage costs. ``ray.init`` is not counted (a cluster is already up when a job starts).
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()  # the naive loop's clock starts before its imports

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from w2svd.config import load_config  # noqa: E402
from w2svd.data import storage  # noqa: E402
from w2svd.data.clips import decode_clip, encode_clips, list_inputs, precheck  # noqa: E402
from w2svd.data.manifest import write_batch  # noqa: E402


def naive_loop(raw: str, out: str, cfg, start: float) -> dict:
    """One clip at a time: decode, encode (batch of one), write a shard every ``shard_rows``;
    ``start`` is when the process started, so the set-up counts importing the models too."""
    from w2svd.models.encoders import LatentEncoder

    options = storage.StorageOptions.from_env()
    inputs = [r for r in list_inputs(raw, cfg, options) if not precheck(r, cfg)]
    encoder = LatentEncoder(cfg, options)
    stage = Counter(setup=time.perf_counter() - start)
    pending, first = [], None
    for record in inputs:
        t0 = time.perf_counter()
        row = decode_clip(record, cfg, options)
        stage["decode"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        pending += encode_clips([row], encoder, cfg.data.encode_reference)
        stage["encode"] += time.perf_counter() - t0
        if len(pending) >= cfg.data.shard_rows or record is inputs[-1]:
            t0 = time.perf_counter()
            write_batch(pending, out, options)
            stage["write"] += time.perf_counter() - t0
            pending = []
            first = first or time.perf_counter() - start
    wall = time.perf_counter() - start
    n = len(inputs)
    return {"wall_s": wall, "clips": n, "clips_per_s": n / wall, "startup_s": stage["setup"],
            "steady_clips_per_s": n / (wall - stage["setup"]), "first_output_s": first,
            "stages_s": {k: round(v, 3) for k, v in stage.items()}}


def naive_in_fresh_process(raw: str, out: str, config: str, overrides: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--naive-worker", raw, out, "--config", config, *overrides],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"naive loop failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def pipeline(raw: str, out: str, cfg) -> dict:
    from pipelines import preencode

    s = preencode.run(raw, out, cfg, log=lambda *_: None)["this_run"]
    n = s["encoded"] + s["quarantined"]
    return {"wall_s": s["wall_s"], "clips": n, "clips_per_s": n / s["wall_s"], "startup_s": s["startup_s"],
            "steady_clips_per_s": s["steady_clips_per_s"],
            "stages_busy_s": {k: v["busy_s"] for k, v in s["stages"].items()}}


def scaling(naive: dict, piped: dict, cfg) -> dict:
    """Per-clip costs from the largest run, and the rate of N decode CPUs and M encoder actors:

        rate(N, M) = min(N / t_decode, M / t_encode, W / t_write)

    (``t_*`` seconds of one CPU or actor per clip; decoding is one FFmpeg thread per task, an
    encoder actor encodes one batch at a time, W writer tasks). Stages overlap, so the slowest
    one sets the rate once the pipeline is full; the start-up adds once per run.
    """
    n = piped["clips"]
    t_decode = naive["stages_s"]["decode"] / naive["clips"]
    t_encode = piped["stages_busy_s"]["encode"] / n
    t_write = piped["stages_busy_s"]["write"] / n
    return {"decode_s_per_clip": t_decode, "encode_s_per_clip_per_actor": t_encode, "write_s_per_clip": t_write,
            "decode_cpus_per_encoder_actor": t_decode / t_encode if t_encode else None}


def rate(costs: dict, decode_cpus: float, encoders: int, writers: int = 4) -> float:
    return min(decode_cpus / costs["decode_s_per_clip"], encoders / costs["encode_s_per_clip_per_actor"],
               writers / max(costs["write_s_per_clip"], 1e-9))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="w2svd bench preencode-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", default="24,240", help="comma-separated clip counts, each a fresh run of both")
    p.add_argument("--config", default="debug")
    p.add_argument("--num-cpus", type=float, default=None, help="logical CPUs of the local Ray (default: the "
                                                                "pipeline's own rule, pipelines.startup)")
    p.add_argument("--portrait-size", default="144x256")
    p.add_argument("--landscape-size", default="256x144")
    p.add_argument("--encoders", type=int, default=os.cpu_count() or 1,
                   help="encoder actors for the pipeline, one CPU and one torch thread each (default: one per core)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--naive-worker", nargs=2, metavar=("RAW", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides for the pipeline (and the naive loop)")
    args = p.parse_args(argv)
    if args.naive_worker:
        print(json.dumps(naive_loop(*args.naive_worker, load_config(args.config, args.overrides), PROCESS_START)))
        return 0
    pipeline_overrides = [f"data.encoder_pool_size={args.encoders}", "data.encoder_num_cpus=1", *args.overrides]
    cfg = load_config(args.config, pipeline_overrides)
    size = lambda text: (tuple(int(v) for v in text.split("x")),)  # noqa: E731

    import ray

    from bench._machine import describe as describe_machine
    from pipelines.startup import init_ray
    from w2svd.data import synth

    work = Path(tempfile.mkdtemp(prefix="preencode-bench-"))
    runs = []
    try:
        init_ray(num_cpus=int(args.num_cpus) if args.num_cpus else None)
        ray.data.DataContext.get_current().enable_progress_bars = False
        logical = ray.cluster_resources().get("CPU")
        for clips in map(int, args.clips.split(",")):
            raw = str(work / f"raw-{clips}")
            t0 = time.perf_counter()
            synth.write_dataset(raw, clips, seed=0, portrait_sizes=size(args.portrait_size),
                                landscape_sizes=size(args.landscape_size), lengths=(25, 33, 49),
                                fps_choices=(12.0, 24.0))
            print(f"rendered {clips} clips in {time.perf_counter() - t0:.1f}s", flush=True)
            load = {"before": os.getloadavg()[0]}
            naive = naive_in_fresh_process(raw, str(work / f"naive-{clips}"), args.config, args.overrides)
            load["after_naive"] = os.getloadavg()[0]
            print("naive:", json.dumps(naive), flush=True)
            piped = pipeline(raw, str(work / f"ray-{clips}"), cfg)
            load["after_pipeline"] = os.getloadavg()[0]
            print("ray data:", json.dumps(piped), flush=True)
            runs.append({"clips": clips, "naive": naive, "pipeline": piped, "load_average_1min": load})
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    costs = scaling(runs[-1]["naive"], runs[-1]["pipeline"], cfg)
    report = {"runs": runs, "costs": costs, "logical_cpus": logical, "machine": describe_machine(), "config": cfg.name,
              "overrides": pipeline_overrides, "date": time.strftime("%Y-%m-%d %H:%M"),
              "data": {k: getattr(cfg.data, k) for k in ("decode_batch_size", "decode_num_cpus", "encoder_pool_size",
                                                          "encoder_num_cpus", "encode_batch_size",
                                                          "encode_batch_pixels", "shard_rows")}}
    print(markdown(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


def markdown(report: dict) -> str:
    lines = ["| clips | setup | wall (s) | clips/s overall | start-up (s) | steady clips/s | stage seconds | "
             "load (1 min) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["runs"]:
        for name, key, stages in (("naive loop", "naive", "stages_s"), ("Ray Data", "pipeline", "stages_busy_s")):
            x = r[key]
            # A steady rate needs time after the start-up: below a tenth of the wall it is the
            # tail of clips finished during the start-up, not a rate.
            after = x["wall_s"] - x["startup_s"]
            steady = f"{x['steady_clips_per_s']:.2f}" if x["steady_clips_per_s"] and after > 0.1 * x["wall_s"] else "—"
            stage_text = ", ".join(f"{k} {v:.1f}" for k, v in x[stages].items())
            load = r["load_average_1min"]["after_naive" if key == "naive" else "after_pipeline"]
            lines.append(f"| {r['clips']} | {name} | {x['wall_s']:.1f} | {x['clips_per_s']:.2f} | "
                         f"{x['startup_s']:.1f} | {steady} | {stage_text} | {load:.1f} |")
    c = report["costs"]
    lines += ["", f"per clip: decode {c['decode_s_per_clip'] * 1e3:.0f} ms on one CPU, encode "
                  f"{c['encode_s_per_clip_per_actor'] * 1e3:.0f} ms per encoder actor, write "
                  f"{c['write_s_per_clip'] * 1e3:.1f} ms; rate(N decode CPUs, M encoders) = "
                  "min(N / t_decode, M / t_encode, W / t_write)", "",
              "| decode CPUs | encoder actors | clips/s (estimate) |", "| --- | --- | --- |"]
    for n, m in ((1, 1), (2, 1), (2, 2), (8, 1), (8, 4), (32, 8), (128, 16)):
        lines.append(f"| {n} | {m} | {rate(c, n, m):.1f} |")
    lines.append(f"\nmachine: {report['machine']}; local Ray with {report['logical_cpus']:g} logical CPUs; "
                 f"config {report['config']} {' '.join(report['overrides'])}; data settings {report['data']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
