"""Few-step and many-step samplers, shared by evaluation, serving and batch generation.

A sampler walks a decreasing sigma grid ``s_0 = 1 > s_1 > … > s_{N−1} > 0`` with a velocity
function ``v(x, s_B)``. At each sigma it predicts ``x0 = x − s·v`` and moves to the next sigma:

    renoise (DMD2, LCM): x ← (1 − s_next)·x0 + s_next·eps_new
    euler:               x ← x + (s_next − s)·v

The last step goes to sigma 0, where both rules give ``x0``. Teacher Euler sampling at N steps
is the euler rule on the teacher's shifted N-step grid.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from w2svd import rng
from w2svd.schedule import add_noise, euler_step, student_sigmas, x0_from_velocity

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample(velocity: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor, mode: str = "renoise",
           generator: rng.Generators = None, stop_at: int | None = None) -> torch.Tensor:
    """Run the sampler from ``noise`` over ``sigmas`` (the grid without its final 0).

    ``stop_at=k`` returns the state at ``sigmas[k]`` before its evaluation instead of the final
    sample: DMD2's backward simulation uses it to train a multi-step student on its own inputs.
    """
    if mode not in ("renoise", "euler"):
        raise ValueError(f"sampler mode {mode!r}; choose 'renoise' or 'euler'")
    sigmas = sigmas.to(noise.device, torch.float32)
    x = noise
    batch = noise.shape[0]
    for i in range(len(sigmas)):
        if stop_at is not None and i == stop_at:
            return x
        s_B = sigmas[i].expand(batch)
        s_next_B = (sigmas[i + 1] if i + 1 < len(sigmas) else sigmas.new_zeros(())).expand(batch)
        v = velocity(x, s_B)
        if mode == "euler" or i + 1 == len(sigmas):
            x = euler_step(x, v, s_B, s_next_B)
        else:
            eps = rng.randn_like(x, generator)
            x = add_noise(x0_from_velocity(x, v, s_B), eps, s_next_B)
    return x


def sample_student(velocity: VelocityFn, noise: torch.Tensor, steps: int, shift: float,
                   mode: str = "renoise", generator: rng.Generators = None) -> torch.Tensor:
    """A distilled ``steps``-step generator (or LCM student) from ``noise``."""
    return sample(velocity, noise, student_sigmas(steps, shift), mode, generator)


def sample_teacher_euler(velocity: VelocityFn, noise: torch.Tensor, steps: int, shift: float) -> torch.Tensor:
    """The teacher's N-step Euler sampler (28 is the paper's reference; 4 and 1 the naive baselines)."""
    return sample(velocity, noise, student_sigmas(steps, shift), "euler")
