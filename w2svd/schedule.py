"""Flow-matching arithmetic (diffusers' convention, as HunyuanVideo uses it).

Every function is shape-agnostic: per-sample sigmas ``s_B`` broadcast over any trailing
dims, so the same code serves 2-D toy data ``[B, D]`` and video latents ``[B, C, T, H, W]``.
"""

from __future__ import annotations

import math

import torch

from w2svd import rng


def expand_like(s_B: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[B] → [B, 1, …, 1]`` with as many ones as ``x`` has non-batch dims."""
    assert s_B.dim() == 1 and s_B.shape[0] == x.shape[0], (s_B.shape, x.shape)
    return s_B.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def shift_sigmas(s: torch.Tensor, shift: float) -> torch.Tensor:
    """``s' = shift·s / (1 + (shift − 1)·s)``: spends more steps at high noise when shift > 1."""
    return shift * s / (1 + (shift - 1) * s)


def add_noise(x0: torch.Tensor, eps: torch.Tensor, s_B: torch.Tensor) -> torch.Tensor:
    """``x_s = (1 − s)·x0 + s·eps``."""
    s = expand_like(s_B, x0)
    return (1 - s) * x0 + s * eps


def x0_from_velocity(x_s: torch.Tensor, v: torch.Tensor, s_B: torch.Tensor) -> torch.Tensor:
    """``x0 = x_s − s·v`` for the velocity ``v = eps − x0``."""
    return x_s - expand_like(s_B, x_s) * v


def eps_from_velocity(x_s: torch.Tensor, v: torch.Tensor, s_B: torch.Tensor) -> torch.Tensor:
    """``eps = x_s + (1 − s)·v``."""
    return x_s + (1 - expand_like(s_B, x_s)) * v


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target ``v = eps − x0``."""
    return eps - x0


def euler_step(x_s: torch.Tensor, v: torch.Tensor, s_B: torch.Tensor, s_next_B: torch.Tensor) -> torch.Tensor:
    """``x ← x + (s_next − s)·v``."""
    return x_s + expand_like(s_next_B - s_B, x_s) * v


def timesteps(s_B: torch.Tensor) -> torch.Tensor:
    """Diffusers' timestep ``t = 1000·s``."""
    return s_B * 1000.0


def teacher_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """``steps + 1`` decreasing sigmas from 1 to 0, shifted: the Euler grid of the teacher."""
    assert steps >= 1
    return shift_sigmas(torch.linspace(1.0, 0.0, steps + 1), shift)


def student_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """The ``steps`` sigmas at which a few-step student is evaluated (the final 0 excluded).

    1 step is ``{1.0}``; 4 steps are four shifted, evenly spaced sigmas starting at 1.
    """
    return teacher_sigmas(steps, shift)[:-1]


def sample_uniform_sigmas(n: int, s_min: float, s_max: float, generator: torch.Generator | None = None,
                          device: torch.device | str = "cpu") -> torch.Tensor:
    """``s ~ U[s_min, s_max]``, ``[n]``."""
    u = rng.rand((n,), generator, device)
    return s_min + (s_max - s_min) * u


def sample_logit_normal_sigmas(n: int, mean: float = 0.0, std: float = 1.0,
                               generator: torch.Generator | None = None,
                               device: torch.device | str = "cpu") -> torch.Tensor:
    """``s = sigmoid(m + std·z)``, ``z ~ N(0, 1)`` (SD3's logit-normal training density)."""
    z = rng.randn((n,), generator, device)
    return torch.sigmoid(mean + std * z)


TRAINING_DENSITIES = ("logit_normal", "uniform")


def sample_training_sigmas(n: int, shift: float, generator: torch.Generator | None = None,
                           device: torch.device | str = "cpu", density: str = "logit_normal") -> torch.Tensor:
    """``s' = shift·s / (1 + (shift − 1)·s)`` of ``s`` drawn from ``density``: the flow-matching
    training density moved by the sampler's shift, so that the sigmas a sampler spends its steps
    on are the ones the model trained on.

    ``logit_normal`` (SD3's): unshifted ``P(s' > 0.95) ≈ 0.2 %``, shift 3: 3 %. ``uniform``
    (``s ~ U[0, 1]``), shift 3: 14 %: a small model from scratch must learn the whole layout of
    a frame from pure noise at sigma near 1, and under logit-normal it barely sees that region
    (docs/benchmarks.md, "Portrait world").
    """
    if density == "logit_normal":
        s = sample_logit_normal_sigmas(n, generator=generator, device=device)
    elif density == "uniform":
        s = sample_uniform_sigmas(n, 0.0, 1.0, generator=generator, device=device)
    else:
        raise ValueError(f"training sigma density {density!r}; choose one of {', '.join(TRAINING_DENSITIES)}")
    return shift_sigmas(s, shift)


def logit_normal_density(s: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """``p(s) = N(logit s; m, std) / (s (1 − s))``, for tests and plots."""
    logit = torch.log(s) - torch.log1p(-s)
    return torch.exp(-0.5 * ((logit - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi) * s * (1 - s))
