"""Exact metrics of samples against a known ``Problem``: Fréchet to the true moments, on-mode
counts by Mahalanobis distance, modes lost and mode-occupancy total variation.

Every number is an estimate from finitely many samples, so each comes with its **floor**: the
same estimator applied to as many true samples (``true_sample_reference``). A distance is only
meaningful when it is well above its floor.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from w2svd.toy.problems import Problem

ON_MODE_QUANTILE = 0.999
# A mode is lost when it holds under this fraction of its expected share of its caption's samples.
LOST_FRACTION = 0.25


def frechet_to_moments(samples_ND: torch.Tensor, mean_D: torch.Tensor, cov_DD: torch.Tensor) -> float:
    """``FD = ‖μ̂ − μ‖² + Tr(Σ̂ + Σ − 2 (Σ^½ Σ̂ Σ^½)^½)`` between samples and exact moments ``(μ, Σ)``.

    ``μ̂, Σ̂`` are the sample mean and (unbiased) covariance; float64 throughout.
    """
    x_ND = samples_ND.double()
    mu_D = x_ND.mean(0)
    sig_DD = torch.cov(x_ND.T)
    evals_D, evecs_DD = torch.linalg.eigh(cov_DD.double())
    root_DD = evecs_DD @ torch.diag(evals_D.clamp_min(0).sqrt()) @ evecs_DD.T
    cross = torch.linalg.eigvalsh(root_DD @ sig_DD @ root_DD).clamp_min(0).sqrt().sum()
    return float(((mu_D - mean_D.double()) ** 2).sum() + torch.trace(cov_DD.double()) + torch.trace(sig_DD)
                 - 2 * cross)


def mahalanobis_sq_NM(x_ND: torch.Tensor, means_MD: torch.Tensor, covs_MDD: torch.Tensor) -> torch.Tensor:
    """``d²[n, m] = (x_n − μ_m)ᵀ Σ_m⁻¹ (x_n − μ_m)``, through the Cholesky factor ``Σ_m = L_m L_mᵀ``."""
    chol_MDD = torch.linalg.cholesky(covs_MDD.double())
    diff_MND = x_ND.double()[None] - means_MD.double()[:, None]
    white_MND = torch.linalg.solve_triangular(chol_MDD, diff_MND.transpose(1, 2), upper=False).transpose(1, 2)
    return (white_MND**2).sum(-1).T


@lru_cache(maxsize=64)
def chi2_quantile(dim: int, q: float = ON_MODE_QUANTILE) -> float:
    """The ``q`` quantile of ``χ²_dim``: a sample of ``N(μ, Σ)`` has ``d² ≤`` it with probability ``q``."""
    from scipy.stats import chi2

    return float(chi2.ppf(q, dim))


def assign_modes_N(x_ND: torch.Tensor, weights_M: torch.Tensor, means_MD: torch.Tensor,
                   covs_MDD: torch.Tensor, q: float = ON_MODE_QUANTILE) -> torch.Tensor:
    """The mode each sample sits on, or −1 when it sits on none.

    On mode m: ``d²[n, m] ≤ χ²_D(q)``. Among the modes it is on, a sample goes to the most
    responsible one, ``argmax_m log w_m − ½ d²[n, m] − ½ log det Σ_m`` (the Bayes assignment).
    """
    d2_NM = mahalanobis_sq_NM(x_ND, means_MD, covs_MDD)
    logdet_M = torch.logdet(covs_MDD.double())
    score_NM = weights_M.double().log()[None] - 0.5 * d2_NM - 0.5 * logdet_M[None]
    on_NM = d2_NM <= chi2_quantile(x_ND.shape[1], q)
    score_NM = score_NM.masked_fill(~on_NM, -math.inf)
    best_N = score_NM.argmax(1)
    return torch.where(on_NM.any(1), best_N, torch.full_like(best_N, -1))


def occupancy_M1(assign_N: torch.Tensor, num_modes: int) -> torch.Tensor:
    """Shares ``[p_0, …, p_{M−1}, p_off]`` of samples per mode and off every mode (sums to 1)."""
    idx_N = torch.where(assign_N < 0, torch.full_like(assign_N, num_modes), assign_N)
    return torch.bincount(idx_N, minlength=num_modes + 1).double() / max(len(assign_N), 1)


def occupancy_tv(occ_M1: torch.Tensor, weights_M: torch.Tensor) -> float:
    """``TV = ½ (Σ_m |p_m − w_m| + p_off)``: the ideal sampler puts every sample on a mode, ``w_m`` of them on m."""
    w_M = weights_M.double()
    return float(0.5 * ((occ_M1[:-1] - w_M).abs().sum() + occ_M1[-1]))


def lost_modes(occ_M1: torch.Tensor, weights_M: torch.Tensor, fraction: float = LOST_FRACTION) -> int:
    """Modes holding under ``fraction`` of their expected share ``w_m`` (on-mode samples only count)."""
    return int((occ_M1[:-1] < fraction * weights_M.double()).sum())


def nearest_mode_shares_M(x_ND: torch.Tensor, means_MD: torch.Tensor) -> torch.Tensor:
    """Shares of samples whose nearest mean (Euclidean) is mode m, wherever the sample sits.

    Not a mode count by itself (pure noise spreads over every mode); beside the on-mode count it
    tells a collapse (nothing even near a mode) from blur (samples near it, outside its χ² radius).
    """
    nearest_N = torch.cdist(x_ND.double(), means_MD.double()).argmin(1)
    return torch.bincount(nearest_N, minlength=len(means_MD)).double() / max(len(x_ND), 1)


def evaluate_samples(problem: Problem, samples_ND: torch.Tensor, labels_N: torch.Tensor,
                     q: float = ON_MODE_QUANTILE) -> dict:
    """Per-caption metrics averaged over captions (modes lost: summed).

    fd: Fréchet to the exact moments; modes_lost, mode_tv: by on-mode occupancy; on_mode: share
    of samples on some mode; modes_empty_nearest: modes whose nearest-mean share is under
    ``LOST_FRACTION`` of their weight (collapse, not blur); spread: ``Tr Σ̂ / Tr Σ`` (below 1: too narrow).
    """
    fds, tvs, on_mode, spread, lost, empty = [], [], [], [], 0, 0
    for k in range(problem.num_captions):
        x_ND = samples_ND[labels_N == k].double()
        mean_D, cov_DD = problem.moments(k)
        weights_M, means_MD, covs_MDD = problem.modes(k)
        fds.append(frechet_to_moments(x_ND, mean_D, cov_DD))
        spread.append(float(torch.cov(x_ND.T).trace() / cov_DD.trace()))
        occ_M1 = occupancy_M1(assign_modes_N(x_ND, weights_M, means_MD, covs_MDD, q), len(weights_M))
        tvs.append(occupancy_tv(occ_M1, weights_M))
        lost += lost_modes(occ_M1, weights_M)
        empty += int((nearest_mode_shares_M(x_ND, means_MD) < LOST_FRACTION * weights_M).sum())
        on_mode.append(float(1 - occ_M1[-1]))
    n = problem.num_captions
    return {"fd": sum(fds) / n, "modes_lost": lost, "mode_tv": sum(tvs) / n, "on_mode": sum(on_mode) / n,
            "modes_empty_nearest": empty, "spread": sum(spread) / n}


def eval_labels(problem: Problem, n: int) -> torch.Tensor:
    """``n`` labels, every caption equally often (the evaluation sets' layout)."""
    return torch.arange(n) % problem.num_captions


def true_sample_reference(problem: Problem, labels_N: torch.Tensor, seed: int) -> dict:
    """The floor of every metric: true samples with the same labels through the same estimators."""
    x_ND = problem.sample(labels_N, torch.Generator().manual_seed(seed))
    return evaluate_samples(problem, x_ND, labels_N)
