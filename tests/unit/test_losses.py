"""Loss terms against hand-written references (batch ≥ 2, 2-D and 5-D shapes)."""

import pytest
import torch
import torch.nn.functional as F

from w2svd import losses as L

SHAPES = [(3, 6), (2, 4, 3, 2, 2)]


@pytest.mark.parametrize("shape", SHAPES)
def test_dmd_gradient_is_normalised_per_sample(shape):
    x_hat, fake, real = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    grad = L.dmd_gradient(x_hat, fake, real)
    for b in range(shape[0]):
        ref = (fake[b] - real[b]) / (x_hat[b] - real[b]).abs().mean()
        assert torch.allclose(grad[b], ref, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_dmd_loss_gradient_equals_dmd_direction(shape):
    x_hat = torch.randn(shape, requires_grad=True)
    fake, real = torch.randn(shape), torch.randn(shape)
    loss = L.dmd_loss(x_hat, fake, real)
    loss.backward()
    expected = L.dmd_gradient(x_hat.detach(), fake, real) / x_hat.numel()
    assert torch.allclose(x_hat.grad, expected, atol=1e-7)
    # value: 0.5 * mean(grad^2)
    assert torch.allclose(loss, 0.5 * (L.dmd_gradient(x_hat.detach(), fake, real) ** 2).mean())


def test_dmd_loss_stops_gradient_into_scores():
    x_hat = torch.randn(2, 5, requires_grad=True)
    fake = torch.randn(2, 5, requires_grad=True)
    real = torch.randn(2, 5, requires_grad=True)
    L.dmd_loss(x_hat, fake, real).backward()
    assert fake.grad is None and real.grad is None


def test_dmd_loss_zero_when_scores_agree():
    x_hat = torch.randn(2, 3, 4)
    same = torch.randn(2, 3, 4)
    assert L.dmd_loss(x_hat, same, same).item() == 0.0


def test_flow_matching_and_consistency_losses():
    v, x0, eps = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    assert torch.allclose(L.flow_matching_loss(v, x0, eps), ((v - (eps - x0)) ** 2).mean())
    a, b = torch.randn(2, 3, requires_grad=True), torch.randn(2, 3, requires_grad=True)
    L.consistency_loss(a, b).backward()
    assert b.grad is None and a.grad is not None


def test_gan_losses_reference():
    fake, real = torch.randn(5), torch.randn(5)
    assert torch.allclose(L.gan_generator_loss(fake), torch.log1p(torch.exp(-fake)).mean())
    ref = torch.log1p(torch.exp(fake)).mean() + torch.log1p(torch.exp(-real)).mean()
    assert torch.allclose(L.gan_discriminator_loss(fake, real), ref)
    # A perfect discriminator drives its loss towards 0, the generator's up.
    assert L.gan_discriminator_loss(torch.full((2,), -20.0), torch.full((2,), 20.0)) < 1e-6


def test_cfg_combine():
    u, c = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.allclose(L.cfg_combine(u, c, 1.0), c)
    assert torch.allclose(L.cfg_combine(u, c, 6.0), u + 6.0 * (c - u))
    assert torch.allclose(F.mse_loss(L.cfg_combine(u, c, 0.0), u), torch.tensor(0.0))


def test_a_non_finite_score_surfaces_in_the_dmd_loss():
    # A NaN in the fake or real score must reach the loss (and so the health check), not be
    # zeroed on the way into a silent no-op update.
    x_hat = torch.randn(2, 3, requires_grad=True)
    x0_real = torch.randn(2, 3)
    for bad in (float("nan"), float("inf")):
        x0_fake = torch.randn(2, 3)
        x0_fake[1, 2] = bad
        assert not torch.isfinite(L.dmd_loss(x_hat, x0_fake, x0_real))
