"""Baselines that share the roles' code: LCM consistency distillation and teacher fine-tuning.

Teacher Euler sampling is ``sampling.sample_teacher_euler``; vanilla DMD2 is
``roles.build_roles(method="dmd2")`` with the same steps as W2SVD.
"""

from __future__ import annotations

import torch
from torch import nn

from w2svd import rng
from w2svd.distill import Backward, _plain_backward
from w2svd.losses import consistency_loss, flow_matching_loss
from w2svd.models.base import Cond
from w2svd.roles import Guidance, View, guided_velocity, student_guidance
from w2svd.schedule import add_noise, euler_step, teacher_sigmas, x0_from_velocity


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """``θ⁻ ← decay·θ⁻ + (1 − decay)·θ`` over matching parameters."""
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.lerp_(s.detach().to(t.dtype), 1.0 - decay)


def lcm_step(student: View, target: View, teacher: View, x_gt: torch.Tensor, cond: Cond, *,
             teacher_steps: int, shift: float, guidance: Guidance = Guidance(),
             backward: Backward = _plain_backward, generator: torch.Generator | None = None) -> dict:
    """One consistency-distillation step on the teacher's N-step Euler grid.

    x_{n+1} = noised x_gt at s_{n+1};  x_n = Euler step of the (guided) teacher to s_n
    L = mean((f_θ(x_{n+1}, s_{n+1}) − f_θ⁻(x_n, s_n))²),  f(x, s) = x − s·v(x, s)
    f(x, 0) = x holds by construction, the consistency boundary condition. The teacher runs
    at full guidance; student and target at ``student_guidance``, as the student is served.
    """
    grid = teacher_sigmas(teacher_steps, shift).to(x_gt.device)
    batch = x_gt.shape[0]
    n = rng.randint(teacher_steps, (batch,), generator, x_gt.device)
    s_hi, s_lo = grid[n], grid[n + 1]
    eps = rng.randn_like(x_gt, generator)
    x_hi = add_noise(x_gt, eps, s_hi)
    with torch.no_grad():
        v_teacher = guided_velocity(teacher, x_hi, s_hi, cond, guidance.mode, guidance.scale)
        x_lo = euler_step(x_hi, v_teacher, s_hi, s_lo)
        target_x0 = x0_from_velocity(x_lo, guided_velocity(target, x_lo, s_lo, cond, *student_guidance(guidance)),
                                     s_lo)
    with student.scope():
        v_student = guided_velocity(student, x_hi, s_hi, cond, *student_guidance(guidance))
        pred_x0 = x0_from_velocity(x_hi, v_student, s_hi)
        loss = consistency_loss(pred_x0, target_x0)
        backward(loss)
    return {"lcm/consistency": loss.item()}


def flow_matching_step(model: View, x0: torch.Tensor, cond: Cond, sigma_B: torch.Tensor,
                       backward: Backward = _plain_backward, uncond_prob: float = 0.0,
                       generator: torch.Generator | None = None) -> dict:
    """Teacher training / fine-tuning: ``mean((v(x_s, s) − (eps − x0))²)``.

    ``uncond_prob`` drops the text condition of that fraction of samples (zeros, as
    ``Cond.null``) so the model also learns the unconditional score that CFG needs.
    """
    eps = rng.randn_like(x0, generator)
    if uncond_prob > 0:
        cond = cond.drop(rng.rand((x0.shape[0],), generator, x0.device) < uncond_prob)
    with model.scope():
        loss = flow_matching_loss(model(add_noise(x0, eps, sigma_B), sigma_B, cond), x0, eps)
        backward(loss)
    return {"fm/loss": loss.item()}
