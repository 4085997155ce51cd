"""The loss terms of W2SVD and its baselines, as pure functions of tensors.

Shapes are ``[B, …]``: any number of non-batch dims. Each returns a scalar.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_mean_abs(x: torch.Tensor) -> torch.Tensor:
    """``mean |x|`` over all non-batch dims, kept broadcastable: ``[B, 1, …, 1]``."""
    return x.abs().mean(dim=tuple(range(1, x.dim())), keepdim=True)


def dmd_gradient(x_hat: torch.Tensor, x0_fake: torch.Tensor, x0_target: torch.Tensor) -> torch.Tensor:
    """DMD's normalised score difference ``(x0_fake − x0_target) / mean|x_hat − x0_target|``.

    The mean is taken per sample (DMD2's normaliser), so each sample's step has unit scale.
    """
    normaliser = per_sample_mean_abs(x_hat - x0_target).clamp_min(1e-8)
    return (x0_fake - x0_target) / normaliser


def dmd_loss(x_hat: torch.Tensor, x0_fake: torch.Tensor, x0_target: torch.Tensor) -> torch.Tensor:
    """``L = 0.5·mean((x_hat − stopgrad(x_hat − grad))²)``, so ``∂L/∂x_hat = grad / numel``.

    With ``x0_target = x0_real`` this is the distribution-matching term; with the ground truth
    ``x_gt`` in its place it is W2SVD's regulariser (the same form, a different target).
    ``x0_fake`` and ``x0_target`` carry no gradient. A NaN or inf in either score stays in the
    loss, where the health check sees it and rolls back before any update lands.
    """
    grad = dmd_gradient(x_hat.detach(), x0_fake.detach(), x0_target.detach())
    target = (x_hat - grad).detach()
    return 0.5 * F.mse_loss(x_hat, target, reduction="mean")


def flow_matching_loss(v_pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``mean((v_pred − (eps − x0))²)``: the fake score's (and the teacher's) diffusion loss."""
    return F.mse_loss(v_pred, eps - x0, reduction="mean")


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating ``mean softplus(−D(fake))``."""
    return F.softplus(-logits_fake).mean()


def gan_discriminator_loss(logits_fake: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    """``mean softplus(D(fake)) + mean softplus(−D(real))``."""
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()


def cfg_combine(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance ``uncond + w·(cond − uncond)``."""
    return v_uncond + scale * (v_cond - v_uncond)


def consistency_loss(pred_x0: torch.Tensor, target_x0: torch.Tensor) -> torch.Tensor:
    """LCM's ``mean((f_θ(x_{n+1}) − stopgrad f_θ⁻(x_n))²)``."""
    return F.mse_loss(pred_x0, target_x0.detach(), reduction="mean")
