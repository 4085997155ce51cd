import numpy as np
import pytest
import torch

from w2svd.metrics.domain import DOMAIN_TARGETS, DomainVideoEncoder, factor_targets, train_domain_encoder
from w2svd.metrics.frechet import fvd

SMALL = dict(size=32, frames=8, width=8, num_features=16)


def test_training_learns_temporal_order_and_round_trips_through_safetensors(tmp_path, face_clips):
    clips = face_clips(B=12, T=8, H=32, W=32, dx_per_frame=2)  # all move right: order is visible
    enc, losses = train_domain_encoder(clips, steps=60, batch_size=8, **SMALL)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    digest = enc.save(tmp_path / "domain.safetensors")
    loaded = DomainVideoEncoder.from_path(tmp_path / "domain.safetensors")
    assert len(digest) == 64 and loaded.config == enc.config and loaded.num_features == 16
    with torch.no_grad():
        assert torch.allclose(loaded(clips), enc(clips), atol=1e-6)


def test_domain_fvd_zero_for_identical_sets_and_larger_for_shifted_motion(face_clips):
    clips = face_clips(B=8, T=8, H=32, W=32, dx_per_frame=2)
    enc, _ = train_domain_encoder(clips, steps=20, **SMALL)
    reversed_motion = clips.flip(1)
    same = fvd(clips, clips, enc)
    assert abs(same) < 1e-6
    assert fvd(clips, reversed_motion, enc) > 1e-3


def test_factor_targets_follow_the_synthetic_factors():
    synth = pytest.importorskip("w2svd.data.synth")
    rng = np.random.default_rng(0)
    fs = [synth.sample_factors(rng, lengths=(9,), orientation="portrait") for _ in range(8)]
    y = torch.stack([factor_targets(f) for f in fs])
    assert y.shape == (8, len(DOMAIN_TARGETS))
    talking = y[:, DOMAIN_TARGETS.index("talking")]
    assert torch.equal(talking, torch.tensor([float(f["talking"]) for f in fs]))
    blink_rate = y[:, DOMAIN_TARGETS.index("blink_rate")]
    assert torch.allclose(blink_rate, torch.tensor([len(f["blink_frames"]) / 9 for f in fs]))
    clips = [torch.from_numpy(synth.render_clip(f)) for f in fs]
    enc, losses = train_domain_encoder(clips, factors=fs, steps=10, **SMALL)
    assert enc(clips[0]).shape == (1, 16) and all(np.isfinite(losses))
