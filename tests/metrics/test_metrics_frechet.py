import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from w2svd.metrics.clips import as_clips_BTHWC
from w2svd.metrics.frechet import FrechetDistance, fid, fvd


def frechet_reference(a_ND: np.ndarray, b_ND: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), unbiased covariances."""
    mu1, mu2 = a_ND.mean(0), b_ND.mean(0)
    s1, s2 = np.cov(a_ND, rowvar=False), np.cov(b_ND, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


class Features(nn.Identity):
    """Passes precomputed features through, so the statistics can be checked exactly."""

    num_features = 4


class MeanColourPerFrame(nn.Module):
    """A tiny clip network: per-frame mean RGB of the first 3 frames → [B, 9]."""

    num_features = 9

    def forward(self, clips_BTHWC):
        return as_clips_BTHWC(clips_BTHWC)[:, :3].float().mean(dim=(2, 3)).flatten(1) / 255.0


class MeanColour(nn.Module):
    """A tiny frame network: mean RGB and its square → [N, 6]."""

    num_features = 6

    def forward(self, frames_NHWC):
        m = frames_NHWC.float().mean(dim=(1, 2)) / 255.0
        return torch.cat([m, m**2], dim=1)


def test_matches_scipy_reference_on_gaussian_features():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 4, generator=g, dtype=torch.float64)
    b = (
        torch.randn(48, 4, generator=g, dtype=torch.float64)
        @ torch.diag(torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64))
        + 0.3
    )
    fd = FrechetDistance(Features(), unit="clip", batch_size=7)
    fd.update(a, real=True)
    fd.update(b, real=False)
    assert fd.compute() == pytest.approx(frechet_reference(a.numpy(), b.numpy()), rel=1e-4, abs=1e-6)


def test_merged_worker_states_equal_one_pass():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, 4, generator=g), torch.randn(30, 4, generator=g) + 0.5
    one = FrechetDistance(Features())
    one.update(a, real=True)
    one.update(b, real=False)
    w1, w2, reducer = FrechetDistance(Features()), FrechetDistance(Features()), FrechetDistance(Features())
    w1.update(a[:25], real=True)
    w1.update(b[:10], real=False)
    w2.update(a[25:], real=True)
    w2.update(b[10:], real=False)
    reducer.merge(w1.state())  # a reducer that never saw a sample itself
    reducer.merge(w2)
    assert reducer.compute() == pytest.approx(one.compute(), rel=1e-9)
    assert w1.compute() != pytest.approx(one.compute(), rel=1e-3)


def test_identical_sets_near_zero_and_shifted_set_larger(face_clips):
    real = face_clips(B=6, T=4, H=32, W=32)
    same = fvd(real, real, MeanColourPerFrame())
    brighter = (real.int() + 40).clamp(max=255).to(torch.uint8)
    shifted = fvd(real, brighter, MeanColourPerFrame())
    assert abs(same) < 1e-6
    assert shifted > 1e-3 and shifted > 100 * abs(same)


def test_fid_counts_every_frame_as_a_sample(face_clips):
    real, fake = face_clips(B=2, T=5, H=32, W=32), face_clips(B=3, T=5, H=32, W=32, dx_per_frame=2)
    fd = FrechetDistance(MeanColour(), unit="frame")
    fd.update(real, real=True)
    fd.update(fake, real=False)
    assert int(fd.metric.real_features_num_samples) == 10 and int(fd.metric.fake_features_num_samples) == 15
    assert fd.compute() == pytest.approx(fid(real, fake, MeanColour()), rel=1e-9)
    assert fd.name == "fid/MeanColour"
