"""A guard that sees a distillation run drift, from training quantities only.

DMD-family students typically improve for a while and then drift back (the fake score stops
tracking the generator). The reported metric must never steer training, so the guard reads only
what training produces anyway, reduced to one number per check (``SIGNALS``):

    proj_gap     sliced Wasserstein-1 between generator samples and the data batch (each beside
                 its condition) on a fixed random projection, over the data's projected std
    disc_acc     the discriminator head's accuracy on real vs generated batches
    score_gap    the size of the normalised DMD gradient, mean |x0_fake − x0_real| / mean |x̂ − x0_real|
    critic_loss  the fake score's flow-matching loss

and fires when the smoothed signal leaves a band above its running best for ``patience``
consecutive checks. Then the run either rolls back to its last in-band state with a lower rate,
or stops and keeps its best state by the signal (``DriftDecision``).

    guard = DriftGuard.from_config(cfg.health, rows_per_batch=cfg.optim.batch_size)
    every = check_interval(cfg.health.drift_every, cfg.method.gen_update_every)
    guard.observe(metrics)                                     # every step: the metric signals
    guard.observe({}, gen_x=samples, data_x=x_gt, cond_x=c)    # proj_gap: the last drift_window batches before a check
    if step % every == 0:
        value = all_reduce_mean(guard.value())                 # every rank decides alike
        decision = guard.decide(step, value)                   # log guard.signal; guard.state.trace keeps it
        if decision.is_best: save the "best" state;  if decision.in_band: save the "last good" state
        if decision.action == "rollback": restore last good, rates × decision.lr_scale
        if decision.action == "stop": restore best, end the run

The proj_gap statistic compares the last ``window`` rows only (``health.drift_window`` batches):
the state of the generator now, not an average over the run, in which a late drift would be a
small fraction of the rows. Pure Python/torch; ``state_dict``/``load_state_dict`` carry everything
a restart needs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

SIGNALS = ("proj_gap", "disc_acc", "score_gap", "critic_loss")
METRIC_OF_SIGNAL = {"disc_acc": "critic/disc_acc", "score_gap": "gen/score_gap",
                    "critic_loss": "critic/flow_matching"}
Action = Literal["ok", "rollback", "stop"]
# What firing does: roll back, stop, or only record it (``fired_at``, the reason) and go on.
ACTIONS = ("rollback", "stop", "log")
# The third round's check interval in generator updates (bench/toy_family_guard.py): its warmup,
# patience and smoothing count checks of this many updates.
GEN_UPDATES_PER_CHECK = 5


def check_interval(drift_every: int | None, gen_update_every: int) -> int:
    """Steps between checks: ``drift_every``, or ``GEN_UPDATES_PER_CHECK × gen_update_every`` when
    unset, so the guard's warmup and patience mean the same training time at any critic ratio."""
    return drift_every or GEN_UPDATES_PER_CHECK * gen_update_every


def earliest_firing_step(every: int, warmup: int, patience: int) -> int:
    """The first step at which the guard can fire: checks run at ``every, 2·every, …``; check ``n``
    may count out of band only when ``n > warmup`` and ``n > 1`` (the first sets the best), and
    firing needs ``patience`` such checks in a row: check ``max(warmup, 1) + patience``."""
    return every * (max(warmup, 1) + patience)


# ---------------------------------------------------------------------------------------------
# The projection statistic


def summarize_BF(x: torch.Tensor, pooled: int = 4, local_std: bool = False) -> torch.Tensor:
    """Flat features ``[B, F]``: ``[B, D]`` as is; video latents ``[B, C, T, H, W]`` average-pooled to
    at most ``pooled × pooled`` per frame first, so the projection stays small at any resolution.

    ``local_std`` appends each pooled cell's standard deviation, ``sqrt(mean(x²) − mean(x)²)``: the
    detail inside a cell (edges, texture) that the average removes, where a sharper or a blurrier
    sample of the same layout differs."""
    if x.dim() <= 3:
        return x.reshape(x.shape[0], -1).float()
    cells = x.flatten(0, -3).float()
    mean = torch.nn.functional.adaptive_avg_pool2d(cells, pooled)
    parts = [mean]  # the plain summary first: local_std only appends
    if local_std:
        parts.append((torch.nn.functional.adaptive_avg_pool2d(cells.pow(2), pooled) - mean.pow(2)).clamp_min(0).sqrt())
    return torch.cat([part.reshape(x.shape[0], -1) for part in parts], dim=1)


def random_projection_FK(features: int, k: int, seed: int = 0) -> torch.Tensor:
    """``k`` orthonormal directions in feature space, fixed by ``seed`` (CPU stream: same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    q_FK, _ = torch.linalg.qr(torch.randn(features, k, generator=g))
    return q_FK


def sliced_w1(a_NK: torch.Tensor, b_MK: torch.Tensor) -> float:
    """``mean_k ∫₀¹ |F_a,k⁻¹(u) − F_b,k⁻¹(u)| du``: Wasserstein-1 per projected direction, averaged.

    Empirical quantile functions on a common grid of ``max(N, M)`` midpoints ``u = (i + ½)/n``.
    """
    n = max(a_NK.shape[0], b_MK.shape[0])
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n

    def quantiles(x_NK: torch.Tensor) -> torch.Tensor:
        return torch.quantile(x_NK.double(), u, dim=0, interpolation="linear")

    return float((quantiles(a_NK) - quantiles(b_MK)).abs().mean())


def joint_features(x: torch.Tensor, cond_x: torch.Tensor | None, scale_x: float, scale_c: float,
                   local_std: bool = False) -> torch.Tensor:
    """``[x/scale_x, c/scale_c]``: a sample beside its condition, each part in units of its own scale,
    so that random directions mix both and the statistic sees conditionals, not only the marginal."""
    parts = [summarize_BF(x, local_std=local_std) / scale_x]
    if cond_x is not None:
        parts.append(summarize_BF(cond_x) / scale_c)
    return torch.cat(parts, dim=1)


def projected_gap(gen_NK: torch.Tensor, data_MK: torch.Tensor) -> float:
    """``SW1(gen, data) / mean_k std(data_k)`` of projected samples: scale-free, 0 when the laws agree."""
    return sliced_w1(gen_NK, data_MK) / float(data_MK.double().std(0).mean().clamp_min(1e-12))


# ---------------------------------------------------------------------------------------------
# The guard


@dataclass(frozen=True)
class DriftDecision:
    action: Action
    reason: str = ""
    lr_scale: float = 1.0
    signal: float = math.nan
    # This check's state is the best so far by the signal (keep it for "stop").
    is_best: bool = False
    # This check's state is inside the band (a rollback target).
    in_band: bool = True


@dataclass
class DriftState:
    checks: int = 0
    signal: float | None = None
    best: float | None = None
    out_of_band: int = 0
    rollbacks: int = 0
    fired_at: int | None = None
    # Per-step accumulation since the last check.
    sum_value: float = 0.0
    count: int = 0
    scale_x: float | None = None
    scale_c: float | None = None
    gen_proj: list = field(default_factory=list)
    data_proj: list = field(default_factory=list)
    history: list = field(default_factory=list)
    # [step, value, smoothed signal] of every check: the curve the band is judged on.
    trace: list = field(default_factory=list)


class DriftGuard:
    """Fires when ``signal > best·(1 + rise) + margin`` for ``patience`` checks after ``warmup`` checks.

    signal: the smoothed value, ``s_t = smoothing·s_{t−1} + (1 − smoothing)·v_t``; best: its running
    minimum. All four signals grow when the generator drifts away from the data.
    action: "rollback" (up to ``max_rollbacks`` times, rate × ``lr_decay`` each, then "stop"), "stop",
    or "log" (record ``fired_at`` and the reason, change nothing).
    window: projected rows of each side the proj_gap value compares (the newest ones).
    """

    def __init__(self, *, signal: str = "proj_gap", rise: float = 0.5, margin: float = 0.0, patience: int = 3,
                 warmup: int = 5, smoothing: float = 0.5, action: str = "stop", max_rollbacks: int = 2,
                 lr_decay: float = 0.5, projections: int = 16, window: int = 1024, seed: int = 0,
                 enabled: bool = True):
        if signal not in SIGNALS:
            raise ValueError(f"drift signal {signal!r}; choose one of {list(SIGNALS)}")
        if action not in ACTIONS:
            raise ValueError(f"drift action {action!r}; choose one of {list(ACTIONS)}")
        if rise < 0 or margin < 0 or patience < 1 or warmup < 0 or not 0 <= smoothing < 1:
            raise ValueError("drift guard: rise, margin >= 0, patience >= 1, warmup >= 0, smoothing in [0, 1)")
        if not 0 < lr_decay <= 1:
            raise ValueError(f"drift lr_decay {lr_decay} must lie in (0, 1]")
        if window < 2:
            raise ValueError(f"drift window {window}: the projected statistic needs at least 2 rows a side")
        self.kind, self.rise, self.margin, self.patience = signal, rise, margin, patience
        self.warmup, self.smoothing, self.action = warmup, smoothing, action
        self.max_rollbacks, self.lr_decay, self.enabled = max_rollbacks, lr_decay, enabled
        self.projections, self.window, self.seed = projections, window, seed
        self._proj_FK: torch.Tensor | None = None
        self.state = DriftState()

    @classmethod
    def from_config(cls, h, rows_per_batch: int) -> DriftGuard:
        """From a ``HealthConfig`` (its ``drift_*`` keys); proj_gap compares the rows of the last
        ``h.drift_window`` batches of ``rows_per_batch`` rows."""
        return cls(signal=h.drift_signal, rise=h.drift_rise, margin=h.drift_margin, patience=h.drift_patience,
                   warmup=h.drift_warmup, smoothing=h.drift_smoothing, action=h.drift_action,
                   max_rollbacks=h.max_rollbacks, lr_decay=h.lr_decay_on_rollback, enabled=h.drift_enabled,
                   window=h.drift_window * rows_per_batch)

    # -- per step ------------------------------------------------------------------------------
    def observe(self, metrics: dict[str, float], gen_x: torch.Tensor | None = None,
                data_x: torch.Tensor | None = None, cond_x: torch.Tensor | None = None) -> None:
        """Accumulate this step's training quantities until the next ``value()``.

        proj_gap reads ``gen_x`` (generator samples for the conditions ``cond_x``) and ``data_x``
        (the data batch with the same conditions); ``cond_x`` may be None (marginal only).
        """
        st = self.state
        if self.kind == "proj_gap":
            if gen_x is None or data_x is None:
                return
            gen_x, data_x = gen_x.detach().float().cpu(), data_x.detach().float().cpu()
            cond_x = None if cond_x is None else cond_x.detach().float().cpu()
            if st.scale_x is None:  # fixed at the first batch: the units of every later check
                st.scale_x = float(summarize_BF(data_x).std().clamp_min(1e-12))
                # Root mean square, not std: a condition may be constant over a batch.
                st.scale_c = 1.0 if cond_x is None else float(summarize_BF(cond_x).pow(2).mean().sqrt().clamp_min(1e-12))
            gen_BF = joint_features(gen_x, cond_x, st.scale_x, st.scale_c)
            data_BF = joint_features(data_x, cond_x, st.scale_x, st.scale_c)
            proj_FK = self._projection(data_BF.shape[1])
            st.gen_proj = (st.gen_proj + (gen_BF @ proj_FK).tolist())[-self.window:]
            st.data_proj = (st.data_proj + (data_BF @ proj_FK).tolist())[-self.window:]
            return
        value = metrics.get(METRIC_OF_SIGNAL[self.kind])
        if value is not None and math.isfinite(value):
            st.sum_value += float(value)
            st.count += 1

    def _projection(self, features: int) -> torch.Tensor:
        if self._proj_FK is None or self._proj_FK.shape[0] != features:
            self._proj_FK = random_projection_FK(features, self.projections, self.seed)
        return self._proj_FK

    def value(self) -> float:
        """This check's raw value from what was observed since the last one (NaN if nothing was)."""
        st = self.state
        if self.kind == "proj_gap":
            if len(st.gen_proj) < 2 or len(st.data_proj) < 2:
                return math.nan
            return projected_gap(torch.tensor(st.gen_proj), torch.tensor(st.data_proj))
        out = st.sum_value / st.count if st.count else math.nan
        st.sum_value, st.count = 0.0, 0
        return out

    # -- per check -----------------------------------------------------------------------------
    @property
    def signal(self) -> float:
        """The smoothed signal: the number to log (``guard/signal``)."""
        return math.nan if self.state.signal is None else self.state.signal

    @property
    def fired_at(self) -> int | None:
        return self.state.fired_at

    @property
    def judges(self) -> bool:
        """Whether its band decides which states are rollback targets: once past ``warmup`` checks
        and unless it only logs (a log-only guard changes nothing, resumption included)."""
        return self.enabled and self.action != "log" and not self.warming_up

    @property
    def warming_up(self) -> bool:
        """Within the first ``warmup`` checks: out of band counts for nothing yet."""
        return self.state.checks <= self.warmup

    def decide(self, step: int, value: float) -> DriftDecision:
        st = self.state
        if not self.enabled or not math.isfinite(value):
            return DriftDecision("ok", signal=self.signal)
        st.checks += 1
        st.signal = value if st.signal is None else self.smoothing * st.signal + (1 - self.smoothing) * value
        st.trace.append([step, value, st.signal])
        is_best = st.best is None or st.signal < st.best
        if is_best:
            st.best = st.signal
        limit = st.best * (1 + self.rise) + self.margin
        in_band = st.signal <= limit
        if in_band or self.warming_up:
            st.out_of_band = 0
            return DriftDecision("ok", lr_scale=self.lr_scale, signal=st.signal, is_best=is_best, in_band=in_band)
        st.out_of_band += 1
        why = f"{self.kind} {st.signal:.4g} > best {st.best:.4g}·(1 + {self.rise:g}) + {self.margin:g}"
        if st.out_of_band < self.patience:
            return DriftDecision("ok", f"out of band ({st.out_of_band}/{self.patience}): {why}",
                                 lr_scale=self.lr_scale, signal=st.signal, in_band=False)
        if st.fired_at is None:
            st.fired_at = step
        st.out_of_band = 0
        if self.action == "log":
            reason = f"step {step}: drift ({why} for {self.patience} checks); logged only (drift_action = log)"
            st.history.append(reason)
            return DriftDecision("ok", reason, self.lr_scale, st.signal, in_band=False)
        if self.action == "rollback" and st.rollbacks < self.max_rollbacks:
            st.rollbacks += 1
            # The restored state is re-measured from scratch: a stale out-of-band value must not fire again.
            st.signal = None
            reason = (f"step {step}: drift ({why} for {self.patience} checks); rolling back to the last in-band "
                      f"state, rates x{self.lr_scale:g} (rollback {st.rollbacks} of {self.max_rollbacks})")
            st.history.append(reason)
            return DriftDecision("rollback", reason, self.lr_scale, self.signal, in_band=False)
        reason = f"step {step}: drift ({why} for {self.patience} checks); stopping, keeping the best state by {self.kind}"
        st.history.append(reason)
        return DriftDecision("stop", reason, self.lr_scale, st.signal, in_band=False)

    @property
    def lr_scale(self) -> float:
        return self.lr_decay ** self.state.rollbacks

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = DriftState(**state)
