"""Serving benchmark: where the time of one video goes, and what batching buys the Serve API.

    nice -n 10 .venv/bin/python bench/serve.py [--config debug] [--size 9 64 48] [--repeats 5]
        [--requests 48 --concurrency 8 --batch 4] [--out bench/results/serve.json] [overrides...]

1. Latency: the 1-step and 4-step generators (exports of one architecture, loaded like Serve
   loads them) against the teacher's 28-step Euler sampler (``load_teacher_bundle``), at the same
   size, one prompt at a time; each split by ``GeneratorBundle.generate(timings=…)`` into text
   encoding, the transformer's sampler steps and VAE decoding (plus mp4 encoding, as Serve does).
   Median of ``--repeats`` after one warm-up.
2. Throughput: the Serve application (``pipelines.serve.application``, the 4-step export, no auth)
   on a local Ray, ``--requests`` synchronous requests with ``--concurrency`` in flight, once with
   ``serve.max_batch_size=--batch`` and once with batching off (``max_batch_size=1``); queues are
   large enough that nothing is refused, so requests/s compares the same work; two rounds of
   each, alternating, and the median.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("W2SVD_SERVE_TOKEN", None)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "a woman talking to the camera, soft light"


def make_exports(cfg, root: Path) -> dict[int, str]:
    from w2svd.export import sampler_settings_for, save_generator_export
    from w2svd.models.hunyuan import build_backbone
    from w2svd.schedule import student_sigmas

    backbone = build_backbone(cfg.model)
    student = sampler_settings_for(cfg)
    out = {}
    for steps in (1, 4):
        settings = dataclasses.replace(student, steps=steps, sigmas=[float(s) for s in student_sigmas(steps, cfg.method.shift)])
        out[steps] = str(save_generator_export(backbone, root / f"student-{steps}", settings, cfg))
    return out


def _one(bundle, size, seed: int) -> dict:
    from w2svd.data.video import encode_video

    timings: dict = {}
    start = time.perf_counter()
    clip = bundle.generate([PROMPT], [seed], *size, timings=timings)[0].numpy()
    t0 = time.perf_counter()
    encode_video(clip, bundle.fps)
    timings["mp4_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - start
    return timings


def latency(cfg_name: str, overrides: list[str], size, repeats: int, exports: dict[int, str]) -> dict:
    """Round-robin over the samplers (one warm-up each), so load from other processes on the
    machine falls on all of them alike; medians per phase."""
    import torch

    from w2svd.generate import load_export_bundle, load_teacher_bundle

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    bundles = {f"w2svd-{steps}step": (steps, load_export_bundle(export)) for steps, export in exports.items()}
    bundles["teacher-euler-28"] = (28, load_teacher_bundle(cfg_name, 28, overrides=overrides))
    runs: dict[str, list[dict]] = {name: [] for name in bundles}
    for i in range(repeats + 1):
        for name, (_, bundle) in bundles.items():
            timings = _one(bundle, size, i)
            if i:  # the first round warms caches and allocators
                runs[name].append(timings)
    return {name: {"steps": bundles[name][0], **{k: statistics.median(r[k] for r in rs) for k in rs[0]}}
            for name, rs in runs.items()}


def throughput(export: str, cfg_name: str, overrides: list[str], size, n: int, concurrency: int, batch: int) -> dict:
    import ray
    import requests
    from ray import serve

    from pipelines.serve import application
    from w2svd.config import load_config

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8799})
    body = {"prompt": PROMPT, "frames": size[0], "height": size[1], "width": size[2]}
    url = "http://127.0.0.1:8799/v1/videos/sync"
    out = {}
    try:
        # Two rounds, alternating, so a change of load on the machine falls on both settings.
        for label, max_batch in [(f"{name} #{r}", b) for r in (1, 2) for name, b in (("batching on", batch),
                                                                                   ("batching off", 1))]:
            cfg = load_config(cfg_name, [*overrides, f"serve.max_batch_size={max_batch}",
                                         f"serve.max_ongoing_requests={max(batch, concurrency)}",
                                         f"serve.max_queued_requests={n}", "serve.batch_wait_timeout_s=0.05",
                                         "serve.alias_poll_s=0", "serve.num_cpus=1"])
            serve.run(application(export, cfg), name="bench", route_prefix="/")
            for i in range(2):  # warm-up
                requests.post(url, json={**body, "seed": i}, timeout=600).raise_for_status()

            def one(i: int):
                t0 = time.perf_counter()
                r = requests.post(url, json={**body, "seed": 100 + i}, timeout=600)
                return r.status_code, time.perf_counter() - t0, r.headers.get("x-video-id")

            start = time.perf_counter()
            with cf.ThreadPoolExecutor(concurrency) as pool:
                results = list(pool.map(one, range(n)))
            wall = time.perf_counter() - start
            ok = [r for r in results if r[0] == 200]
            sizes = [requests.get(f"http://127.0.0.1:8799/v1/videos/{vid}", timeout=60).json()["batch_size"]
                     for _, _, vid in ok]
            out[label] = {"max_batch_size": max_batch, "requests": n, "ok": len(ok), "wall_s": round(wall, 2),
                          "requests_per_s": round(len(ok) / wall, 3),
                          "p50_latency_s": round(statistics.median(r[1] for r in ok), 3),
                          "mean_batch_size": round(statistics.mean(sizes), 2)}
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="debug")
    parser.add_argument("--size", type=int, nargs=3, metavar=("FRAMES", "HEIGHT", "WIDTH"), default=None,
                        help="default: the config's first bucket")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results/serve.json"))
    parser.add_argument("overrides", nargs="*", help="dotted config overrides (e.g. a wider model.arch)")
    args = parser.parse_args()

    from w2svd.config import BucketConfig, load_config

    cfg = load_config(args.config, args.overrides)
    size = tuple(args.size) if args.size else (cfg.data.buckets[0].frames, cfg.data.buckets[0].height,
                                               cfg.data.buckets[0].width)
    if args.size:  # the exports must list the benchmarked size among the sizes they serve
        cfg.data.buckets = [BucketConfig("bench", *size), *cfg.data.buckets]
    started, load_at_start = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        exports = make_exports(cfg, Path(tmp))
        lat = latency(args.config, args.overrides, size, args.repeats, exports)
        thr = None if args.skip_throughput else throughput(exports[4], args.config, args.overrides, size,
                                                           args.requests, args.concurrency, args.batch)
    teacher = lat["teacher-euler-28"]["total_s"]
    report = {
        "command": " ".join(["bench/serve.py", *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_start_end": [load_at_start, os.getloadavg()]},
        "config": args.config, "overrides": args.overrides, "size": {"frames": size[0], "height": size[1],
                                                                      "width": size[2]},
        "latency": lat,
        "speedup_vs_teacher": {k: round(teacher / v["total_s"], 2) for k, v in lat.items()},
        "throughput": thr,
        "seconds": round(time.time() - started, 1),
    }
    if thr:
        rate = {m: statistics.median(t["requests_per_s"] for k, t in thr.items() if k.startswith(m))
                for m in ("batching on", "batching off")}
        report["requests_per_s"] = rate
        report["batching_speedup"] = round(rate["batching on"] / rate["batching off"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print("| sampler | steps | text enc. s | transformer s | VAE decode s | mp4 s | total s | vs teacher |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in lat.items():
        print(f"| {name} | {r['steps']} | {r['encode_s']:.4f} | {r['transformer_s']:.4f} | {r['decode_s']:.4f} | "
              f"{r['mp4_s']:.4f} | {r['total_s']:.4f} | {teacher / r['total_s']:.1f}x |")
    if thr:
        for label, t in thr.items():
            print(f"{label}: {t}")
        print(f"batching speed-up: {report['batching_speedup']}x")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
