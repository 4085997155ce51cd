"""Training health: decide, from one step's numbers, whether to go on, roll back or stop.

    monitor = HealthMonitor.from_config(cfg.health)
    decision = monitor.check(step, {"critic/loss": 0.4, "gen/sample_std": 0.9, "data/std": 1.0},
                             grad_norms={"critic": 1.2})
    if decision.action == "rollback": ...   # reload the last good checkpoint, lr × decision.lr_scale

Pure Python: the training program feeds it numbers that are already the same on every rank
(all-reduced), so every rank takes the same decision without another collective.

Rules:
  * a NaN/inf loss or gradient norm is a bad step at once: roll back (no patience — a poisoned
    update must never reach a checkpoint);
  * a collapse signal — the generator's sample std relative to the data's leaving
    ``sample_std_band``, or any loss above ``loss_max`` — must persist for ``patience``
    consecutive checks before a rollback (single noisy steps are normal);
  * after ``max_rollbacks`` rollbacks the next bad step stops the run with the reason.
Each rollback multiplies the learning rates by ``lr_decay_on_rollback`` (cumulatively).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

Action = Literal["ok", "rollback", "stop"]

# The metric pairs that form the collapse signal: generator sample std over the data's std.
SAMPLE_STD_KEY = "gen/sample_std"
DATA_STD_KEY = "data/std"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""
    # Multiplier of the configured learning rates to use from now on (after this decision).
    lr_scale: float = 1.0

    @property
    def ok(self) -> bool:
        return self.action == "ok"


@dataclass
class HealthState:
    """What must survive a rollback or a restart (it travels in the checkpoint / run dir)."""

    rollbacks: int = 0
    out_of_band: int = 0
    history: list[str] = field(default_factory=list)


class HealthMonitor:
    def __init__(self, *, enabled: bool = True, patience: int = 3, max_rollbacks: int = 2,
                 lr_decay_on_rollback: float = 0.5, sample_std_band: tuple[float, float] = (0.2, 5.0),
                 loss_max: float = 1e4, state: HealthState | None = None):
        if patience < 1:
            raise ValueError(f"health.patience = {patience} must be >= 1")
        if not 0.0 < lr_decay_on_rollback <= 1.0:
            raise ValueError(f"health.lr_decay_on_rollback = {lr_decay_on_rollback} must lie in (0, 1]")
        self.enabled = enabled
        self.patience = patience
        self.max_rollbacks = max_rollbacks
        self.lr_decay = lr_decay_on_rollback
        self.band = (float(sample_std_band[0]), float(sample_std_band[1]))
        self.loss_max = loss_max
        self.state = state or HealthState()

    @classmethod
    def from_config(cls, health_cfg, state: HealthState | None = None) -> HealthMonitor:
        h = health_cfg
        return cls(enabled=h.enabled, patience=h.patience, max_rollbacks=h.max_rollbacks,
                   lr_decay_on_rollback=h.lr_decay_on_rollback, sample_std_band=tuple(h.sample_std_band),
                   loss_max=h.loss_max, state=state)

    @property
    def lr_scale(self) -> float:
        return self.lr_decay ** self.state.rollbacks

    def check(self, step: int, metrics: dict[str, float], grad_norms: dict[str, float] | None = None) -> Decision:
        """The decision for ``step``; a rollback is counted here (the caller must carry it out)."""
        if not self.enabled:
            return Decision("ok", lr_scale=self.lr_scale)
        values = {**metrics, **{f"grad_norm/{k}": v for k, v in (grad_norms or {}).items()}}
        bad = sorted(k for k, v in values.items() if v is not None and not math.isfinite(float(v)))
        if bad:
            return self._bad(step, f"non-finite {', '.join(f'{k}={values[k]}' for k in bad)}")

        signals = self._collapse_signals(metrics)
        if not signals:
            self.state.out_of_band = 0
            return Decision("ok", lr_scale=self.lr_scale)
        self.state.out_of_band += 1
        if self.state.out_of_band < self.patience:
            return Decision("ok", f"out of band ({self.state.out_of_band}/{self.patience}): {signals}",
                            lr_scale=self.lr_scale)
        return self._bad(step, f"collapse signal for {self.patience} consecutive checks: {signals}")

    def _collapse_signals(self, metrics: dict[str, float]) -> str:
        out = []
        if SAMPLE_STD_KEY in metrics and metrics.get(DATA_STD_KEY, 0.0) > 0:
            ratio = metrics[SAMPLE_STD_KEY] / metrics[DATA_STD_KEY]
            if not self.band[0] <= ratio <= self.band[1]:
                out.append(f"generator sample std / data std = {ratio:.3g} outside {list(self.band)}")
        for key, value in sorted(metrics.items()):
            if "loss" in key and value > self.loss_max:
                out.append(f"{key} = {value:.3g} > health.loss_max = {self.loss_max:g}")
        return "; ".join(out)

    def _bad(self, step: int, why: str) -> Decision:
        self.state.out_of_band = 0
        if self.state.rollbacks >= self.max_rollbacks:
            reason = (f"step {step}: {why}; stopping after {self.state.rollbacks} rollback(s) "
                      f"(health.max_rollbacks = {self.max_rollbacks}). The last checkpoint is the last good one.")
            self.state.history.append(reason)
            return Decision("stop", reason, lr_scale=self.lr_scale)
        self.state.rollbacks += 1
        reason = (f"step {step}: {why}; rolling back to the last good checkpoint with learning rates "
                  f"x{self.lr_scale:g} (rollback {self.state.rollbacks} of {self.max_rollbacks})")
        self.state.history.append(reason)
        return Decision("rollback", reason, lr_scale=self.lr_scale)

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = HealthState(**state)
