import cv2
import numpy as np
import pytest
import scipy.ndimage
import torch

from w2svd.metrics import vbench as vb
from w2svd.metrics.weights import MissingWeightsError


@pytest.fixture
def clips(face_clips):
    static = face_clips(B=2, T=8, H=64, W=64)
    moving = face_clips(B=2, T=8, H=64, W=64, dx_per_frame=3)
    jerky = moving.clone()
    jerky[:, 1::2] = moving[:, 1::2].roll(6, dims=3)  # every other frame jumps sideways
    return {"static": static, "moving": moving, "jerky": jerky}


def test_temporal_flickering_matches_vbench_formula_and_static_is_one(clips):
    rand = torch.randint(0, 256, (2, 5, 16, 16, 3), dtype=torch.uint8)
    per_clip = [
        (255.0 - np.mean([cv2.absdiff(c[i], c[i + 1]).mean() for i in range(len(c) - 1)])) / 255.0
        for c in rand.numpy()
    ]
    assert vb.temporal_flickering(rand) == pytest.approx(np.mean(per_clip), rel=1e-6)
    assert vb.temporal_flickering(clips["static"]) == 1.0
    assert vb.temporal_flickering(clips["moving"]) < 1.0


def test_dynamic_degree_separates_static_from_moving(clips):
    assert vb.dynamic_degree(clips["static"]) == 0.0
    assert vb.dynamic_degree(clips["moving"]) == 1.0
    assert vb.dynamic_degree(torch.cat([clips["static"], clips["moving"]])) == 0.5
    # 3 px/frame at 24 fps is sampled every 3rd frame (~8 fps as VBench): still moving
    assert vb.dynamic_degree(clips["moving"], fps=24) == 1.0
    assert (
        max(vb.flow_scores(clips["static"][0].numpy()))
        < 0.5
        < min(vb.flow_scores(clips["moving"][0].numpy()))
    )


def test_motion_smoothness_prefers_smooth_motion(clips):
    static, smooth, jerky = (vb.motion_smoothness(clips[k]) for k in ("static", "moving", "jerky"))
    assert static == pytest.approx(1.0, abs=1e-3)
    assert 1.0 >= static >= smooth > jerky >= 0.0


def ssim_reference(a, b):
    f = lambda x: scipy.ndimage.gaussian_filter(x, 1.5, truncate=3.5, mode="mirror")  # noqa: E731
    a, b = a.astype(np.float64), b.astype(np.float64)
    ma, mb = f(a), f(b)
    va, vb_, cab = f(a * a) - ma**2, f(b * b) - mb**2, f(a * b) - ma * mb
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return ((2 * ma * mb + c1) * (2 * cab + c2) / ((ma**2 + mb**2 + c1) * (va + vb_ + c2))).mean()


def test_ssim_matches_reference():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (24, 20)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 30, a.shape), 0, 255).astype(np.float32)
    assert vb.ssim(a, b) == pytest.approx(ssim_reference(a, b), rel=1e-6)
    assert vb.ssim(a, a) == pytest.approx(1.0)


def test_consistency_is_one_when_static_and_drops_with_jumps(clips):
    for fn in (vb.subject_consistency, vb.background_consistency):
        static, smooth, jerky = (fn(clips[k]) for k in ("static", "moving", "jerky"))
        assert static == pytest.approx(1.0)
        assert static > smooth > jerky >= 0.0


def test_consistency_uses_first_and_previous_frame():
    frames = [np.array(v) for v in (1.0, 2.0, 3.0)]
    sim = lambda a, b: float(1.0 / (1.0 + abs(a - b)))  # noqa: E731
    expected = np.mean([0.5 * (sim(1, 2) + sim(1, 2)), 0.5 * (sim(1, 3) + sim(2, 3))])
    assert vb._consistency(frames, sim) == pytest.approx(expected)


def test_i2v_consistency_matches_hand_computation_and_follows_the_reference(clips):
    rng = np.random.default_rng(1)
    clip_BTHWC = rng.integers(0, 256, (2, 2, 24, 20, 3)).astype(np.uint8)
    image_BHWC = rng.integers(0, 256, (2, 24, 20, 3)).astype(np.uint8)
    luma = lambda x: x.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)  # noqa: E731
    expected = []
    for c, im in zip(clip_BTHWC, image_BHWC, strict=True):
        img, f0, f1 = luma(im), luma(c[0]), luma(c[1])
        s = lambda a, b: max(0.0, ssim_reference(a, b))  # noqa: E731
        # frame 0: its agreement with the reference; frame 1: the reference and frame 0
        expected.append(np.mean([s(img, f0), 0.5 * (s(img, f1) + s(f0, f1))]))
    assert vb.i2v_subject_consistency(clip_BTHWC, image_BHWC) == pytest.approx(np.mean(expected), rel=1e-5)
    static = clips["static"]
    first = static[:, 0].numpy()
    assert vb.i2v_subject_consistency(static, first) == pytest.approx(1.0)
    assert vb.i2v_subject_consistency(static, np.roll(first, 8, axis=2)) < 0.9  # a reference the clip ignores
    with pytest.raises(ValueError, match="one \\[H, W, 3\\] image per clip"):
        vb.i2v_subject_consistency(static, first[:1])


def test_quality_proxies_rank_degraded_clips_lower(clips):
    sharp = clips["static"]
    blurred = torch.from_numpy(np.stack([[cv2.GaussianBlur(f, (9, 9), 3) for f in c] for c in sharp.numpy()]))
    noisy = (sharp.int() + torch.randint(-40, 41, sharp.shape)).clamp(0, 255).to(torch.uint8)
    grey = torch.full_like(sharp, 128)
    q = vb.imaging_quality
    assert q(sharp) > q(blurred) and q(sharp) > q(noisy) and q(grey) == 0.0
    assert vb.aesthetic_quality(sharp) > vb.aesthetic_quality(blurred) > vb.aesthetic_quality(grey) == 0.0
    for v in (q(sharp), q(noisy), vb.aesthetic_quality(noisy)):
        assert 0.0 <= v <= 1.0


def test_report_labels_every_dimension_and_real_backends_need_their_weights(clips, tmp_path):
    report = vb.vbench_report(clips["moving"], fps=8)
    assert set(report) == set(vb.DIMENSIONS)
    assert report["temporal_flickering"]["backend"] == "vbench"
    assert all(report[k]["backend"] == "offline-proxy" for k in vb.VBENCH_WEIGHTS)
    assert report["dynamic_degree"]["value"] == vb.dynamic_degree(clips["moving"], fps=8)
    with pytest.raises(MissingWeightsError, match="raft-things.pth"):
        vb.vbench_report(clips["moving"], dimensions=["dynamic_degree"], weights_dir=tmp_path)
    only_exact = vb.vbench_report(clips["moving"], dimensions=["temporal_flickering"], weights_dir=tmp_path)
    assert only_exact["temporal_flickering"]["backend"] == "vbench"
