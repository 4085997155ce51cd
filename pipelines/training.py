"""The driver of the two training programs (finetune, distill): command line and ``TorchTrainer``.

``main`` parses ``--config NAME --data URI --run-dir URI [overrides]``, joins or starts Ray,
builds the latent Dataset and runs a ``TorchTrainer`` whose storage is the run dir, then writes
``RUN_DIR/result.json``. Running again with the same run dir resumes (Ray Train V2 resumes a
``RunConfig(name, storage_path)`` from its latest checkpoint) or says the run is finished.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from pipelines import checkpoint
from pipelines.errors import ArgumentParser, run_main
from pipelines.guards import HEALTH_FILE
from pipelines.startup import init_ray
from pipelines.tracking import tracking_uri, training_run_id
from pipelines.worker import EXPORT_DIR, EXPORT_MARKER, TRAIN_NAME
from w2svd.config import Config, load_config, to_dict
from w2svd.data import storage

RESULT_FILE = "result.json"


def build_parser(prog: str, description: str) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", default="debug", help="named config in w2svd/configs or a YAML path")
    p.add_argument("--data", required=True, help="pre-encode output (local folder or s3://bucket/prefix)")
    p.add_argument("--run-dir", required=True, help="checkpoints, export and result.json (local or s3://)")
    p.add_argument("--export-only", action="store_true",
                   help="export the generator from the run's latest checkpoint without training")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.steps=20")
    return p


def run_uri(run_dir: str) -> str:
    """Absolute local path or the s3:// URI as given."""
    return run_dir.rstrip("/") if storage.is_s3(run_dir) else str(Path(run_dir).expanduser().absolute())


def main(program: str, train_loop: Callable[[dict], None], argv: list[str] | None, description: str,
         check: Callable[[Config], None] = lambda cfg: None) -> int:
    """The whole command: returns the process exit status (2 for a user error, one line)."""
    prog = f"w2svd {program}"

    def body() -> int:
        args = build_parser(prog, description).parse_args(argv)
        cfg = load_config(args.config, args.overrides)
        check(cfg)
        result = train(program, train_loop, cfg, args.data, args.run_dir, export_only=args.export_only)
        print(json.dumps(result, indent=2))
        if result.get("status") == "stopped":
            # Exit 0 only when this stop exported its kept state: an export left in RUN_DIR by an
            # earlier incarnation that ran to its last step says "last".
            if result.get("stopped_by") == "drift":
                kept = result.get("export_kept_by")
                if kept == "drift":
                    print(f"{prog}: the drift guard stopped training ({result['reason']}); exported its best state, "
                          f"{result.get('best_checkpoint')}", file=sys.stderr)
                    return 0
                if kept == "drift-at-stop":
                    print(f"{prog}: the drift guard stopped training ({result['reason']}) before any checkpoint; "
                          "exported the state at the stop (lower optim.checkpoint_every to keep the best)",
                          file=sys.stderr)
                    return 0
                print(f"{prog}: the drift guard stopped training ({result['reason']}); nothing was exported",
                      file=sys.stderr)
                return 1
            print(f"{prog}: training stopped by the health check: {result['reason']}", file=sys.stderr)
            return 1
        return 0

    return run_main(prog, body)


def train(program: str, train_loop: Callable[[dict], None], cfg: Config, data: str, run_dir: str,
          export_only: bool = False) -> dict:
    """Run (or resume, or recognise as finished) the training job; returns result.json's content."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.reader import shard_files, training_dataset

    options = storage.StorageOptions.from_env()
    run = run_uri(run_dir)
    # Missing inputs are one-line errors here, on the driver, before any worker starts.
    shard_files(data, options)
    if cfg.model.teacher:
        from w2svd.models.hunyuan import resolve_teacher

        resolve_teacher(cfg.model.teacher, config_only=True)
    previous = storage.read_json(storage.join(run, RESULT_FILE), options)
    if previous and previous.get("status") == "finished" and previous.get("steps", -1) >= cfg.optim.steps \
            and not export_only:
        print(f"w2svd {program}: run {run} is already finished at step {previous['steps']} "
              f"(checkpoint {previous.get('checkpoint')}); nothing to do")
        return previous
    health = storage.read_json(storage.join(run, HEALTH_FILE), options)
    if health and health.get("stopped"):
        # Rerunning a run the health check stopped resumes it from its last good checkpoint
        # (typically with overrides, e.g. a lower learning rate); the rollback count is kept.
        print(f"w2svd {program}: resuming a run the health check stopped: {health.pop('stopped')}")
        storage.write_json(storage.join(run, HEALTH_FILE), health, options)

    p = cfg.parallel
    init_ray(need_cpus=p.num_workers * p.cpus_per_worker)
    dataset = training_dataset(data, [b.name for b in cfg.data.buckets], materialize=p.materialize_data,
                               options=options)
    run_id = training_run_id(cfg, run, program, options)
    fs, path = storage.filesystem(run, options)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": to_dict(cfg), "run_dir": run, "storage_options": options,
                           "mlflow_run_id": run_id, "tracking_uri": tracking_uri(cfg), "export_only": export_only},
        scaling_config=ScalingConfig(num_workers=p.num_workers, use_gpu=p.use_gpu,
                                     resources_per_worker={"CPU": p.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if p.use_gpu else "gloo"),
        # Every worker reads the whole stream in a fixed order and takes every N-th batch: the
        # order is then a function of the step alone, which is what makes resume exact.
        dataset_config=DataConfig(datasets_to_split=[],
                                  execution_options=ExecutionOptions(preserve_order=True)),
        datasets={"train": dataset},
        run_config=RunConfig(
            name=TRAIN_NAME, storage_path=path, storage_filesystem=fs if storage.is_s3(run) else None,
            # Rollbacks restart the worker group too, so they get their own share of restarts.
            # The controller's own retries (a group that cannot start) are bounded as well:
            # Ray's default retries forever.
            failure_config=FailureConfig(max_failures=p.max_failures + cfg.health.max_rollbacks,
                                         controller_failure_limit=p.max_failures),
            # The newest checkpoint and the KEEP best ranked: the lowest drift signal always among them.
            checkpoint_config=CheckpointConfig(num_to_keep=checkpoint.KEEP, checkpoint_score_attribute=checkpoint.KEEP_RANK,
                                               checkpoint_score_order="max"),
        ),
    )
    fit = trainer.fit()
    if fit.error is not None:
        raise fit.error
    location = None
    if fit.checkpoint is not None:
        location = fit.checkpoint.path
        if storage.is_s3(run) and "://" not in location:
            location = f"s3://{location}"
    health = storage.read_json(storage.join(run, HEALTH_FILE), options) or {}
    metrics = fit.metrics or {}
    export = storage.join(run, EXPORT_DIR)
    marker = storage.read_json(storage.join(export, EXPORT_MARKER), options) or {}
    result = {
        "status": "stopped" if health.get("stopped") else "finished",
        "checkpoint": location,
        "export": export if storage.exists(export, options) else None,
        "export_kept_by": marker.get("kept_by"),
        # The state the export holds: after a drift stop not the last checkpoint's (``steps``).
        "export_step": marker.get("step"),
        "steps": int(metrics.get("step", 0)),  # of the newest checkpoint
        "method": "finetune" if program == "finetune" else cfg.method.name,
        "program": program,
        "rollbacks": int(health.get("rollbacks", 0)),
        "stats": {k: v for k, v in metrics.items() if k.startswith("stats/")},
    }
    drift_fired_at = (health.get("drift") or {}).get("fired_at")
    if health.get("stopped") or drift_fired_at is not None:
        if health.get("stopped"):
            result["reason"], result["stopped_by"] = health["stopped"], health.get("stopped_by", "health")
        if drift_fired_at is not None:  # also when only logged (health.drift_action = log)
            result["drift_fired_at"] = int(drift_fired_at)
            print(f"[w2svd] warning: the drift guard fired at step {drift_fired_at}; the best state by its "
                  "signal is result.json's best_checkpoint", file=sys.stderr)
    # The drift guard's best state by its signal, kept whether or not it fired (None: no signal);
    # after a drift stop the export is it.
    result["best_checkpoint"] = checkpoint.best_by_drift(storage.join(run, TRAIN_NAME), options)
    if run_id:
        result["mlflow_run_id"] = run_id
    storage.write_json(storage.join(run, RESULT_FILE), result, options)
    return result
