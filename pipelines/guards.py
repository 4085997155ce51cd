"""The guards of one training worker: the health monitor and the drift guard, and what they do.

Both read training quantities only (never the metric a benchmark reports), reduced over ranks
so every rank takes the same decision without another collective:

* the health monitor (``w2svd/health.py``) every step: NaN/inf, the generator's sample std
  against the data's, exploding losses;
* the drift guard (``w2svd/drift.py``) every ``health.drift_every`` steps (null: every 5 generator
  updates), on generator samples of the last ``health.drift_window`` batches' conditions against
  those batches (drawn from a stream of their own, so watching a run never changes it), logged
  as ``guard/signal`` and, check by check, in ``RUN_DIR/drift.json``.

A rollback is recorded in ``RUN_DIR/health.json`` and raised on every rank
(``RollbackRequested``): Ray Train restarts the worker group, which resumes from the newest
checkpoint written in band at the lowered rate. A stop is recorded there too and ends the loop
cleanly; after a drift stop the loop loads the checkpoint with the best drift signal and exports
it (``WorkerSession.restore_best_by_drift``), and the driver names that checkpoint.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import numpy as np
import torch

from pipelines.collectives import all_reduce, barrier
from pipelines.tracking import Tracker
from w2svd.config import Config
from w2svd.data import storage
from w2svd.drift import DriftGuard, check_interval
from w2svd.health import HealthMonitor, HealthState

HEALTH_FILE = "health.json"
DRIFT_FILE = "drift.json"  # the guard's trace ([step, value, signal] per check), band and firing


class RollbackRequested(RuntimeError):
    """Raised on every rank to make Ray Train restart the group from the last in-band checkpoint."""


class Guards:
    def __init__(self, cfg: Config, run_dir: str, options: storage.StorageOptions, rank: int, world: int,
                 tracker: Tracker):
        self.cfg, self.run_dir, self.options, self.rank, self.world = cfg, run_dir, options, rank, world
        self.tracker = tracker
        recorded = storage.read_json(storage.join(run_dir, HEALTH_FILE), options) or {}
        fields = HealthState.__dataclass_fields__
        self.health = HealthMonitor.from_config(cfg.health, HealthState(**{k: v for k, v in recorded.items()
                                                                          if k in fields}))
        self.drift = DriftGuard.from_config(cfg.health, rows_per_batch=cfg.optim.batch_size)
        self.every = check_interval(cfg.health.drift_every, cfg.method.gen_update_every)
        # Written at a drift rollback, stop or log-only firing.
        self._recorded_drift = recorded.get("drift")
        if self._recorded_drift:
            self.drift.load_state_dict(self._recorded_drift)
        self.in_band = True
        self._drift_in_band = True
        # "health" or "drift" once a guard has stopped the run: a drift stop exports the best state.
        self.stopped_by: str | None = None

    @property
    def lr_scale(self) -> float:
        """Every rollback so far, health's and drift's, lowers the rates."""
        return self.health.lr_scale * self.drift.lr_scale

    def load_checkpoint_state(self, state: dict) -> None:
        """The checkpoint's guard state, unless health.json's is newer (more checks): a rollback
        resumes from a checkpoint older than the firing it recorded, while a log-only firing is
        recorded once and every later checkpoint carries the guard further."""
        saved, recorded = state.get("drift"), self._recorded_drift
        if saved and (not recorded or saved.get("checks", 0) > recorded.get("checks", 0)):
            self.drift.load_state_dict(saved)

    def state_dict(self) -> dict:
        return {"health": self.health.state_dict(), "drift": self.drift.state_dict(),
                "drift_signal": self.drift.signal}

    # -- reduce and decide ---------------------------------------------------------------------
    def reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        """Mean over ranks (a NaN anywhere makes it NaN everywhere: every rank decides alike)."""
        if self.world == 1 or not metrics:
            return dict(metrics)
        keys = sorted(metrics)
        values = all_reduce(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64))
        return {k: float(v) / self.world for k, v in zip(keys, values.tolist(), strict=True)}

    def finite_before_update(self, step: int, metrics: dict[str, float]) -> bool:
        """Losses of this step on every rank are finite, so the update may land. Otherwise roll
        back (raises) or stop (False) before any optimizer steps on them."""
        reduced = self.reduce(metrics)
        if all(np.isfinite(v) for v in reduced.values()):
            return True
        return self.check(step, reduced)

    def check(self, step: int, metrics: dict[str, float], grad_norms: dict[str, float] | None = None) -> bool:
        """The health check of reduced numbers, and the drift check when due; False: stop now."""
        decision = self.health.check(step, metrics, grad_norms)
        self.in_band = decision.ok and not decision.reason and self._drift_in_band
        if not decision.ok:
            return self._act(decision, "health")
        if self.drift.enabled and step % self.every == 0:
            value = self.reduce({"v": self.drift.value()})["v"]
            drift = self.drift.decide(step, value)
            # Out of band counts against a checkpoint only where the guard acts on it: otherwise a
            # log-only guard, or one still in warmup, would leave a killed run nothing to resume.
            self._drift_in_band = drift.in_band or not self.drift.judges
            self.in_band = self.in_band and self._drift_in_band
            if math.isfinite(drift.signal):
                self.tracker.log({"guard/signal": drift.signal, "guard/value": value}, step)
                self._write_trace()
            if drift.action != "ok":
                return self._act(drift, "drift")
            if self.drift.action == "log" and self.drift.fired_at == step:
                self._record(drift, "drift")  # log-only: visible in stderr, MLflow and health.json
        return True

    def _write_trace(self) -> None:
        if self.rank == 0:
            d = self.drift
            storage.write_json(storage.join(self.run_dir, DRIFT_FILE),
                               {"signal": d.kind, "every": self.every, "rise": d.rise, "margin": d.margin,
                                "best": d.state.best, "fired_at": d.fired_at, "trace": d.state.trace}, self.options)

    def _record(self, decision, source: str) -> None:
        state = {**self.health.state_dict(), "lr_scale": self.lr_scale, "drift": self.drift.state_dict()}
        if decision.action == "stop":
            state["stopped"], state["stopped_by"] = decision.reason, source
        if self.rank == 0:
            print(f"[w2svd] {source}: {decision.reason}", file=sys.stderr, flush=True)
            storage.write_json(storage.join(self.run_dir, HEALTH_FILE), state, self.options)
            self.tracker.tag(source, decision.reason)
        barrier()  # health.json is written before any rank leaves

    def _act(self, decision, source: str) -> bool:
        self._record(decision, source)
        if decision.action == "rollback":
            raise RollbackRequested(decision.reason)
        self.stopped_by = source
        return False

    # -- what the drift guard watches ----------------------------------------------------------
    def observe(self, step: int, metrics: dict[str, float], data_x: torch.Tensor, cond_x: torch.Tensor | None,
                sample: Callable[[torch.Generator], torch.Tensor]) -> None:
        """This step's training numbers, and in the ``drift_window`` steps before a check of the
        ``proj_gap`` signal generator samples of the batch's conditions (``sample(generator)``,
        from the guard's own stream) beside the batch."""
        if not self.drift.enabled:
            return
        self.drift.observe(metrics)
        steps_to_check = -(step + 1) % self.every  # the check after this step's update is at step + 1
        if self.drift.kind == "proj_gap" and steps_to_check < self.cfg.health.drift_window:
            g = torch.Generator().manual_seed(self.cfg.optim.seed + 7919 * (self.rank + 1) + step)
            with torch.no_grad():
                self.drift.observe({}, gen_x=sample(g), data_x=data_x, cond_x=cond_x)
