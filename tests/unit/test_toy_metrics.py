"""Exact toy metrics against hand-written references on tiny tensors, and the family's problems."""

import math

import pytest
import torch

from w2svd.toy.metrics import (
    assign_modes_N,
    chi2_quantile,
    evaluate_samples,
    frechet_to_moments,
    lost_modes,
    mahalanobis_sq_NM,
    occupancy_M1,
    occupancy_tv,
    true_sample_reference,
)
from w2svd.toy.problems import FAMILY, TEST, TUNING, GaussianMixtureProblem, Problem, default_problem


def _exact_moment_samples(mean_D: torch.Tensor, cov_DD: torch.Tensor) -> torch.Tensor:
    """2D points whose sample mean and unbiased covariance are exactly ``mean_D`` and ``cov_DD``:
    ``±a·e_i`` (a = sqrt(3/2)) have mean 0 and covariance I, then an affine map."""
    z_ND = math.sqrt(1.5) * torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    return mean_D + z_ND @ torch.linalg.cholesky(cov_DD).T


def test_frechet_is_exact_when_the_sample_moments_are_known():
    mu1, mu2 = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([0.5, -1.0], dtype=torch.float64)
    # Commuting (diagonal) covariances: FD = |μ1 − μ2|² + Σ (√s1 − √s2)².
    s1, s2 = torch.tensor([1.0, 4.0], dtype=torch.float64), torch.tensor([2.25, 1.0], dtype=torch.float64)
    x_ND = _exact_moment_samples(mu1, torch.diag(s1))
    want = float(((mu1 - mu2) ** 2).sum() + ((s1.sqrt() - s2.sqrt()) ** 2).sum())
    assert frechet_to_moments(x_ND, mu2, torch.diag(s2)) == pytest.approx(want, abs=1e-9)
    # Non-commuting: Tr(A + B − 2 (A^½ B A^½)^½) against scipy's matrix square root.
    from scipy.linalg import sqrtm

    a = torch.tensor([[2.0, 0.6], [0.6, 1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -0.3], [-0.3, 0.5]], dtype=torch.float64)
    ra = torch.from_numpy(sqrtm(a.numpy()).real)
    cross = torch.from_numpy(sqrtm((ra @ b @ ra).numpy()).real)
    want = float(((mu1 - mu2) ** 2).sum() + torch.trace(a + b - 2 * cross))
    assert frechet_to_moments(_exact_moment_samples(mu1, a), mu2, b) == pytest.approx(want, abs=1e-9)


def test_frechet_against_closed_form_for_gaussians():
    # Diagonal Gaussians, many samples: FD = |mu1-mu2|^2 + sum (s1 - s2)^2 for stds s1, s2.
    g = torch.Generator().manual_seed(0)
    n, d = 400_000, 3
    std1, std2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([1.5, 1.0, 0.5])
    mu1, mu2 = torch.tensor([0.0, 1.0, -1.0]), torch.tensor([0.5, 1.0, 0.0])
    samples = mu1 + std1 * torch.randn(n, d, generator=g)
    want = float(((mu1 - mu2) ** 2).sum() + ((std1 - std2) ** 2).sum())
    got = frechet_to_moments(samples, mu2.double(), torch.diag(std2.double() ** 2))
    assert math.isclose(got, want, rel_tol=0.02, abs_tol=0.01)


def test_chi2_quantile_in_two_dims_is_the_exponential_quantile():
    # χ²₂ is exponential with mean 2: P(d² ≤ t) = 1 − exp(−t/2).
    for q in (0.5, 0.9, 0.999):
        assert chi2_quantile(2, q) == pytest.approx(-2 * math.log(1 - q), rel=1e-9)


def test_mahalanobis_and_on_mode_assignment_on_a_known_case():
    means_MD = torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=torch.float64)
    covs_MDD = torch.stack([torch.diag(torch.tensor([1.0, 4.0])), torch.eye(2)]).double()
    x_ND = torch.tensor([[1.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 7.6], [10.0, 1.0], [8.0, 0.0]])
    d2_NM = mahalanobis_sq_NM(x_ND, means_MD, covs_MDD)
    want_N = torch.tensor([1.0, 4.0, 16.0, 14.44, 100.25, 64.0], dtype=torch.float64)  # to mode 0: x²/1 + y²/4
    assert torch.allclose(d2_NM[:, 0], want_N)
    assert torch.allclose(d2_NM[:, 1], ((x_ND.double() - means_MD[1]) ** 2).sum(1))
    # Threshold χ²₂(0.999) = 13.82: on mode 0, on mode 0, off, off (14.44), on mode 1, on mode 1 (d² 4).
    assign_N = assign_modes_N(x_ND, torch.tensor([0.5, 0.5]), means_MD, covs_MDD)
    assert assign_N.tolist() == [0, 0, -1, -1, 1, 1]
    occ_M1 = occupancy_M1(assign_N, 2)
    assert torch.allclose(occ_M1, torch.tensor([2 / 6, 2 / 6, 2 / 6], dtype=torch.float64))
    # TV = ½(|2/6 − ½| + |2/6 − ½| + 2/6) = 1/3; each mode holds 2/6 >= ¼·½: none lost.
    assert occupancy_tv(occ_M1, torch.tensor([0.5, 0.5])) == pytest.approx(1 / 3)
    assert lost_modes(occ_M1, torch.tensor([0.5, 0.5])) == 0
    assert lost_modes(torch.tensor([0.9, 0.1, 0.0], dtype=torch.float64), torch.tensor([0.5, 0.5])) == 1


def test_true_samples_score_well_and_a_one_mode_collapse_badly():
    problem = default_problem()
    labels = torch.arange(8000) % problem.num_captions
    good = evaluate_samples(problem, problem.sample(labels, torch.Generator().manual_seed(1)), labels)
    assert good["fd"] < 0.5 and good["mode_tv"] < 0.03 and good["modes_lost"] == 0 and good["on_mode"] > 0.99
    collapsed = problem.means_KMD[labels, 0] + problem.mode_std * torch.randn(len(labels), problem.dim)
    bad = evaluate_samples(problem, collapsed, labels)
    # Every sample on mode 0 of its caption: TV = ½(|1 − ¼| + 3·¼) = 0.75, three modes lost per
    # caption, and a large distance.
    assert bad["mode_tv"] == pytest.approx(0.75, abs=0.01)
    assert bad["modes_lost"] == problem.num_captions * (problem.modes_per_caption[0] - 1) == problem.num_captions * 3
    assert bad["fd"] > 10 * good["fd"]


def test_samples_that_sit_on_no_mode_lose_every_mode():
    # Nearest-mean assignment would spread pure noise over the modes and call nothing lost.
    problem = default_problem()
    labels = torch.arange(4000) % problem.num_captions
    noise = 3.0 * torch.randn(len(labels), problem.dim, generator=torch.Generator().manual_seed(2))
    out = evaluate_samples(problem, noise, labels)
    assert out["on_mode"] < 0.01 and out["modes_lost"] == 16 and out["mode_tv"] > 0.99


def test_default_problem_keeps_the_distribution_it_had_before_the_family():
    g = torch.Generator().manual_seed(0)
    start_KMN, drift_KMN = 1.5 * torch.randn(4, 4, 8, generator=g), 0.6 * torch.randn(4, 4, 8, generator=g)
    t_F = torch.arange(4, dtype=torch.float32)
    want = (start_KMN[:, :, None, :] + t_F[None, None, :, None] * drift_KMN[:, :, None, :]).reshape(4, 4, 32)
    assert torch.equal(default_problem().means_KMD, want)


@pytest.mark.parametrize("name", ["aniso-6x3", "lowrank-3x6-f6", "iso-4x2to8-unequal"])
def test_exact_moments_and_mode_weights_match_a_large_sample(name):
    problem = FAMILY[name]
    assert isinstance(problem, Problem)
    k = problem.num_captions - 1
    x = problem.sample(torch.full((200_000,), k), torch.Generator().manual_seed(0)).double()
    mean, cov = problem.moments(k)
    assert torch.allclose(x.mean(0), mean, atol=0.03)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.06)
    weights_M, means_MD, covs_MDD = problem.modes(k)
    occ = occupancy_M1(assign_modes_N(x[:20_000], weights_M, means_MD, covs_MDD), len(weights_M))
    assert torch.allclose(occ[:-1], weights_M, atol=0.02)


def test_the_family_is_split_in_advance_and_its_floors_are_small():
    assert len(FAMILY) >= 8 and not set(TUNING) & set(TEST) and set(TUNING) | set(TEST) == set(FAMILY)
    kinds = {p.covariance for p in FAMILY.values()}
    assert kinds == {"isotropic", "anisotropic", "lowrank"}
    modes = {m for p in FAMILY.values() for m in p.modes_per_caption}
    assert min(modes) == 2 and max(modes) == 8
    for p in FAMILY.values():
        ref = true_sample_reference(p, torch.arange(2000 * p.num_captions) % p.num_captions, seed=0)
        assert ref["fd"] < 0.25 and ref["modes_lost"] == 0


def test_a_user_problem_plugs_in_through_the_interface():
    problem = GaussianMixtureProblem(name="mine", num_captions=2, modes_per_caption=(3, 5), frames=2, numbers=3,
                                     covariance="lowrank", rank=1, seed=7)
    labels = torch.arange(1000) % 2
    out = evaluate_samples(problem, problem.sample(labels, torch.Generator().manual_seed(0)), labels)
    assert out["modes_lost"] == 0 and out["fd"] < 0.3
