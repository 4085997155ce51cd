"""``w2svd demo``: the whole pipeline on a tiny local default, each stage as a user would run it.

    synthetic portrait clips → pre-encode (Ray Data) → teacher fine-tune (Ray Train + DeepSpeed)
    → W2SVD distillation (Ray Train + DeepSpeed) → MLflow registry (challenger) → evaluation and
    gated promotion (champion) → evaluation of ``models:/w2svd-generator@champion`` and a strip
    ``WORKDIR/samples.png`` (real clips, the teacher at 28 steps, the generator at its steps)
    → batch generation of a few videos (Ray Data) → with ``--serve``: the Serve API

    w2svd demo [--workdir runs/demo] [--config portrait|debug] [--tiny] [--serve [--port 8000]]

The default config, ``portrait``, runs on the portrait world (``w2svd/world.py``): the VAE and the
teacher trained by ``w2svd world build`` and committed under ``w2svd/worlds/``, so its videos
show faces. Its teacher fine-tune is not rerun (about 45 minutes on 2 cores: the world build ran
the same job); ``--config debug`` uses random-init parts and runs the fine-tune too.

Everything lands under ``--workdir`` (clips, shards, checkpoints, exports, the MLflow store, the
videos) and ``WORKDIR/demo-summary.json`` says where (``shards``, ``checkpoint``, ``model_uri``,
``mlflow_tracking_uri``, ``videos``, the evaluation ``metrics``, ``samples``). Each stage runs as its own
``python -m pipelines.<stage>`` process with a local Ray, exactly the command a user would type;
a finished stage leaves ``WORKDIR/.demo/<stage>.json``, so a rerun resumes after the last
finished stage instead of redoing them. ``--tiny`` is the fast variant the tests use.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipelines.errors import ArgumentParser, run_main
from w2svd import world
from w2svd.config import load_config

PROMPTS = ["a woman talking to the camera", "a man with short hair nodding", "a person smiling, green background",
           "a young woman blinking", "an old man speaking slowly", "a person turning their head"]
# --tiny: the fewest clips, steps and evaluation items that still exercise every stage.
TINY = {"clips": 4, "finetune_steps": 2, "distill_steps": 2, "videos": 2,
        "overrides": ["eval.num_prompts=2", "eval.domain_train_clips=8", "eval.domain_train_steps=10"]}
# Defaults by the teacher: a world's (committed, it draws faces) gets the table's budget of the
# portrait benchmark (bench/portrait.py) on more clips; a random-init debug teacher, a few steps.
DEFAULTS = {"world": {"clips": 32, "distill_steps": 120}, "debug": {"clips": 12, "distill_steps": 10}}


class Stages:
    """Runs stages as subprocesses; a stage with a marker from an earlier run is skipped."""

    def __init__(self, workdir: Path, env: dict):
        self.marks = workdir / ".demo"
        self.marks.mkdir(parents=True, exist_ok=True)
        self.env = env

    def run(self, name: str, title: str, args: list[str], ok_codes=(0,)) -> int:
        mark = self.marks / f"{name}.json"
        if mark.is_file():
            done = json.loads(mark.read_text())
            print(f"\n=== {title}: done in an earlier run (exit {done['exit']}), skipped", flush=True)
            return done["exit"]
        print(f"\n=== {title}\n$ {shlex.join(args)}", flush=True)
        start = time.perf_counter()
        code = subprocess.run(args, env=self.env).returncode
        seconds = time.perf_counter() - start
        print(f"--- {title}: exit {code} in {seconds:.0f} s", flush=True)
        if code not in ok_codes:
            print(f"w2svd demo: stage '{title}' failed with exit status {code}; fix it and run the demo "
                  "again to resume from this stage", file=sys.stderr, flush=True)
            raise SystemExit(1)
        mark.write_text(json.dumps({"exit": code, "seconds": round(seconds, 1), "args": args}))
        return code


def synth_like_world(cfg) -> list[str]:
    """synth-data flags for clips like a world teacher's training data: its first bucket's size
    and frame rate, portrait only."""
    frames, height, width = world.first_bucket_size(cfg)
    return ["--portrait-size", f"{width}x{height}", "--frames", str(frames), "--fps", f"{cfg.data.fps:g}",
            "--landscape-fraction", "0"]


def _write_prompts(path: Path, n: int) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "seed"])
        for i in range(n):
            writer.writerow([PROMPTS[i % len(PROMPTS)], i])


def _serve(py: list[str], env: dict, model_uri: str, config: str, port: int) -> None:
    """The Serve application in the foreground (it prints the curl line) until Ctrl-C."""
    args = [*py, "pipelines.serve", "--model", model_uri, "--config", config, "--port", str(port)]
    print(f"\n=== serve {model_uri} (Ctrl-C stops it)\n$ {shlex.join(args)}", flush=True)
    proc = subprocess.Popen(args, env=env)
    # Ctrl-C (or SIGTERM to the demo) is passed on once; the server shuts down by itself.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: proc.poll() is None and proc.send_signal(signal.SIGINT))
    try:
        proc.wait(timeout=None)
    finally:
        if proc.poll() is None:
            proc.kill()


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="w2svd demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", "--out", dest="workdir", type=Path, default=Path("runs/demo"),
                   help="where everything goes (default runs/demo)")
    p.add_argument("--tiny", action="store_true", help="the fast variant: fewest clips, steps and videos")
    p.add_argument("--clips", type=int, help="synthetic clips to pre-encode (default 32 with a world's teacher, "
                                             "else 12)")
    p.add_argument("--config", default="portrait", help="portrait: the committed portrait world (faces); "
                                                             "debug: random-init parts, every stage in seconds")
    p.add_argument("--finetune-steps", type=int, default=6)
    p.add_argument("--distill-steps", type=int, help="distillation iterations (default 120 with a world's "
                                                      "teacher, else 10)")
    p.add_argument("--videos", type=int, default=4, help="videos the batch generation stage makes")
    p.add_argument("--serve", action="store_true", help="finally serve the model until Ctrl-C")
    p.add_argument("--port", type=int, default=8000, help="with --serve")
    return p


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        defaults = DEFAULTS["world" if world.is_world_uri(load_config(args.config).model.teacher) else "debug"]
        args.clips = args.clips or defaults["clips"]
        args.distill_steps = args.distill_steps or defaults["distill_steps"]
        if args.tiny:
            args.clips, args.finetune_steps = TINY["clips"], TINY["finetune_steps"]
            args.distill_steps, args.videos = TINY["distill_steps"], TINY["videos"]
        overrides = TINY["overrides"] if args.tiny else []
        return demo(args, overrides)

    return run_main("w2svd demo", body)


def demo(args, overrides: list[str]) -> int:
    out = args.workdir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlruns' / 'mlflow.db'}")
    (out / "mlruns").mkdir(exist_ok=True)
    py = [sys.executable, "-m"]
    cfg = ["--config", args.config]
    config = load_config(args.config, overrides)
    stages = Stages(out, env)
    t0 = time.perf_counter()

    world_teacher = world.is_world_uri(config.model.teacher)
    stages.run("synth", "synthetic portrait clips", [*py, "pipelines.synth_data", "--out", str(out / "raw"),
                                                     "--clips", str(args.clips), "--seed", "0",
                                                     *(synth_like_world(config) if world_teacher else [])])
    stages.run("preencode", "pre-encode (Ray Data)", [*py, "pipelines.preencode", "--input", str(out / "raw"),
                                                      "--output", str(out / "latents"), *cfg, *overrides])
    if world_teacher:
        # A teacher worth distilling takes the finetune job ~45 min here, so the world's teacher
        # (built by that job in `w2svd world build`, committed under w2svd/worlds/) is used as is.
        print(f"\n=== teacher fine-tune: {config.model.teacher}, fine-tuned by the same job in "
              f"`w2svd world build --config {args.config}` (--config debug runs it here)", flush=True)
        teacher_override = []
    else:
        stages.run("finetune", "teacher fine-tune (Ray Train + DeepSpeed)",
                   [*py, "pipelines.finetune", *cfg, "--data", str(out / "latents"), "--run-dir",
                    str(out / "teacher"), f"optim.steps={args.finetune_steps}", *overrides])
        teacher_override = [f"model.teacher={json.loads((out / 'teacher' / 'result.json').read_text())['export']}"]
    stages.run("distill", "W2SVD distillation (Ray Train + DeepSpeed)",
               [*py, "pipelines.distill", *cfg, "--data", str(out / "latents"), "--run-dir", str(out / "distill"),
                *teacher_override, f"optim.steps={args.distill_steps}", *overrides])
    distilled = json.loads((out / "distill" / "result.json").read_text())
    stages.run("register", "register the generator (MLflow, alias challenger)",
               [*py, "pipelines.cli", "register", "--export", distilled["export"], *cfg])
    promoted = stages.run("promote", "evaluate challenger vs champion, promote if the gates hold",
                          [*py, "pipelines.cli", "promote", *cfg, "--out", str(out / "promotion.json"), *overrides],
                          ok_codes=(0, 3)) == 0
    alias = "champion" if promoted else "challenger"
    model_uri = f"models:/w2svd-generator@{alias}"
    stages.run("evaluate", f"evaluate {model_uri}, and the strip of real clips, teacher and generator",
               [*py, "pipelines.evaluate", "--model", model_uri, *cfg, "--out", str(out / "evaluation.json"),
                "--strip", str(out / "samples.png"), *teacher_override, *overrides])
    _write_prompts(out / "prompts.csv", args.videos)
    stages.run("generate", f"batch generation with {model_uri} (Ray Data)",
               [*py, "pipelines.generate", "--model", model_uri, "--prompts", str(out / "prompts.csv"),
                "--output", str(out / "generated"), *cfg])

    summary = write_summary(out, env, model_uri, distilled, promoted)
    print("\n=== demo summary")
    print(f"distilled: method {distilled.get('method')}, {distilled.get('steps')} steps, export {distilled['export']}")
    print(f"promotion: {summary['promotion'].get('decision', 'promoted' if promoted else 'rejected')}")
    print(f"evaluation of @{alias}: {json.dumps(summary['metrics'], indent=1)[:1500]}")
    print(f"videos: {len(summary['videos'])} mp4s in {out / 'generated' / 'videos'}")
    print(f"strip: {out / 'samples.png'} (real clips, the teacher at {config.method.teacher_steps} steps, "
          f"the generator at {config.method.student_steps})")
    print(f"MLflow store: {env['MLFLOW_TRACKING_URI']}   (mlflow ui --backend-store-uri ...)")
    print(f"total {time.perf_counter() - t0:.0f} s; everything is under {out}; summary in {out / 'demo-summary.json'}")
    if args.serve:
        _serve(py, env, model_uri, args.config, args.port)
    return 0


def write_summary(out: Path, env: dict, model_uri: str, distilled: dict, promoted: bool) -> dict:
    import pyarrow.parquet as pq

    evaluation = json.loads((out / "evaluation.json").read_text())
    decision = json.loads((out / "promotion.json").read_text()) if (out / "promotion.json").exists() else {}
    results = pq.read_table(out / "generated" / "results.parquet").to_pylist()
    shards = sorted(str(p) for p in (out / "latents").rglob("*.parquet"))
    summary = {
        "workdir": str(out),
        "shards": {"uri": str(out / "latents"), "count": len(shards)},
        "checkpoint": distilled.get("checkpoint"),
        "export": distilled.get("export"),
        "model_uri": model_uri,
        "promoted": promoted,
        "promotion": {k: decision.get(k) for k in ("decision", "reasons") if k in decision},
        "mlflow_tracking_uri": env["MLFLOW_TRACKING_URI"],
        "videos": [r["output_uri"] for r in results if r["output_uri"]],
        "metrics": evaluation.get("metrics", {}),
        "samples": str(out / "samples.png"),
    }
    (out / "demo-summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    sys.exit(main())
