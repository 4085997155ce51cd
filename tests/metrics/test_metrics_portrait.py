import numpy as np
import pytest
import torch

from w2svd.metrics import portrait as pt

synth = pytest.importorskip("w2svd.data.synth")


def synth_set(n, seed, **overrides):
    rng = np.random.default_rng(seed)
    fs = [synth.sample_factors(rng, orientation="portrait", lengths=(17,)) for _ in range(n)]
    for f in fs:
        f.update({k: (v(f) if callable(v) else v) for k, v in overrides.items()})
    return fs, torch.from_numpy(np.stack([synth.render_clip(f) for f in fs]))


def test_detector_finds_synthetic_faces_and_not_noise():
    _, clips = synth_set(3, seed=0)
    noise = torch.randint(0, 256, clips.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert pt.face_detection_rate(clips) >= 0.8
    assert pt.face_detection_rate(noise) == 0.0


def test_face_stability_separates_a_still_head_from_a_sliding_one():
    still = {"head_x": lambda f: [36.0] * 17, "head_yaw": [0.0] * 17, "head_turn": "none"}
    slide = {
        "head_x": lambda f: list(np.linspace(26.0, 46.0, 17)),
        "head_yaw": [0.0] * 17,
        "head_turn": "none",
    }
    _, still_clips = synth_set(2, seed=1, **still)
    _, slide_clips = synth_set(2, seed=1, **slide)
    s, m = pt.face_stability(still_clips), pt.face_stability(slide_clips)
    assert s["clips_used"] == m["clips_used"] == 2
    assert m["center_std"] > 0.05 > s["center_std"]
    # a 20 px slide over a 72 px wide frame: centre std ≈ std(linspace(0, 20/72)) ≈ 0.083
    assert m["center_std"] == pytest.approx(np.linspace(0, 20 / 72, 17).std(), rel=0.3)
    assert np.isnan(pt.face_stability(torch.zeros(2, 3, 64, 64, 3, dtype=torch.uint8))["center_std"])


def test_factor_agreement_high_for_true_factors_and_low_for_wrong_ones():
    fs, clips = synth_set(10, seed=2)
    agree = pt.factor_agreement(clips, fs)
    assert set(agree) == {"blink", "blink_timing", "talking", "skin_tone", "hair_color", "background"}
    assert all(0.0 <= v <= 1.0 for v in agree.values())
    assert agree["talking"] >= 0.7 and agree["background"] == 1.0 and agree["hair_color"] >= 0.7
    assert agree["skin_tone"] >= 0.7 and agree["blink_timing"] >= 0.6
    names = list(synth.BACKGROUNDS)
    wrong = [
        dict(
            f,
            talking=not f["talking"],
            blink_frames=[],
            background=names[(names.index(f["background"]) + 1) % len(names)],
        )
        for f in fs
    ]
    bad = pt.factor_agreement(clips, wrong)
    assert bad["talking"] <= 0.3 and bad["background"] == 0.0 and bad["blink_timing"] < agree["blink_timing"]


def test_timing_f1_and_palette_vote():
    assert pt._timing_f1([], []) == 1.0 and pt._timing_f1([3], []) == 0.0
    assert pt._timing_f1([4, 10], [3]) == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    palette = {"a": (0, 0, 0), "b": (100, 100, 100)}
    px = np.array([[1, 1, 1]] * 3 + [[60, 60, 60]] * 5)  # 5 pixels nearer b, but far from it
    assert pt.dominant_palette_entry(px, palette) == "b"
    assert pt.dominant_palette_entry(px, palette, tol=12) == "a"
    assert pt.dominant_palette_entry(px[3:], palette, tol=12) is None


def test_clip_mouth_motion_moves_for_talking_captions_and_needs_a_face():
    # Light skin and a still head: the detector's easy case, so the speech is the only difference.
    easy = {"skin_tone": "light", "head_turn": "none", "head_yaw": [0.0] * 17, "head_x": lambda f: [36.0] * 17}
    _, talking = synth_set(3, seed=4, talking=True, mouth_open=lambda f: list(
        0.5 + 0.45 * np.sin(np.arange(17) * 1.9)), **easy)
    _, silent = synth_set(3, seed=4, talking=False, mouth_open=[0.05] * 17, **easy)
    moving = [pt.clip_mouth_motion(c) for c in talking]
    still = [pt.clip_mouth_motion(c) for c in silent]
    assert all(m is not None and m > pt.TALKING_MOUTH_STD for m in moving), moving
    assert all(m is not None and m < pt.TALKING_MOUTH_STD for m in still), still
    noise = torch.randint(0, 256, talking[0].shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert pt.clip_mouth_motion(noise) is None
