"""Known caption-conditioned distributions over a tiny "video", and the fixed family of them.

A **problem** is anything with this small interface (``Problem``): the toy runners and the
metrics use nothing else, so a user plugs in their own distribution without editing them.

    name: str                  a short id, used in result rows
    num_captions: int          captions are the integers 0 … K−1
    frames: int                the "video" has ``frames`` frames of ``dim // frames`` numbers
    dim: int                   samples are flat vectors ``[B, dim]``
    cond(labels_B) -> Cond     the conditions a denoiser sees (here a one-hot caption)
    sample(labels_B, generator) -> x_BD      true samples, one per label, from ``generator``
    moments(k) -> (mean_D, cov_DD)           exact mean and covariance of caption ``k`` (float64)
    modes(k) -> (weights_M, means_MD, covs_MDD)   the Gaussian modes of caption ``k`` (float64)

``moments`` feeds the Fréchet distance; ``modes`` the on-mode and occupancy counts. A problem
that is not a mixture can return one "mode" (its moments) from ``modes``.

``GaussianMixtureProblem`` builds a mixture per caption whose modes are motions: a start vector
plus a per-frame drift, so a mode is a trajectory over the frames. What the family varies is
what makes distillation hard: modes per caption, covariance shape (isotropic, anisotropic,
low-rank plus noise), separation, dimension and frame count, caption count, mode weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

from w2svd.models.base import Cond

Covariance = Literal["isotropic", "anisotropic", "lowrank"]


@runtime_checkable
class Problem(Protocol):
    name: str
    num_captions: int
    frames: int
    dim: int

    def cond(self, labels_B: torch.Tensor) -> Cond: ...

    def sample(self, labels_B: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def moments(self, k: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def modes(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def mixture_moments(weights_M: torch.Tensor, means_MD: torch.Tensor,
                    covs_MDD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments of ``Σ_m w_m N(μ_m, Σ_m)``: ``μ̄ = Σ w_m μ_m``, ``Σ̄ = Σ w_m (Σ_m + μ_m μ_mᵀ) − μ̄ μ̄ᵀ``."""
    w_M = weights_M.double() / weights_M.double().sum()
    mu_MD, cov_MDD = means_MD.double(), covs_MDD.double()
    mean_D = w_M @ mu_MD
    second_DD = torch.einsum("m,mij->ij", w_M, cov_MDD) + torch.einsum("m,mi,mj->ij", w_M, mu_MD, mu_MD)
    return mean_D, second_DD - torch.outer(mean_D, mean_D)


@dataclass
class GaussianMixtureProblem:
    """Caption ``k`` has ``modes_per_caption[k]`` Gaussian motion modes.

    mean of mode m: ``μ_m[f] = separation·(a_m + 0.4·f·b_m)``, ``a_m, b_m ~ N(0, I_numbers)``
    covariance: isotropic ``σ²I``; anisotropic ``Q diag(σ²·a^u) Qᵀ`` with ``u ~ U[−1, 1]`` and a
    random rotation ``Q`` per mode; low-rank ``U diag(s²) Uᵀ + σ²I`` with ``rank`` random
    orthonormal directions of std ``lowrank_std`` per mode.
    weights: equal, or ``unequal`` (∝ 1, 2, …, M, shuffled per caption).
    """

    name: str = "custom"
    num_captions: int = 4
    modes_per_caption: tuple[int, ...] = (4,)
    frames: int = 4
    numbers: int = 8
    covariance: Covariance = "isotropic"
    mode_std: float = 0.25
    separation: float = 1.5
    anisotropy: float = 4.0
    rank: int = 2
    lowrank_std: float = 0.6
    unequal_weights: bool = False
    seed: int = 0
    means_KMD: torch.Tensor = field(init=False, repr=False)
    weights_KM: torch.Tensor = field(init=False, repr=False)
    chol_KMDD: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        counts = tuple(self.modes_per_caption)
        if len(counts) == 1:
            counts = counts * self.num_captions
        if len(counts) != self.num_captions or min(counts) < 1:
            raise ValueError(f"modes_per_caption {self.modes_per_caption} must give >= 1 mode for each of "
                             f"{self.num_captions} captions")
        self.modes_per_caption = counts
        g = torch.Generator().manual_seed(self.seed)
        K, M, F, N, D = self.num_captions, max(counts), self.frames, self.numbers, self.dim
        # Drawn as one [K, M, N] block (padded modes unused) so the default problem keeps the
        # exact distribution it had before the family existed.
        start_KMN = self.separation * torch.randn(K, M, N, generator=g)
        drift_KMN = 0.4 * self.separation * torch.randn(K, M, N, generator=g)
        t_F = torch.arange(F, dtype=torch.float32)
        self.means_KMD = (start_KMN[:, :, None, :] + t_F[None, None, :, None] * drift_KMN[:, :, None, :]
                          ).reshape(K, M, D)
        mask_KM = torch.arange(M)[None, :] < torch.tensor(counts)[:, None]
        raw_KM = torch.ones(K, M)
        if self.unequal_weights:
            raw_KM = torch.stack([torch.randperm(M, generator=g).float() + 1 for _ in range(K)])
        raw_KM = raw_KM * mask_KM
        self.weights_KM = raw_KM / raw_KM.sum(1, keepdim=True)
        self.chol_KMDD = torch.linalg.cholesky(self._covariances(g, K, M, D))

    @property
    def dim(self) -> int:
        return self.frames * self.numbers

    def _covariances(self, g: torch.Generator, K: int, M: int, D: int) -> torch.Tensor:
        eye = torch.eye(D, dtype=torch.float64)
        if self.covariance == "isotropic":
            return (self.mode_std**2 * eye).expand(K, M, D, D).clone()
        q_KMDD, _ = torch.linalg.qr(torch.randn(K, M, D, D, generator=g, dtype=torch.float64))
        if self.covariance == "anisotropic":
            u_KMD = 2 * torch.rand(K, M, D, generator=g, dtype=torch.float64) - 1
            lam_KMD = self.mode_std**2 * self.anisotropy**u_KMD
            return q_KMDD @ torch.diag_embed(lam_KMD) @ q_KMDD.transpose(-1, -2)
        if self.covariance == "lowrank":
            u_KMDR = q_KMDD[..., : self.rank]
            return self.lowrank_std**2 * u_KMDR @ u_KMDR.transpose(-1, -2) + self.mode_std**2 * eye
        raise ValueError(f"covariance {self.covariance!r}; choose isotropic, anisotropic or lowrank")

    # -- the Problem interface -----------------------------------------------------------------
    def cond(self, labels_B: torch.Tensor) -> Cond:
        return Cond(text=torch.nn.functional.one_hot(labels_B, self.num_captions).float())

    def sample(self, labels_B: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        counts = set(self.modes_per_caption)
        if len(counts) == 1 and not self.unequal_weights:
            modes_B = torch.randint(counts.pop(), labels_B.shape, generator=generator)
        else:  # inverse CDF of the caption's mode weights
            cdf_BM = self.weights_KM[labels_B].cumsum(1)
            u_B1 = torch.rand(len(labels_B), 1, generator=generator)
            modes_B = (u_B1 > cdf_BM).sum(1).clamp_max(self.weights_KM.shape[1] - 1)
        z_BD = torch.randn(len(labels_B), self.dim, generator=generator)
        mean_BD = self.means_KMD[labels_B, modes_B]
        if self.covariance == "isotropic":
            return mean_BD + self.mode_std * z_BD
        out_BD = mean_BD.clone()
        key_B = labels_B * self.means_KMD.shape[1] + modes_B
        for key in key_B.unique().tolist():  # one matmul per mode, not a [B, D, D] gather
            idx = key_B == key
            chol_DD = self.chol_KMDD[key // self.means_KMD.shape[1], key % self.means_KMD.shape[1]].float()
            out_BD[idx] += z_BD[idx] @ chol_DD.T
        return out_BD

    def modes(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.modes_per_caption[k]
        chol_MDD = self.chol_KMDD[k, :m]
        return (self.weights_KM[k, :m].double(), self.means_KMD[k, :m].double(),
                chol_MDD @ chol_MDD.transpose(-1, -2))

    def moments(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return mixture_moments(*self.modes(k))


def default_problem(seed: int = 0) -> GaussianMixtureProblem:
    """``w2svd bench toy``'s problem: 4 captions × 4 isotropic motion modes, 4 frames × 8 numbers."""
    return GaussianMixtureProblem(name="iso-4x4", seed=seed)


# ---------------------------------------------------------------------------------------------
# The family. The split is part of the benchmark's definition, fixed before any tuning: the
# recipe search sees only TUNING; the reported numbers come only from TEST.

FAMILY: dict[str, GaussianMixtureProblem] = {p.name: p for p in [
    # tuning
    default_problem(),
    GaussianMixtureProblem(name="aniso-6x3", num_captions=6, modes_per_caption=(3,), covariance="anisotropic",
                           anisotropy=4.0, separation=1.5, seed=11),
    GaussianMixtureProblem(name="lowrank-3x6-f6", num_captions=3, modes_per_caption=(6,), frames=6,
                           covariance="lowrank", rank=4, mode_std=0.15, separation=1.2, seed=12),
    # test
    GaussianMixtureProblem(name="iso-2x8-wide", num_captions=2, modes_per_caption=(8,), mode_std=0.3,
                           separation=2.0, seed=21),
    GaussianMixtureProblem(name="aniso-4x5-close", num_captions=4, modes_per_caption=(5,), numbers=6,
                           covariance="anisotropic", anisotropy=6.0, separation=0.9, seed=22),
    GaussianMixtureProblem(name="lowrank-8x2", num_captions=8, modes_per_caption=(2,), covariance="lowrank",
                           rank=2, mode_std=0.2, separation=1.5, seed=23),
    GaussianMixtureProblem(name="iso-4x2to8-unequal", num_captions=4, modes_per_caption=(2, 4, 6, 8),
                           unequal_weights=True, separation=1.5, seed=24),
    GaussianMixtureProblem(name="aniso-3x4-f8", num_captions=3, modes_per_caption=(4,), frames=8, numbers=6,
                           covariance="anisotropic", anisotropy=3.0, separation=1.3, seed=25),
]}
TUNING: tuple[str, ...] = ("iso-4x4", "aniso-6x3", "lowrank-3x6-f6")
TEST: tuple[str, ...] = ("iso-2x8-wide", "aniso-4x5-close", "lowrank-8x2", "iso-4x2to8-unequal", "aniso-3x4-f8")


def split_of(name: str) -> str:
    return "tuning" if name in TUNING else "test" if name in TEST else "user"


def describe(p: GaussianMixtureProblem) -> dict:
    """The numbers that define a family problem, for protocol.json and the docs."""
    return {"name": p.name, "split": split_of(p.name), "captions": p.num_captions,
            "modes_per_caption": list(p.modes_per_caption), "frames": p.frames, "dim": p.dim,
            "covariance": p.covariance, "mode_std": p.mode_std, "separation": p.separation,
            "anisotropy": p.anisotropy if p.covariance == "anisotropic" else None,
            "rank": p.rank if p.covariance == "lowrank" else None, "unequal_weights": p.unequal_weights,
            "seed": p.seed, "mean_mode_distance": round(_mean_mode_distance(p), 3)}


def _mean_mode_distance(p: GaussianMixtureProblem) -> float:
    dists = []
    for k in range(p.num_captions):
        _, mu_MD, _ = p.modes(k)
        if len(mu_MD) > 1:
            d = torch.cdist(mu_MD, mu_MD)
            dists.append(float(d.sum() / (len(mu_MD) * (len(mu_MD) - 1))))
    return sum(dists) / len(dists) / math.sqrt(p.dim) if dists else 0.0
