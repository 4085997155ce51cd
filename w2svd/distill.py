"""One critic step and one generator step of W2SVD / DMD2 (DESIGN §2), given the roles.

No optimizer and no I/O here: each step computes its losses, calls ``backward(loss)`` (plain
``loss.backward`` or a DeepSpeed engine's) inside the scope of the role it trains, and returns
plain floats for logging. The caller zeroes gradients, clips and steps its optimizers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from w2svd import rng
from w2svd.losses import dmd_gradient, dmd_loss, flow_matching_loss, gan_discriminator_loss
from w2svd.models.base import Cond
from w2svd.roles import Roles
from w2svd.sampling import sample
from w2svd.schedule import add_noise, sample_uniform_sigmas, student_sigmas

Backward = Callable[[torch.Tensor], None]


def _plain_backward(loss: torch.Tensor) -> None:
    loss.backward()


@dataclass(frozen=True)
class StepSettings:
    """The numbers of DESIGN §2 that the two steps read (a view of ``MethodConfig``)."""

    student_steps: int = 4
    shift: float = 1.0
    sigma_min: float = 0.02
    sigma_max: float = 0.98
    lambda_dmd: float = 1.0
    lambda_reg: float = 0.0
    lambda_gan_gen: float = 5e-3
    lambda_gan_disc: float = 1e-2
    backward_simulation: bool = False
    sampler: str = "renoise"
    # The reg term's target: "paper" the ground truth x_gt itself; "data_forcing" the real
    # score's x0 on x_gt noised like x_hat (same s, same eps): the real score read on real data.
    reg_target: str = "paper"

    @classmethod
    def from_config(cls, method_cfg) -> StepSettings:
        """The fields of the same names in ``MethodConfig`` (matched by name, not position)."""
        return cls(**{f.name: getattr(method_cfg, f.name) for f in dataclasses.fields(cls)})

    def generator_sigmas(self) -> torch.Tensor:
        return student_sigmas(self.student_steps, self.shift)


@torch.no_grad()
def generator_input(roles: Roles, x_gt: torch.Tensor, cond: Cond, st: StepSettings,
                    generator: torch.Generator | None = None,
                    shared: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The generator's input ``x_in`` at a student sigma ``s_g`` (per sample).

    Noised ground truth ``(1 − s_g)·x_gt + s_g·eps``; with backward simulation (multi-step only),
    the current generator's own sampler state at ``s_g``, started from pure noise. The depth of
    that simulation is drawn from ``shared`` (default: ``generator``): a generator every rank holds
    alike, because under ZeRO-3 every rank must run the same number of forwards.
    """
    sigmas = st.generator_sigmas().to(x_gt.device)
    batch = x_gt.shape[0]
    eps = rng.randn_like(x_gt, generator)
    if st.backward_simulation and len(sigmas) > 1:
        k = int(rng.randint(len(sigmas), (1,), shared if shared is not None else generator))
        velocity = lambda x, s: roles.generator_velocity(x, s, cond)  # noqa: E731
        x_in = sample(velocity, eps, sigmas, st.sampler, generator, stop_at=k)
        return x_in, sigmas[k].expand(batch).clone()
    s_g = sigmas[rng.randint(len(sigmas), (batch,), generator, x_gt.device)]
    return add_noise(x_gt, eps, s_g), s_g


def _renoise(x: torch.Tensor, st: StepSettings, generator: torch.Generator | None):
    s = sample_uniform_sigmas(x.shape[0], st.sigma_min, st.sigma_max, generator, x.device)
    eps = rng.randn_like(x, generator)
    return s, eps, add_noise(x, eps, s)


def critic_step(roles: Roles, x_gt: torch.Tensor, cond: Cond, st: StepSettings,
                backward: Backward = _plain_backward, generator: torch.Generator | None = None,
                shared: torch.Generator | None = None) -> dict:
    """Train the fake score on fresh generator samples (and the head on real vs fake features).

    ``L = mean((fake(x̂_s, s) − (eps − x̂))²) + λ_disc·[softplus(D(φ(x̂_s))) + softplus(−D(φ(x_gt,s)))]``
    Gradients reach only the critic LoRA (or DMD2's fake copy) and ``D``.
    """
    with torch.no_grad():
        x_in, s_g = generator_input(roles, x_gt, cond, st, generator, shared)
        x_hat = roles.generator_x0(x_in, s_g, cond)
    s, eps, x_s = _renoise(x_hat, st, generator)
    use_disc = roles.disc is not None and st.lambda_gan_disc > 0
    with roles.fake.scope():
        v_fake, features_fake = roles.fake_velocity_and_features(x_s, s, cond)
        loss_fm = flow_matching_loss(v_fake, x_hat, eps)
        loss = loss_fm
        metrics = {"critic/flow_matching": loss_fm.item()}
        if use_disc:
            real_s = add_noise(x_gt, rng.randn_like(x_gt, generator), s)
            _, features_real = roles.fake_velocity_and_features(real_s, s, cond)
            logits_fake, logits_real = roles.disc(features_fake), roles.disc(features_real)
            loss_disc = gan_discriminator_loss(logits_fake, logits_real)
            loss = loss + st.lambda_gan_disc * loss_disc
            metrics["critic/disc"] = loss_disc.item()
            metrics["critic/disc_acc"] = 0.5 * ((logits_real > 0).float().mean() + (logits_fake < 0).float().mean()).item()
        backward(loss)
    metrics["critic/loss"] = loss.item()
    return metrics


@torch.no_grad()
def reg_target(roles: Roles, x_gt: torch.Tensor, eps: torch.Tensor, s_B: torch.Tensor, cond: Cond,
               kind: str) -> torch.Tensor:
    """The reg term's target: ``x_gt`` ("paper") or ``x0_real((1 − s)·x_gt + s·eps)`` ("data_forcing")."""
    if kind == "paper":
        return x_gt
    if kind == "data_forcing":
        return roles.real_x0(add_noise(x_gt, eps, s_B), s_B, cond)
    raise ValueError(f"reg target {kind!r}; choose 'paper' or 'data_forcing'")


def generator_step(roles: Roles, x_gt: torch.Tensor, cond: Cond, st: StepSettings,
                   backward: Backward = _plain_backward, generator: torch.Generator | None = None,
                   shared: torch.Generator | None = None) -> dict:
    """Move the generator along the DMD gradient (+ reg, + GAN), into the generator only.

    x̂ = x_in − s_g·G(x_in, s_g, c);  x_s = renoise(x̂, s ~ U[s_min, s_max])
    L = λ_dmd·DMD(x̂; x0_fake, x0_real) + λ_reg·DMD(x̂; x0_fake, target) + λ_gan·softplus(−D(φ(x_s)))
    target = x_gt (the paper) or x0_real(renoise(x_gt)) (data forcing, see ``reg_target``).
    """
    x_in, s_g = generator_input(roles, x_gt, cond, st, generator, shared)
    with roles.generator.scope():
        x_hat = roles.generator_x0(x_in, s_g, cond)
        s, eps, x_s = _renoise(x_hat, st, generator)
        with torch.no_grad():
            x0_real = roles.real_x0(x_s, s, cond)
            x0_fake = roles.fake_x0(x_s, s, cond)
        loss_dmd = dmd_loss(x_hat, x0_fake, x0_real)
        loss = st.lambda_dmd * loss_dmd
        metrics = {"gen/dmd": loss_dmd.item(),
                   "gen/sample_std": x_hat.detach().float().std().item(),
                   # Size of the normalised DMD gradient: how far fake and real scores disagree.
                   "gen/score_gap": dmd_gradient(x_hat.detach(), x0_fake, x0_real).abs().mean().item()}
        if st.lambda_reg > 0:
            loss_reg = dmd_loss(x_hat, x0_fake, reg_target(roles, x_gt, eps, s, cond, st.reg_target))
            loss = loss + st.lambda_reg * loss_reg
            metrics["gen/reg"] = loss_reg.item()
        if roles.disc is not None and st.lambda_gan_gen > 0:
            gan_value, grad_x_s = roles.gan_generator_grad(x_s, s, cond)
            loss = loss + st.lambda_gan_gen * (grad_x_s * x_s).sum()
            metrics["gen/gan"] = gan_value.item()
        backward(loss)
    return metrics
