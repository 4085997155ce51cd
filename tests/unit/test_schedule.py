"""Flow-matching arithmetic against hand-written references, on 2-D and 5-D video shapes."""

import pytest
import torch

from w2svd import schedule as S

SHAPES = [(3, 5), (2, 4, 3, 2, 2)]  # toy [B, D] and video latents [B, C, T, H, W]


@pytest.mark.parametrize("shape", SHAPES)
def test_noising_velocity_and_x0_round_trip(shape):
    x0, eps = torch.randn(shape), torch.randn(shape)
    s = torch.tensor([0.0, 0.3, 1.0][: shape[0]])
    x_s = S.add_noise(x0, eps, s)
    for b in range(shape[0]):  # per-sample reference
        assert torch.allclose(x_s[b], (1 - s[b]) * x0[b] + s[b] * eps[b])
    v = S.velocity_target(x0, eps)
    assert torch.allclose(v, eps - x0)
    assert torch.allclose(S.x0_from_velocity(x_s, v, s), x0, atol=1e-6)
    assert torch.allclose(S.eps_from_velocity(x_s, v, s), eps, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_euler_step_matches_reference_and_integrates_straight_flow(shape):
    x0, eps = torch.randn(shape), torch.randn(shape)
    s, s_next = torch.full((shape[0],), 0.8), torch.full((shape[0],), 0.5)
    x = S.add_noise(x0, eps, s)
    v = eps - x0
    out = S.euler_step(x, v, s, s_next)
    assert torch.allclose(out, x + (0.5 - 0.8) * v)
    # On a straight path the Euler step lands exactly on the path at s_next.
    assert torch.allclose(out, S.add_noise(x0, eps, s_next), atol=1e-6)


def test_shift_reference_values_and_monotone():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    shift = 3.0
    ref = torch.tensor([3 * v / (1 + 2 * v) for v in s.tolist()])
    assert torch.allclose(S.shift_sigmas(s, shift), ref)
    assert torch.allclose(S.shift_sigmas(s, 1.0), s)
    grid = S.teacher_sigmas(28, 7.0)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and len(grid) == 29
    assert torch.all(grid[1:] < grid[:-1])


def test_student_sigmas_one_and_four_steps():
    assert S.student_sigmas(1, 7.0).tolist() == [1.0]
    four = S.student_sigmas(4, 1.0)
    assert torch.allclose(four, torch.tensor([1.0, 0.75, 0.5, 0.25]))
    shifted = S.student_sigmas(4, 5.0)
    assert shifted[0] == 1.0 and len(shifted) == 4
    assert torch.allclose(shifted, S.shift_sigmas(torch.tensor([1.0, 0.75, 0.5, 0.25]), 5.0))


def test_timestep_sampling_ranges_and_logit_normal_density():
    g = torch.Generator().manual_seed(0)
    u = S.sample_uniform_sigmas(4096, 0.02, 0.98, g)
    assert u.min() >= 0.02 and u.max() <= 0.98 and abs(u.mean().item() - 0.5) < 0.02
    ln = S.sample_logit_normal_sigmas(20000, 0.0, 1.0, g)
    assert 0 < ln.min() and ln.max() < 1
    # The histogram follows the closed-form density.
    hist = torch.histc(ln, bins=10, min=0, max=1) / (len(ln) * 0.1)
    centres = torch.arange(10) * 0.1 + 0.05
    assert torch.allclose(hist, S.logit_normal_density(centres), rtol=0.15, atol=0.05)


def test_expand_like_rejects_mismatched_batch():
    with pytest.raises(AssertionError):
        S.expand_like(torch.zeros(3), torch.zeros(2, 4))


def test_training_sigmas_are_the_logit_normal_moved_by_the_sampler_shift():
    s_plain = S.sample_logit_normal_sigmas(20000, generator=torch.Generator().manual_seed(3))
    s3 = S.sample_training_sigmas(20000, 3.0, generator=torch.Generator().manual_seed(3))
    # Same draws, each moved by the shift formula written out: 3s / (1 + 2s).
    torch.testing.assert_close(s3, 3 * s_plain / (1 + 2 * s_plain))
    torch.testing.assert_close(S.sample_training_sigmas(20000, 1.0, generator=torch.Generator().manual_seed(3)), s_plain)
    # Unshifted, the sigmas a sampler starts from are almost never trained; shift 3 covers them.
    assert (s_plain > 0.95).float().mean() < 0.005 < 0.02 < (s3 > 0.95).float().mean() < 0.05


def test_uniform_training_sigmas_are_uniform_draws_moved_by_the_shift():
    u = torch.rand(20000, generator=torch.Generator().manual_seed(4))
    s3 = S.sample_training_sigmas(20000, 3.0, generator=torch.Generator().manual_seed(4), density="uniform")
    torch.testing.assert_close(s3, 3 * u / (1 + 2 * u))
    # P(3u / (1 + 2u) > 0.95) = P(u > 0.95 / 1.1) ≈ 0.136: several times the logit-normal's share.
    assert 0.12 < (s3 > 0.95).float().mean() < 0.15
    with pytest.raises(ValueError, match="training sigma density 'beta'"):
        S.sample_training_sigmas(4, 3.0, density="beta")
