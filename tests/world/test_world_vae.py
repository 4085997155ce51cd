"""The portrait world's VAE, trained for real at a small step count: it learns to reconstruct clips
it never saw, is cached under the key of its settings, and resolves from its world URI.

A short run (the full one, ``w2svd world build --config portrait``, takes minutes; its numbers
are in docs/benchmarks.md, "Portrait world"), so the asserted bounds are what must hold after a
hundred Adam steps, not the world's 28 dB target.
"""

import numpy as np
import pytest
import torch

from w2svd import world, world_vae
from w2svd.config import load_config

STEPS = 120


@pytest.fixture
def small_world(tmp_path, monkeypatch):
    monkeypatch.setenv("W2SVD_CACHE_DIR", str(tmp_path / "cache"))
    config = tmp_path / "tiny-portrait.yaml"
    config.write_text(f"base: portrait\nmodel: {{vae: 'world:{config}/vae'}}\n"
                      f"world: {{vae_steps: {STEPS}, vae_clips: 16, vae_test_clips: 4}}\n")
    return str(config)


@pytest.mark.timeout(600)
def test_world_vae_learns_unseen_clips_and_is_cached_by_its_settings(small_world):
    cfg = load_config(small_world)
    frames, height, width = world.first_bucket_size(cfg)
    test_clips, _ = world.render_clips(world.vae_test_seed(cfg), cfg.world.vae_test_clips, frames, height, width,
                                       cfg.data.fps)
    untrained = float(np.mean(world_vae.reconstruction_psnr(world_vae.build_vae_module(cfg).eval(), test_clips)))

    lines = []
    folder, report = world_vae.build_world_vae(small_world, log=lines.append)
    assert folder.name == f"vae-{world.vae_key(cfg)}" and any("training" in line for line in lines)
    # Learned, measured on clips of disjoint seeds, on the saved (float16) weights.
    assert report["test_psnr_saved"] >= untrained + 5.0, (untrained, report["test_psnr_saved"])
    assert report["test_psnr_saved"] >= 15.0
    assert report["test_psnr_saved"] == pytest.approx(report["test_psnr"], abs=0.2)  # float16 costs little
    assert [p["step"] for p in report["curve"]] == [100, STEPS]

    # The URI resolves to that folder; the weights load with the measured latent scale.
    assert world.resolve_world_uri(f"world:{small_world}/vae") == folder
    vae = world_vae.load_vae(folder)
    assert vae.config.scaling_factor == pytest.approx(report["scaling_factor"])
    with torch.no_grad():
        z = vae.encode(world.to_pixels(test_clips[:1])).latent_dist.mode() * vae.config.scaling_factor
    assert 0.3 < float(z.std()) < 3.0  # roughly unit-variance latents for the diffusion model

    # The build's strip: unseen clips above their round trip, a PNG that decodes to that layout.
    import cv2

    from pipelines.world import write_vae_strip

    png = write_vae_strip(small_world, folder, folder / "samples.png", count=2).read_bytes()
    strip = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert strip.ndim == 3 and strip.shape[2] == 3 and strip.shape[0] >= 2 * height

    # Same settings: the cached folder, no training. Another setting: another key, not built.
    again = []
    assert world_vae.build_world_vae(small_world, log=again.append)[0] == folder
    assert not any("training" in line for line in again)
    other = load_config(small_world, ["world.vae_steps=121"])
    assert world.vae_key(other) != world.vae_key(cfg)
