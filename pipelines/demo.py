"""``w2svd demo``: the whole pipeline on a tiny local default, each stage as a user would run it.

    synthetic portrait clips → pre-encode (Ray Data) → teacher fine-tune (Ray Train + DeepSpeed)
    → W2SVD distillation (Ray Train + DeepSpeed) → MLflow registry (challenger) → evaluation and
    gated promotion (champion) → generation from ``models:/w2svd-generator@champion``

Everything lands under ``--out`` (clips, shards, checkpoints, exports, the MLflow store). Each
stage runs as its own ``python -m pipelines.<stage>`` process with a local Ray, exactly the
command a user would type; set ``RAY_ADDRESS`` to run the stages on a cluster instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path


def _stage(title: str, args: list[str], env: dict, ok_codes=(0,)) -> int:
    print(f"\n=== {title}\n$ {shlex.join(args)}", flush=True)
    t0 = time.perf_counter()
    code = subprocess.run(args, env=env).returncode
    print(f"--- {title}: exit {code} in {time.perf_counter() - t0:.0f} s", flush=True)
    if code not in ok_codes:
        raise SystemExit(f"demo: stage '{title}' failed with exit status {code}")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="w2svd demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--config", default="debug")
    parser.add_argument("--finetune-steps", type=int, default=6)
    parser.add_argument("--distill-steps", type=int, default=10)
    args = parser.parse_args(argv)

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlruns' / 'mlflow.db'}")
    (out / "mlruns").mkdir(exist_ok=True)
    py = [sys.executable, "-m"]
    t0 = time.perf_counter()

    _stage("synthetic portrait clips", [*py, "pipelines.synth_data", "--out", str(out / "raw"),
                                        "--clips", str(args.clips), "--seed", "0"], env)
    _stage("pre-encode (Ray Data)", [*py, "pipelines.preencode", "--input", str(out / "raw"),
                                     "--output", str(out / "latents"), "--config", args.config], env)
    _stage("teacher fine-tune (Ray Train + DeepSpeed)",
           [*py, "pipelines.finetune", "--config", args.config, "--data", str(out / "latents"),
            "--run-dir", str(out / "teacher"), f"optim.steps={args.finetune_steps}"], env)
    teacher = json.loads((out / "teacher" / "result.json").read_text())["export"]
    _stage("W2SVD distillation (Ray Train + DeepSpeed)",
           [*py, "pipelines.distill", "--config", args.config, "--data", str(out / "latents"),
            "--run-dir", str(out / "distill"), f"model.teacher={teacher}",
            f"optim.steps={args.distill_steps}"], env)
    distilled = json.loads((out / "distill" / "result.json").read_text())
    _stage("register the generator (MLflow, alias challenger)",
           [*py, "pipelines.cli", "register", "--export", distilled["export"], "--config", args.config], env)
    promoted = _stage("evaluate challenger vs champion, promote if the gates hold",
                      [*py, "pipelines.cli", "promote", "--config", args.config,
                       "--out", str(out / "promotion.json")], env, ok_codes=(0, 3)) == 0
    alias = "champion" if promoted else "challenger"
    _stage(f"evaluate models:/w2svd-generator@{alias}",
           [*py, "pipelines.evaluate", "--model", f"models:/w2svd-generator@{alias}", "--config", args.config,
            "--out", str(out / "evaluation.json")], env)

    report = json.loads((out / "evaluation.json").read_text())
    decision = json.loads((out / "promotion.json").read_text()) if (out / "promotion.json").exists() else {}
    print("\n=== demo summary")
    print(f"distilled: method {distilled.get('method')}, {distilled.get('steps')} steps, export {distilled['export']}")
    print(f"promotion: {decision.get('decision', 'promoted' if promoted else 'rejected')}"
          f" {decision.get('reasons', '')}")
    print(f"evaluation of @{alias}: {json.dumps(report.get('metrics', report), indent=1)[:1500]}")
    print(f"MLflow store: {env['MLFLOW_TRACKING_URI']}   (mlflow ui --backend-store-uri ...)")
    print(f"total {time.perf_counter() - t0:.0f} s; everything is under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
