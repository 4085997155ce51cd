"""One W2SVD / DMD2 training iteration, the same for the toy benchmark and the distributed job.

    cadence = Cadence.from_config(cfg)                     # or Cadence(gen_update_every=5, ...)
    for it in range(cadence.total_iterations):
        out = train_iteration(it, roles, x_gt, cond, st, cadence, critic, generator, rng=g, ema=ema)
        if out.stopped: break                              # the ``check`` hook said so

The critic (fake score + discriminator head) is updated every iteration; the generator on the
iterations ``cadence.generator_due`` names: none during the critic warm-up, then one every
``gen_update_every`` (the critic-to-generator ratio), at the rate ``cadence.generator_lr_factor``
gives. Each trained role is a ``Trainable``: the toy wraps a torch optimizer in
``TorchTrainable``, the distributed job its DeepSpeed engines. No optimizer is built here and
nothing is written anywhere.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from w2svd.baselines import ema_update
from w2svd.distill import StepSettings, critic_step, generator_step
from w2svd.models.base import Cond
from w2svd.roles import Roles

LR_SCHEDULES = ("constant", "cosine")


@runtime_checkable
class Trainable(Protocol):
    """One trained role, as the iteration drives it."""

    def zero_grad(self) -> None: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> float:
        """Clip, step the optimizer; return the gradient norm (before clipping)."""
        ...

    def set_lr_scale(self, scale: float) -> None:
        """Run at ``scale`` × the configured learning rate of every parameter group."""
        ...


class Averaged(Protocol):
    """An average of the generator kept beside it (``GeneratorEMA`` here, or a distributed job's
    partition-aware one): ``update()`` after every generator update."""

    def update(self) -> None: ...


class TorchTrainable:
    """``Trainable`` over a plain torch optimizer (the toy, single-process runs)."""

    def __init__(self, optimizer: torch.optim.Optimizer, grad_clip: float = 1.0):
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip))
        self.optimizer.step()
        return norm

    def set_lr_scale(self, scale: float) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = lr * scale


def lr_factor(kind: str, done: int, total: int) -> float:
    """The rate multiplier after ``done`` of ``total`` updates: constant ``1``, cosine ``½(1 + cos(π·done/total))``."""
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(done, total) / max(total, 1)))
    raise ValueError(f"learning-rate schedule {kind!r}; choose one of {list(LR_SCHEDULES)}")


@dataclass(frozen=True)
class Cadence:
    """When the generator moves, and how fast.

    critic_warmup: critic-only iterations first, so the fake score fits the generator's initial
      samples before the DMD gradient is read from it;
    gen_update_every: critic updates per generator update afterwards (DMD2 uses 5);
    generator_updates: the planned number of generator updates (the cosine schedule's length).
    """

    gen_update_every: int = 5
    critic_warmup: int = 0
    generator_updates: int = 400
    generator_lr_schedule: str = "constant"

    def __post_init__(self):
        if self.gen_update_every < 1 or self.critic_warmup < 0 or self.generator_updates < 1:
            raise ValueError(f"bad cadence {self}")
        lr_factor(self.generator_lr_schedule, 0, 1)

    @classmethod
    def from_config(cls, cfg) -> Cadence:
        """From ``cfg.method`` / ``cfg.optim``: ``optim.steps`` iterations in all, warm-up included."""
        m, o = cfg.method, cfg.optim
        updates = max(1, math.ceil((o.steps - m.critic_warmup) / m.gen_update_every))
        return cls(m.gen_update_every, m.critic_warmup, updates, o.generator_lr_schedule)

    @property
    def total_iterations(self) -> int:
        return self.critic_warmup + self.gen_update_every * self.generator_updates

    def generator_due(self, it: int) -> bool:
        k = it - self.critic_warmup
        return k >= 0 and k % self.gen_update_every == 0

    def updates_before(self, it: int) -> int:
        """Generator updates done in iterations ``0 … it−1``."""
        return max(0, math.ceil((it - self.critic_warmup) / self.gen_update_every))

    def generator_lr_factor(self, update: int) -> float:
        return lr_factor(self.generator_lr_schedule, update, self.generator_updates)


class GeneratorEMA:
    """``θ_ema ← d·θ_ema + (1 − d)·θ`` after every generator update; ``module`` is what to evaluate/export."""

    def __init__(self, generator: nn.Module, decay: float):
        self.source, self.decay = generator, decay
        self.module = copy.deepcopy(generator).requires_grad_(False)

    def update(self) -> None:
        ema_update(self.module, self.source, self.decay)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


@dataclass
class IterationResult:
    metrics: dict = field(default_factory=dict)
    grad_norms: dict = field(default_factory=dict)
    generator_updated: bool = False
    # The ``check`` hook refused an update: the caller must end its loop (nothing was stepped).
    stopped: bool = False


def train_iteration(it: int, roles: Roles, x_gt: torch.Tensor, cond: Cond, st: StepSettings, cadence: Cadence,
                    critic: Trainable, generator: Trainable, *, rng: torch.Generator | None = None,
                    shared_rng: torch.Generator | None = None, ema: Averaged | None = None, lr_scale: float = 1.0,
                    check: Callable[[dict], bool] | None = None) -> IterationResult:
    """Iteration ``it``: one critic update, then a generator update when ``cadence`` says so.

    ``lr_scale`` multiplies the generator's scheduled rate (a guard's rollback decay); the
    critic's rate is the caller's to scale. ``check(metrics)`` runs after each loss and before
    its update (finite-loss checks of a distributed job; it may raise); False ends the iteration.
    ``shared_rng``: the draws every rank must make alike (``generator_input``); default ``rng``.
    """
    out = IterationResult()
    critic.zero_grad()
    out.metrics |= critic_step(roles, x_gt, cond, st, backward=critic.backward, generator=rng,
                               shared=shared_rng)
    if check is not None and not check(out.metrics):
        out.stopped = True
        return out
    out.grad_norms["critic"] = critic.step()
    if not cadence.generator_due(it):
        return out
    factor = cadence.generator_lr_factor(cadence.updates_before(it))
    generator.set_lr_scale(lr_scale * factor)
    generator.zero_grad()
    out.metrics |= generator_step(roles, x_gt, cond, st, backward=generator.backward, generator=rng,
                                  shared=shared_rng)
    out.metrics["lr/generator_factor"] = factor
    if check is not None and not check(out.metrics):
        out.stopped = True
        return out
    out.grad_norms["generator"] = generator.step()
    if ema is not None:
        ema.update()
    out.generator_updated = True
    return out
