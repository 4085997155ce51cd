"""What the two training programs (finetune, distill) share: command line, Ray Train driver,
DeepSpeed engines, the latent stream, checkpoints, health rollbacks and MLflow.

Driver (``run``): parse ``--config NAME --data URI --run-dir URI [overrides]``, start or join Ray,
build the latent Dataset, run a ``TorchTrainer`` whose storage is the run dir, and write
``RUN_DIR/result.json``. Running again with the same run dir resumes (Ray Train V2 resumes a
``RunConfig(name, storage_path)`` from its latest checkpoint) or says the run is finished.

Worker: ``WorkerSession`` is what a ``train_loop_per_worker`` holds besides its model — rank,
device, RNG, the latent stream, checkpoint I/O, the health guard and the tracker — so the loops
in finetune.py / distill.py read top to bottom.

Rollback: a bad step is never stepped into a checkpoint. The guard records the rollback in
``RUN_DIR/health.json`` and every rank raises ``RollbackRequested``; Ray Train's
``FailureConfig`` restarts the worker group from the latest (good) checkpoint, and the restarted
loop reads the lowered learning-rate scale from ``health.json``. A stop decision ends the loop
cleanly instead, and the driver reports it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from w2svd.config import Config, flatten, from_dict, load_config, to_dict, to_yaml, validate
from w2svd.data import storage
from w2svd.health import HealthMonitor, HealthState
from w2svd.models.base import Cond

RESULT_FILE = "result.json"
HEALTH_FILE = "health.json"
MLFLOW_FILE = "mlflow_run.json"
EXPORT_DIR = "export"
TRAIN_NAME = "train"  # Ray Train's experiment folder inside the run dir


# ---------------------------------------------------------------------------------------------
# Command line and driver


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", default="debug", help="named config in w2svd/configs or a YAML path")
    p.add_argument("--data", required=True, help="pre-encode output (local folder or s3://bucket/prefix)")
    p.add_argument("--run-dir", required=True, help="checkpoints, export and result.json (local or s3://)")
    p.add_argument("--export-only", action="store_true",
                   help="export the generator from the run's latest checkpoint without training")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.steps=20")
    return p


def parse(prog: str, description: str, argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    args = build_parser(prog, description).parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise SystemExit(f"{prog}: overrides must look like section.key=value, got {bad}")
    return args, load_config(args.config, args.overrides)


def run_uri(run_dir: str) -> str:
    """Absolute local path or the s3:// URI as given."""
    return run_dir.rstrip("/") if storage.is_s3(run_dir) else str(Path(run_dir).expanduser().absolute())


def read_json(uri: str, options: storage.StorageOptions | None = None) -> dict | None:
    return json.loads(storage.read_bytes(uri, options)) if storage.exists(uri, options) else None


def write_json(uri: str, value: dict, options: storage.StorageOptions | None = None) -> None:
    storage.write_bytes(uri, json.dumps(value, indent=2).encode(), options)


def init_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return
    # A Data → Train pipeline deadlocks when Train takes every logical CPU: declare enough for
    # the workers plus the data tasks (Ray does not pin cores; this only bounds concurrency).
    need = int(cfg.parallel.num_workers * cfg.parallel.cpus_per_worker) + 2
    ray.init(num_cpus=max(need, os.cpu_count() or 1, 4))


def tracking_uri(cfg: Config) -> str | None:
    return cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")


def mlflow_run_id(cfg: Config, run: str, program: str, options) -> str | None:
    """The MLflow run of this run dir: created (with the resolved config as params) on first
    use, found again in ``RUN_DIR/mlflow_run.json`` on resume."""
    uri = tracking_uri(cfg)
    if not uri:
        return None
    known = read_json(storage.join(run, MLFLOW_FILE), options)
    if known and known.get("tracking_uri") == uri:
        return known["run_id"]
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        artifact_location = None
        if uri.startswith("sqlite:///"):
            # MLflow's default artifact root for a database store is ./mlruns of the caller.
            artifact_location = Path(uri[len("sqlite:///"):]).absolute().parent.joinpath("artifacts").as_uri()
        experiment_id = client.create_experiment(cfg.tracking.experiment, artifact_location=artifact_location)
    else:
        experiment_id = experiment.experiment_id
    mlrun = client.create_run(experiment_id, run_name=f"{program}-{cfg.method.name}-{Path(run).name}",
                              tags={"w2svd.program": program, "w2svd.run_dir": run})
    params = {k: str(v)[:6000] for k, v in flatten(cfg).items()}
    items = list(params.items())
    for i in range(0, len(items), 100):
        client.log_batch(mlrun.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i:i + 100]])
    client.log_text(mlrun.info.run_id, to_yaml(cfg), "config.yaml")
    write_json(storage.join(run, MLFLOW_FILE), {"run_id": mlrun.info.run_id, "tracking_uri": uri}, options)
    return mlrun.info.run_id


def run(program: str, train_loop: Callable[[dict], None], argv: list[str] | None, description: str,
        check: Callable[[Config], None] = lambda cfg: None) -> int:
    """The whole command: returns the process exit code."""
    args, cfg = parse(f"w2svd {program}", description, argv)
    check(cfg)
    result = train(program, train_loop, cfg, args.data, args.run_dir, export_only=args.export_only)
    print(json.dumps(result, indent=2))
    if result.get("status") == "stopped":
        print(f"w2svd {program}: training stopped by the health check: {result['reason']}", file=sys.stderr)
        return 1
    return 0


def train(program: str, train_loop: Callable[[dict], None], cfg: Config, data: str, run_dir: str,
          export_only: bool = False) -> dict:
    """Run (or resume, or recognise as finished) the training job; returns result.json's content."""
    import ray.data
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.reader import read_latent_shards

    options = storage.StorageOptions.from_env()
    run = run_uri(run_dir)
    previous = read_json(storage.join(run, RESULT_FILE), options)
    if previous and previous.get("status") == "finished" and previous.get("steps", -1) >= cfg.optim.steps \
            and not export_only:
        print(f"w2svd {program}: run {run} is already finished at step {previous['steps']} "
              f"(checkpoint {previous.get('checkpoint')}); nothing to do")
        return previous

    health = read_json(storage.join(run, HEALTH_FILE), options)
    if health and health.get("stopped"):
        # Rerunning a run the health check stopped resumes it from its last good checkpoint
        # (typically with overrides, e.g. a lower learning rate); the rollback count is kept.
        print(f"w2svd {program}: resuming a run the health check stopped: {health.pop('stopped')}")
        write_json(storage.join(run, HEALTH_FILE), health, options)
    init_ray(cfg)
    # A Dataset keeps the DataContext of its creation: file order must be fixed before reading,
    # since resume replays the stream by position.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    dataset = read_latent_shards(data, buckets=[b.name for b in cfg.data.buckets], options=options)
    if cfg.parallel.materialize_data:
        dataset = dataset.materialize()  # small data: read once into the object store
    run_id = mlflow_run_id(cfg, run, program, options)
    p = cfg.parallel
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
            failure_config=FailureConfig(max_failures=p.max_failures + cfg.health.max_rollbacks),
            checkpoint_config=CheckpointConfig(num_to_keep=3),
        ),
    )
    fit = trainer.fit()
    if fit.error is not None:
        raise fit.error
    checkpoint = fit.checkpoint
    location = None
    if checkpoint is not None:
        location = f"s3://{checkpoint.path}" if storage.is_s3(run) and "://" not in checkpoint.path else checkpoint.path
    health = read_json(storage.join(run, HEALTH_FILE), options) or {}
    metrics = fit.metrics or {}
    result = {
        "status": "stopped" if health.get("stopped") else "finished",
        "checkpoint": location,
        "export": storage.join(run, EXPORT_DIR) if storage.exists(storage.join(run, EXPORT_DIR), options) else None,
        "steps": int(metrics.get("step", 0)),
        "method": "finetune" if program == "finetune" else cfg.method.name,
        "program": program,
        "rollbacks": int(health.get("rollbacks", 0)),
        "stats": {k: v for k, v in metrics.items() if k.startswith("stats/")},
    }
    if health.get("stopped"):
        result["reason"] = health["stopped"]
    if run_id:
        result["mlflow_run_id"] = run_id
    write_json(storage.join(run, RESULT_FILE), result, options)
    return result


# ---------------------------------------------------------------------------------------------
# DeepSpeed engines


def deepspeed_config(cfg: Config) -> dict:
    """DeepSpeed's config from the typed one: ZeRO stage, precision (fp32 on CPU), clipping."""
    p = cfg.parallel
    bf16 = p.precision == "bf16" and p.use_gpu
    return {
        "train_micro_batch_size_per_gpu": cfg.optim.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": p.zero_stage},
        "bf16": {"enabled": bf16},
        # A plain torch AdamW: DeepSpeed's own optimizer block would JIT-compile fused Adam.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }


@dataclass
class Trained:
    """One trained role: its DeepSpeed engine and the configured learning rate of each group."""

    name: str
    engine: object
    optimizer: torch.optim.Optimizer
    lrs: list[float]
    params: list[nn.Parameter]

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float:
        """Clip (DeepSpeed's ``gradient_clipping``), step, zero; returns the gradient norm."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def set_lr_scale(self, scale: float) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.lrs, strict=True):
            group["lr"] = lr * scale

    def learning_rates(self) -> dict[str, float]:
        return {f"lr/{self.name}" + (f"_{i}" if i else ""): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}


def make_engine(name: str, modules: list[nn.Module], groups: list[tuple[list[nn.Parameter], float]],
                cfg: Config) -> Trained:
    """Wrap the parameter groups ``[(params, lr), …]`` of one role in a DeepSpeed engine.

    ``modules`` are the modules whose forward uses the parameters (ZeRO-3 gathers parameters in
    their hooks); the optimizer holds the trained parameters only, so two roles on one shared
    base train and checkpoint separately while the frozen base is never duplicated.
    """
    import deepspeed

    o = cfg.optim
    groups = [(list(params), lr) for params, lr in groups if params]
    optimizer = torch.optim.AdamW([{"params": params, "lr": lr} for params, lr in groups],
                                  betas=tuple(o.betas), weight_decay=o.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=nn.ModuleList(modules), optimizer=optimizer,
                                           config=deepspeed_config(cfg), dist_init_required=False)
    return Trained(name, engine, optimizer, [lr for _, lr in groups], [p for params, _ in groups for p in params])


def check_zero3_sharing(cfg: Config, shared_base_engines: int) -> None:
    if cfg.parallel.zero_stage == 3 and shared_base_engines > 1:
        raise ValueError(
            "parallel.zero_stage = 3 partitions each engine's module, but method.generator = 'lora' puts the "
            "generator and the critic adapters on ONE shared base; use parallel.zero_stage = 2 "
            "(the frozen base is not in any optimizer, so ZeRO-2 already shards all trained state)")


# ---------------------------------------------------------------------------------------------
# Latent stream


@dataclass
class Batch:
    x: torch.Tensor  # [B, C, T, H, W]
    cond: Cond
    bucket: str


class LatentStream:
    """An endless, deterministic stream of one-bucket batches for this rank.

    Every rank iterates the same ordered stream and keeps batches ``rank, rank + world, …``;
    ``position`` (batches this rank has consumed) is all a checkpoint needs to resume it.
    """

    def __init__(self, shard, batch_size: int, rank: int, world: int, device, position: int = 0):
        self.shard, self.batch_size, self.rank, self.world = shard, batch_size, rank, world
        self.device = device
        self.position = 0
        self.first: Batch | None = None  # the batch at position 0 (fixed validation prompts)
        self._it = self._batches()
        for _ in range(position):  # the data position of the checkpoint
            next(self._it)
            self.position += 1

    def _batches(self):
        from pipelines.reader import iter_latent_batches

        index = 0
        while True:
            produced = 0
            for batch in iter_latent_batches(self.shard, self.batch_size, drop_last=True):
                produced += 1
                index += 1
                if (index - 1) % self.world == self.rank:
                    yield batch
            if produced == 0:
                raise ValueError(f"the data holds fewer than optim.batch_size = {self.batch_size} clips in "
                                 "every bucket; lower optim.batch_size or encode more clips")

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        b = next(self._it)
        self.position += 1
        cond = Cond(text=b.text.float(), text_mask=b.text_mask.float(), pooled=b.pooled.float(),
                    image=None if b.image is None else b.image.float())
        batch = Batch(b.latents.float().to(self.device), cond.to(self.device), b.bucket)
        if self.position == 1:
            self.first = batch
        return batch


# ---------------------------------------------------------------------------------------------
# Worker session


class RollbackRequested(RuntimeError):
    """Raised on every rank to make Ray Train restart the group from the last good checkpoint."""


class InjectedFailure(RuntimeError):
    """The fault test's worker failure (``parallel.fail_at_step``)."""


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class WorkerSession:
    cfg: Config
    run_dir: str
    options: storage.StorageOptions
    rank: int
    world: int
    device: torch.device
    rng: torch.Generator
    health: HealthMonitor
    tracker: Tracker
    step: int = 0
    data_position: int = 0
    resumed: bool = False
    export_only: bool = False
    _stream: LatentStream | None = None
    _samples: Batch | None = None
    _param_bytes: int = 0
    _step_times: list[float] = field(default_factory=list)

    # -- start ------------------------------------------------------------------------------
    @classmethod
    def start(cls, config: dict) -> WorkerSession:
        import ray.train

        cfg = from_dict(Config, config["cfg"])
        validate(cfg)
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        device = ray.train.torch.get_device() if cfg.parallel.use_gpu else torch.device("cpu")
        seed = cfg.optim.seed + 1000 * rank
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        options = config["storage_options"]
        run = config["run_dir"]
        health_state = read_json(storage.join(run, HEALTH_FILE), options) or {}
        monitor = HealthMonitor.from_config(
            cfg.health, HealthState(**{k: v for k, v in health_state.items() if k in HealthState.__dataclass_fields__}))
        tracker = Tracker(config.get("mlflow_run_id") if rank == 0 else None, config.get("tracking_uri"), cfg)
        return cls(cfg, run, options, rank, world, device, torch.Generator().manual_seed(seed), monitor, tracker,
                   export_only=bool(config.get("export_only")))

    # -- data --------------------------------------------------------------------------------
    def batches(self) -> LatentStream:
        import ray.train

        if self._stream is None:
            shard = ray.train.get_dataset_shard("train")
            self._stream = LatentStream(shard, self.cfg.optim.batch_size, self.rank, self.world, self.device,
                                        position=self.data_position)
        return self._stream

    def fixed_samples(self) -> Batch:
        """The validation prompts: the first ``sample_count`` clips of this rank's stream, kept in
        the checkpoint so a resumed run samples the same prompts without re-reading the data."""
        if self._samples is None:
            first = self.batches().first
            if first is None:
                raise RuntimeError("fixed_samples() is available after the first batch was read")
            n = min(self.cfg.optim.sample_count, first.x.shape[0])
            self._samples = Batch(first.x[:n], first.cond.index(slice(0, n)), first.bucket)
        return self._samples

    @property
    def total_steps(self) -> int:
        return self.step if self.export_only else self.cfg.optim.steps

    # -- checkpoints -------------------------------------------------------------------------
    def restore(self, trained: list[Trained], extra: dict[str, nn.Module] | None = None) -> None:
        """Load the checkpoint Ray Train resumed with (if any): engines, step, RNG, data position."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            self._apply_lr(trained)
            return
        with checkpoint.as_directory() as folder:
            folder = Path(folder)
            for t in trained:
                t.engine.load_checkpoint(str(folder), tag=t.name, load_module_strict=False)
            state = json.loads((folder / "state.json").read_text())
            for name, module in (extra or {}).items():
                module.load_state_dict(torch.load(folder / f"{name}.pt", map_location=self.device))
            rng_file = folder / f"rng_rank{self.rank}.pt"
            if rng_file.is_file():  # absent when the world size grew: fresh seeds for new ranks
                rng = torch.load(rng_file, weights_only=False)
                self.rng.set_state(rng["step"])
                torch.set_rng_state(rng["torch"])
                np.random.set_state(rng["numpy"])
                random.setstate(rng["python"])
                if self.device.type == "cuda" and "cuda" in rng:
                    torch.cuda.set_rng_state(rng["cuda"], self.device)
            samples_file = folder / f"samples_rank{self.rank}.pt"
            if samples_file.is_file():
                raw = torch.load(samples_file, weights_only=False)
                self._samples = Batch(raw["x"].to(self.device), Cond(**raw["cond"]).to(self.device), raw["bucket"])
        self.step, self.data_position, self.resumed = state["step"], state["data_position"], True
        self._apply_lr(trained)
        if self.rank == 0:
            print(f"[w2svd] resumed from checkpoint at step {self.step} (lr scale {self.health.lr_scale:g})")

    def _apply_lr(self, trained: list[Trained]) -> None:
        for t in trained:
            t.set_lr_scale(self.health.lr_scale)

    def save(self, trained: list[Trained], metrics: dict, extra: dict[str, nn.Module] | None = None) -> None:
        """Checkpoint every trained role (engine + optimizer state), step, RNG, data position and
        config; every rank writes its files and Ray Train merges them into one checkpoint."""
        import ray.train
        from ray.train import Checkpoint

        for t in trained:  # a poisoned weight must never reach storage
            bad = [i for i, p in enumerate(t.params) if not torch.isfinite(p.detach()).all()]
            if bad:
                raise RuntimeError(f"refusing to checkpoint step {self.step}: {t.name} has non-finite "
                                   f"parameters (indices {bad[:5]}) although the health check passed")
        tmp = Path(tempfile.mkdtemp(prefix="w2svd-ckpt-"))
        try:
            for t in trained:
                # Frozen weights (the shared base) are rebuilt from the teacher, never stored.
                t.engine.save_checkpoint(str(tmp), tag=t.name, save_latest=False, exclude_frozen_parameters=True)
            rng = {"step": self.rng.get_state(), "torch": torch.get_rng_state(),
                   "numpy": np.random.get_state(), "python": random.getstate()}
            if self.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(self.device)
            torch.save(rng, tmp / f"rng_rank{self.rank}.pt")
            fixed = self.fixed_samples()
            torch.save({"x": fixed.x.cpu(), "cond": fixed.cond.to("cpu").__dict__, "bucket": fixed.bucket},
                       tmp / f"samples_rank{self.rank}.pt")
            if self.rank == 0:
                for name, module in (extra or {}).items():
                    torch.save(module.state_dict(), tmp / f"{name}.pt")
                (tmp / "state.json").write_text(json.dumps(
                    {"step": self.step, "data_position": self.batches().position,
                     "health": self.health.state_dict(), "roles": [t.name for t in trained]}))
                (tmp / "config.yaml").write_text(to_yaml(self.cfg))
            ray.train.report({**metrics, "step": self.step, **self.stats()},
                             checkpoint=Checkpoint.from_directory(str(tmp)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def checkpoint_due(self) -> bool:
        return self.step % self.cfg.optim.checkpoint_every == 0 or self.step == self.total_steps

    # -- faults and health -------------------------------------------------------------------
    def maybe_fail(self) -> None:
        """The fault test's hook: one worker dies mid-run of a fresh (never resumed) run."""
        if (self.step == self.cfg.parallel.fail_at_step and not self.resumed
                and self.rank == min(1, self.world - 1)):
            raise InjectedFailure(f"injected worker failure at step {self.step} (parallel.fail_at_step)")

    def poison(self, loss_scale: float = 1.0) -> float:
        """``health.inject_nan_at_step``: a NaN factor for the losses of that step, once per run."""
        if self.step == self.cfg.health.inject_nan_at_step and self.health.state.rollbacks == 0:
            return float("nan")
        return loss_scale

    def reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        """Mean over ranks (a NaN anywhere makes it NaN everywhere: every rank decides alike)."""
        if self.world == 1 or not metrics:
            return dict(metrics)
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(values)
        return {k: float(v) / self.world for k, v in zip(keys, values.tolist(), strict=True)}

    def guard(self, metrics: dict[str, float], grad_norms: dict[str, float] | None = None) -> bool:
        """Health check of the reduced numbers; False means "stop now" (loop must end cleanly).
        A rollback raises ``RollbackRequested`` on every rank after recording it."""
        decision = self.health.check(self.step, metrics, grad_norms)
        if decision.ok:
            return True
        state = {**self.health.state_dict(), "lr_scale": decision.lr_scale}
        if decision.action == "stop":
            state["stopped"] = decision.reason
        if self.rank == 0:
            print(f"[w2svd] health: {decision.reason}", file=sys.stderr, flush=True)
            write_json(storage.join(self.run_dir, HEALTH_FILE), state, self.options)
            self.tracker.tag("health", decision.reason)
        if self.world > 1:
            dist.barrier()  # health.json is written before any rank leaves
        if decision.action == "rollback":
            raise RollbackRequested(decision.reason)
        return False

    def healthy_before_update(self, metrics: dict[str, float]) -> bool:
        """Losses of this step on every rank are finite, so the update may land. Otherwise the
        guard rolls back (raises) or stops (False) before any optimizer steps on them."""
        reduced = self.reduce(metrics)
        if all(np.isfinite(v) for v in reduced.values()):
            return True
        return self.guard(reduced)

    def after_step(self, metrics: dict[str, float], grad_norms: dict[str, float], trained: list[Trained],
                   sample: Callable[[], torch.Tensor] | None = None,
                   extra: dict[str, nn.Module] | None = None) -> bool:
        """Count the step, then: health check, log (rank 0), samples and checkpoint when due.
        Returns False when the health check stopped the run."""
        self.step += 1
        metrics = self.reduce(metrics)
        if not self.guard(metrics, grad_norms):
            return False
        logged = {**metrics, **{f"grad_norm/{k}": v for k, v in grad_norms.items()}}
        for t in trained:
            logged.update(t.learning_rates())
        if self.step % self.cfg.optim.log_every == 0 or self.step == self.total_steps:
            self.tracker.log(logged, self.step)
            if self.rank == 0:
                shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(logged.items()) if "/" in k and "lr/" not in k)
                print(f"[w2svd] step {self.step}/{self.total_steps} {shown}", flush=True)
        if sample is not None and self.cfg.tracking.log_samples and self.step % self.cfg.optim.sample_every == 0:
            latents = sample()  # every rank: ZeRO-3 gathers weights collectively
            if self.rank == 0 and self.tracker.active:
                clips, label = decode_samples(self.cfg, latents)
                self.tracker.log_video(video_strip(clips), self.cfg.data.fps, self.step, label)
                if label == "vae":
                    self.tracker.log(quick_metrics(clips, self.cfg.data.fps), self.step)
        if self.checkpoint_due():
            self.save(trained, logged, extra)
        return True

    def sample_noise(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Generator]:
        """Fixed-seed noise for validation samples (the same every time, on every rank)."""
        generator = torch.Generator().manual_seed(self.cfg.optim.sample_seed)
        noise = torch.randn(like.shape, generator=generator).to(like.device, like.dtype)
        return noise, generator

    # -- timing ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def timed(self, out: dict):
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        self._step_times.append(dt)
        out["perf/step_time_s"] = dt
        out["perf/samples_per_s"] = self.cfg.optim.batch_size * self.world / dt
        out["perf/peak_memory_mb"] = peak_memory_mb(self.device)

    def stats(self) -> dict:
        """Summary numbers for result.json (the benchmark reads them): median step time without
        the first (warm-up) step, peak memory of the busiest worker."""
        times = self._step_times[1:] or self._step_times
        peak = torch.tensor([peak_memory_mb(self.device)], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        out = {"stats/peak_memory_mb_per_worker": float(peak)}
        if self._param_bytes:
            out["stats/param_bytes_per_worker"] = float(self._param_bytes)
        if times:
            median = float(np.median(times))
            out["stats/step_time_s"] = median
            out["stats/samples_per_s"] = self.cfg.optim.batch_size * self.world / median
        return out

    def count_memory(self, *modules: nn.Module) -> None:
        """Record the bytes of distinct parameter storages this worker holds (result.json stats)."""
        from w2svd.models.base import count_parameter_bytes

        self._param_bytes = count_parameter_bytes(*modules)

    def finish(self, trained: list[Trained]) -> None:
        import ray.train

        # The final numbers (also after an export-only or stopped run, which write no checkpoint).
        ray.train.report({"step": self.step, **self.stats()})
        self.tracker.close()
        for t in trained:
            t.engine.destroy()  # ZeRO-3 may abort at interpreter exit without it

    # -- export ------------------------------------------------------------------------------
    def export(self, write: Callable[[Path], None], modules: list[nn.Module]) -> None:
        """Gather ``modules`` (a no-op below ZeRO-3), let rank 0 ``write`` the export folder
        locally, then copy it to ``RUN_DIR/export``."""
        import deepspeed

        params = [p for m in modules for p in m.parameters()]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if self.rank == 0:
                with tempfile.TemporaryDirectory(prefix="w2svd-export-") as tmp:
                    write(Path(tmp))
                    upload_folder(Path(tmp), storage.join(self.run_dir, EXPORT_DIR), self.options)
                print(f"[w2svd] exported generator to {storage.join(self.run_dir, EXPORT_DIR)}")
        if self.world > 1:
            dist.barrier()


def upload_folder(local: Path, uri: str, options) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.write_bytes(storage.join(uri, path.relative_to(local).as_posix()), path.read_bytes(), options)


# ---------------------------------------------------------------------------------------------
# MLflow (rank 0)


class Tracker:
    """MLflow logging from rank 0 only; a no-op elsewhere or without a tracking URI."""

    def __init__(self, run_id: str | None, uri: str | None, cfg: Config):
        self.active = bool(run_id and uri)
        self.cfg = cfg
        if not self.active:
            return
        import mlflow

        mlflow.set_tracking_uri(uri)
        if cfg.tracking.system_metrics:
            mlflow.set_system_metrics_sampling_interval(2)
        self._mlflow = mlflow
        self._run = mlflow.start_run(run_id=run_id, log_system_metrics=cfg.tracking.system_metrics)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.active:
            clean = {k: float(v) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and np.isfinite(v)}
            self._mlflow.log_metrics(clean, step=step)

    def tag(self, key: str, value: str) -> None:
        if self.active:
            self._mlflow.set_tag(key, value[:5000])

    def log_video(self, video_THWC: np.ndarray, fps: float, step: int, label: str | None = None) -> None:
        if not self.active:
            return
        from w2svd.data.video import encode_video

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"step_{step:06d}.mp4"
            path.write_bytes(encode_video(video_THWC, fps))
            self._mlflow.log_artifact(str(path), artifact_path="samples")
            if label:
                self._mlflow.set_tag("samples.decoder", label)

    def close(self) -> None:
        if self.active:
            self._mlflow.end_run()
            self.active = False


def decode_samples(cfg: Config, latents_BCTHW: torch.Tensor) -> tuple[np.ndarray, str]:
    """Latents → uint8 clips ``[B, T, H, W, 3]`` and how they were made: decoded by the config's
    VAE, or — when that fails — the first latent channel in grey (labelled, never passed off as video)."""
    latents = latents_BCTHW.detach().float().cpu()
    try:
        from w2svd.models.encoders import decode_latents

        video = decode_latents(cfg, latents).float().cpu()  # [B, 3, T, H, W] in [-1, 1]
        label = "vae"
    except Exception as err:  # noqa: BLE001 - a sample video must not end a training run
        print(f"[w2svd] VAE decode of validation samples failed ({err}); logging latent channel 0 in grey")
        x = latents[:, :1]
        lo, hi = x.amin(), x.amax()
        video = ((x - lo) / (hi - lo + 1e-8) * 2 - 1).repeat(1, 3, 1, 1, 1)
        if min(video.shape[-2:]) < 16:  # so players show something
            b, c, t, h, w = video.shape
            video = torch.nn.functional.interpolate(video.reshape(b, c * t, h, w), scale_factor=8, mode="nearest")
            video = video.reshape(b, c, t, h * 8, w * 8)
        label = "latent-channel-0-grey"
    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [B, 3, T, H, W]
    return frames.permute(0, 2, 3, 4, 1).contiguous().numpy(), label


def video_strip(clips_BTHWC: np.ndarray) -> np.ndarray:
    """Clips side by side in one ``[T, H, B·W, 3]`` video, cropped to even sizes (H.264)."""
    strip = np.concatenate(list(clips_BTHWC), axis=2)
    h, w = strip.shape[1] - strip.shape[1] % 2, strip.shape[2] - strip.shape[2] % 2
    return np.ascontiguousarray(strip[:, :h, :w])


def quick_metrics(clips_BTHWC: np.ndarray, fps: float) -> dict[str, float]:
    """The evaluation module's quick (network-free) VBench-style scores of the samples, named
    ``quick/<dimension>`` (offline proxies; not comparable with published VBench numbers)."""
    try:
        from w2svd.metrics.vbench import vbench_report

        report = vbench_report(clips_BTHWC, fps=fps)
    except Exception as err:  # noqa: BLE001 - a metric must not end a training run
        print(f"[w2svd] quick metrics of the samples failed: {err}")
        return {}
    return {f"quick/{name}": float(r["value"]) for name, r in report.items()}


# ---------------------------------------------------------------------------------------------
# Synthetic data


def write_synthetic_latents(uri: str, cfg: Config, clips_per_bucket: int = 8, rows_per_shard: int = 4,
                            seed: int = 0) -> str:
    """Synthetic latent shards (SHARD_SCHEMA) for every bucket of ``cfg`` under ``uri``: the
    tests' and benchmark's stand-in for a pre-encode output (any model size, no VAE needed).

    Latents are smooth per-clip patterns plus noise (not white noise), so a flow-matching model
    has structure to learn; text/pooled embeddings are fixed per clip.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from w2svd.data import shards

    arch, g = cfg.model.arch, torch.Generator().manual_seed(seed)
    rows = []
    for bucket in cfg.data.buckets:
        t, h, w = (bucket.frames - 1) // 4 + 1, bucket.height // 8, bucket.width // 8  # VAE 4x/8x
        for i in range(clips_per_bucket):
            base = torch.randn(arch.in_channels, 1, 1, 1, generator=g)
            ramp = torch.linspace(-1, 1, h).view(1, 1, h, 1) * torch.randn(arch.in_channels, 1, 1, 1, generator=g)
            latent = (base + ramp + 0.3 * torch.randn(arch.in_channels, t, h, w, generator=g)).expand(-1, t, h, w)
            text = torch.randn(cfg.model.text_max_length, arch.text_embed_dim, generator=g)
            mask = torch.ones(cfg.model.text_max_length, dtype=torch.bool)
            pooled = torch.randn(arch.pooled_projection_dim, generator=g)
            lb, ls, ld = shards.tensor_to_bytes(latent.contiguous())
            tb, ts, _ = shards.tensor_to_bytes(text)
            mb, _, _ = shards.tensor_to_bytes(mask)
            pb, ps, _ = shards.tensor_to_bytes(pooled)
            rows.append({"clip_id": f"{bucket.name}-{i:03d}", "source_uri": f"synthetic://{bucket.name}/{i}",
                         "caption": f"a person talking, clip {i}", "bucket": bucket.name, "frames": bucket.frames,
                         "height": bucket.height, "width": bucket.width, "latent": lb, "latent_shape": ls,
                         "latent_dtype": ld, "text": tb, "text_shape": ts, "text_mask": mb, "pooled": pb,
                         "pooled_shape": ps, "image_latent": None, "image_latent_shape": None,
                         "vae_id": "tiny-random", "text_encoder_id": "tiny-random",
                         "content_hash": f"{bucket.name}{i}", "factors": "{}"})
    for start in range(0, len(rows), rows_per_shard):
        table = pa.Table.from_pylist(rows[start:start + rows_per_shard], schema=shards.SHARD_SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        storage.write_bytes(storage.join(uri, shards.SHARDS_DIR, f"shard-{start // rows_per_shard:04d}.parquet"),
                            sink.getvalue().to_pybytes())
    return uri
