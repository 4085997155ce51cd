"""What a ``train_loop_per_worker`` holds besides its model: the worker session.

``WorkerSession`` carries rank, device, RNG, the latent stream, checkpoint save and restore, the
health guard and the tracker, so the loops in finetune.py and distill.py read top to bottom.

Rollback and stop decisions are the guards' (``pipelines/guards.py``): a bad step is never
stepped into a checkpoint, and a restarted worker group resumes from the newest checkpoint
written in band, at the learning-rate scale ``RUN_DIR/health.json`` records.
"""

from __future__ import annotations

import contextlib
import json
import random
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipelines import checkpoint, faults
from pipelines.collectives import all_reduce, barrier
from pipelines.engines import Trained, make_engine
from pipelines.guards import Guards
from pipelines.latent_stream import Batch, LatentStream
from pipelines.tracking import Tracker
from w2svd.config import Config, from_dict, to_yaml
from w2svd.config_checks import validate
from w2svd.data import storage
from w2svd.models.base import Cond
from w2svd.previews import VAE_LABEL, decode_samples, quick_metrics, video_strip

EXPORT_DIR = "export"
# Written into the export by the worker that exported it: which state it holds ("drift": the best
# by the drift guard's signal after a drift stop; "last": the state at the last step), and its step.
EXPORT_MARKER = "w2svd_export.json"
TRAIN_NAME = "train"  # Ray Train's experiment folder inside the run dir


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
    guards: Guards
    tracker: Tracker
    step: int = 0
    data_position: int = 0
    resumed: bool = False
    export_only: bool = False
    # What the export holds (its marker's kept_by): "last" (the last step), "drift" (the checkpoint
    # with the best drift signal, after a drift stop), "drift-at-stop" (a drift stop before any
    # checkpoint recorded the signal: the state at the stop).
    export_kept_by: str = "last"
    # The checkpoint this run resumes from (the newest written in band) and its state.json.
    resume_uri: str | None = None
    resume_state: dict | None = None
    _stream: LatentStream | None = None
    _batches: object = None
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
        options, run = config["storage_options"], config["run_dir"]
        tracker = Tracker(config.get("mlflow_run_id") if rank == 0 else None, config.get("tracking_uri"),
                          cfg.tracking.system_metrics)
        guards = Guards(cfg, run, options, rank, world, tracker)
        # The run's random stream lives on the CPU: its state is what a checkpoint stores, and
        # every draw moves its numbers to the device (w2svd/rng.py).
        session = cls(cfg, run, options, rank, world, device, torch.Generator().manual_seed(seed), guards, tracker,
                      export_only=bool(config.get("export_only")))
        session._find_resume_point()
        return session

    def _find_resume_point(self) -> None:
        import ray.train

        if ray.train.get_checkpoint() is None:
            return
        uri = checkpoint.newest_in_band(storage.join(self.run_dir, TRAIN_NAME), self.options)
        if uri is None:
            raise RuntimeError(f"no checkpoint of {self.run_dir} was written in band; start a new run dir")
        self.resume_uri = uri
        self.resume_state = storage.read_json(storage.join(uri, checkpoint.STATE_FILE), self.options)

    @property
    def reshaped(self) -> bool:
        """True when resuming from a checkpoint written by another number of workers."""
        return self.resume_state is not None and self.resume_state.get("world_size", self.world) != self.world

    def engine(self, name: str, modules: list[nn.Module], groups: list[tuple[list[nn.Parameter], float]],
               betas: list[float] | None = None) -> Trained:
        """``engines.make_engine`` for this run (loading universal checkpoints when reshaped)."""
        return make_engine(name, modules, groups, self.cfg, load_universal=self.reshaped, betas=betas)

    # -- data --------------------------------------------------------------------------------
    def batches(self):
        """This rank's endless batch stream (with the ``debug`` section's faults, if any)."""
        import ray.train

        if self._stream is None:
            shard = ray.train.get_dataset_shard("train")
            self._stream = LatentStream(shard, self.cfg.optim.batch_size, self.rank, self.world, self.device,
                                        position=self.data_position)
            self._batches = faults.inject(self._stream, self.cfg.debug, step=lambda: self.step, rank=self.rank,
                                          world=self.world, resumed=self.resumed,
                                          rollbacks=self.guards.health.state.rollbacks)
        return self._batches

    def fixed_samples(self) -> Batch:
        """The validation prompts: the first ``sample_count`` clips of this rank's stream, kept in
        the checkpoint so a resumed run samples the same prompts without re-reading the data."""
        if self._samples is None:
            self.batches()
            first = self._stream.first
            if first is None:
                raise RuntimeError("fixed_samples() is available after the first batch was read")
            n = min(self.cfg.optim.sample_count, first.x.shape[0])
            self._samples = Batch(first.x[:n], first.cond.index(slice(0, n)), first.bucket)
        return self._samples

    @property
    def total_steps(self) -> int:
        return self.step if self.export_only else self.cfg.optim.steps

    # -- checkpoints -------------------------------------------------------------------------
    def restore(self, trained: list[Trained], extra: dict[str, nn.Module] | None = None, ema=None) -> None:
        """Resume from the newest checkpoint written in band, if the run has one: engines
        (checked parameter by parameter), step, RNG, data position, samples and EMA."""
        if self.resume_uri is None:
            self._apply_lr(trained)
            return
        saved = self._load(self.resume_uri, trained, extra, ema)
        self.guards.load_checkpoint_state(saved.state)
        self.data_position, self.resumed = saved.state["data_position"], True
        self._apply_lr(trained)
        if self.rank == 0:
            print(f"[w2svd] resumed from {self.resume_uri} at step {self.step} (lr scale {self.guards.lr_scale:g})",
                  flush=True)

    def restore_best_by_drift(self, trained: list[Trained], extra: dict[str, nn.Module] | None = None,
                              ema=None) -> bool:
        """After the drift guard stopped the run: load the checkpoint with the best drift signal
        (every rank), the state the guard keeps, so that it is what gets exported; where no
        checkpoint recorded a signal yet, the state at the stop is exported, and said so. False
        when the stop was not the drift guard's."""
        if self.guards.stopped_by != "drift":
            return False
        uri = checkpoint.best_by_drift(storage.join(self.run_dir, TRAIN_NAME), self.options)
        if uri is None:
            self.export_kept_by = "drift-at-stop"
            if self.rank == 0:
                print(f"[w2svd] warning: the drift guard stopped the run at step {self.step}, before any checkpoint "
                      f"recorded its signal (optim.checkpoint_every = {self.cfg.optim.checkpoint_every}): exporting "
                      "the state at the stop, not the best one", file=sys.stderr, flush=True)
            return True
        self.export_kept_by = "drift"
        self._load(uri, trained, extra, ema)
        if self.rank == 0:
            print(f"[w2svd] drift stop: exporting the best state by the drift signal, {uri} (step {self.step})",
                  flush=True)
        return True

    def _load(self, uri: str, trained: list[Trained], extra: dict[str, nn.Module] | None, ema) -> checkpoint.Saved:
        """Engines, RNG, fixed samples, EMA and step from the checkpoint at ``uri``."""
        import ray.train

        fs, path = storage.filesystem(uri, self.options)
        with ray.train.Checkpoint(path, filesystem=fs).as_directory() as folder:
            saved = checkpoint.read(Path(folder), trained, self.rank, self.rng, self.device, extra or {}, self.world)
        if saved.samples is not None:
            self._samples = Batch(saved.samples["x"].to(self.device), Cond(**saved.samples["cond"]).to(self.device),
                                  saved.samples["bucket"])
        if ema is not None and saved.ema is not None:
            ema.load_shares(saved.ema) if self.reshaped else ema.load_state_dict(saved.ema)
        self.step = saved.state["step"]
        return saved

    def _apply_lr(self, trained: list[Trained]) -> None:
        for t in trained:
            t.set_lr_scale(self.guards.lr_scale)

    def save(self, trained: list[Trained], metrics: dict, extra: dict[str, nn.Module] | None = None,
             ema=None) -> None:
        """Checkpoint every trained role, step, RNG, data position, samples and EMA; every rank
        writes its files and Ray Train merges them into ``checkpoint_step<NNNNNNNN>``."""
        import ray.train

        checkpoint.check_finite(trained, self.step)  # a poisoned weight must never reach storage
        state = {"step": self.step, "data_position": self._stream.position, "in_band": self.guards.in_band,
                 "world_size": self.world, **self.guards.state_dict(),
                 "roles": [t.name for t in trained], "fingerprints": checkpoint.fingerprints(trained)}
        fixed = self.fixed_samples()
        samples = {"x": fixed.x.cpu(), "cond": fixed.cond.to("cpu").__dict__, "bucket": fixed.bucket}
        tmp = Path(tempfile.mkdtemp(prefix="w2svd-ckpt-"))
        try:
            checkpoint.write(tmp, trained, self.rank, state, checkpoint.rng_states(self.rng, self.device), samples,
                             extra or {}, None if ema is None else ema.state_dict(), to_yaml(self.cfg))
            # Ray Train ranks a checkpoint by rank 0's metrics only: the other ranks skip the reads.
            keep = {checkpoint.KEEP_RANK: checkpoint.rank_for_keeping(storage.join(self.run_dir, TRAIN_NAME),
                                                                      self.options, self.step,
                                                                      self.guards.drift.signal)} if self.rank == 0 else {}
            ray.train.report({**metrics, "step": self.step, **self.stats(), **keep},
                             checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                             checkpoint_dir_name=checkpoint.dir_name(self.step))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def checkpoint_due(self) -> bool:
        return self.step % self.cfg.optim.checkpoint_every == 0 or self.step == self.total_steps

    # -- health ------------------------------------------------------------------------------
    def healthy_before_update(self, metrics: dict[str, float]) -> bool:
        """The losses of this step are finite on every rank, so its update may land (else the
        guards roll back, raising, or stop: False)."""
        return self.guards.finite_before_update(self.step, metrics)

    def after_step(self, metrics: dict[str, float], grad_norms: dict[str, float], trained: list[Trained],
                   sample: Callable[[], torch.Tensor] | None = None, extra: dict[str, nn.Module] | None = None,
                   ema=None) -> bool:
        """Count the step, then: health check, log (rank 0), previews and checkpoint when due.
        Returns False when the health check stopped the run."""
        self.step += 1
        metrics = self.guards.reduce(metrics)
        if not self.guards.check(self.step, metrics, grad_norms):
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
            self.log_previews(sample)
        if self.checkpoint_due():
            self.save(trained, logged, extra, ema)
        return True

    def log_previews(self, sample: Callable[[], torch.Tensor]) -> None:
        latents = sample()  # every rank: ZeRO-3 gathers weights collectively
        if self.rank == 0 and self.tracker.active:
            clips, label = decode_samples(self.cfg, latents)
            self.tracker.log_video(video_strip(clips), self.cfg.data.fps, self.step, label)
            if label == VAE_LABEL:
                self.tracker.log(quick_metrics(clips, self.cfg.data.fps), self.step)

    def previews_of(self, view, settings, applied=contextlib.nullcontext) -> Callable[[], torch.Tensor]:
        """The validation sampler of a training run: ``view`` (the generator role) sampled with the
        export's ``settings`` on the fixed prompts, from fixed-seed noise (the same every time, on
        every rank), inside ``applied()`` (the EMA weights, when kept)."""
        from w2svd import rng
        from w2svd.export import sample_latents

        def sample() -> torch.Tensor:
            fixed = self.fixed_samples()
            generator = torch.Generator().manual_seed(self.cfg.optim.sample_seed)
            noise = rng.randn(fixed.x.shape, generator, fixed.x.device, fixed.x.dtype)
            with applied():
                return sample_latents(view, settings, fixed.cond, noise, generator)

        return sample

    # -- timing and memory -------------------------------------------------------------------
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
        import torch.distributed as dist

        times = self._step_times[1:] or self._step_times
        peak = all_reduce(torch.tensor([peak_memory_mb(self.device)], dtype=torch.float64), dist.ReduceOp.MAX)
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
            t.destroy()

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
                    (Path(tmp) / EXPORT_MARKER).write_text(json.dumps({"step": self.step,
                                                                        "kept_by": self.export_kept_by}))
                    storage.upload_folder(Path(tmp), storage.join(self.run_dir, EXPORT_DIR), self.options)
                print(f"[w2svd] exported generator to {storage.join(self.run_dir, EXPORT_DIR)}", flush=True)
        barrier()
