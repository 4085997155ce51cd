"""The generation API: a batch is one backbone call per step, and each clip depends on its seed only."""

import numpy as np
import pytest
import torch

from w2svd.config import load_config
from w2svd.export import sampler_settings_for
from w2svd.generate import GeneratorBundle
from w2svd.models.encoders import LatentEncoder
from w2svd.models.hunyuan import build_backbone

PROMPTS = ["a person talking", "a person blinking", "a woman with long hair", "a man, green background"]
SEEDS = [3, 1, 4, 1]


def bundle(overrides=()) -> GeneratorBundle:
    cfg = load_config("debug", list(overrides))
    backbone = build_backbone(cfg.model).eval().requires_grad_(False)
    return GeneratorBundle(backbone, sampler_settings_for(cfg), cfg, LatentEncoder(cfg, device="cpu"), "test")


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("sampler", ["renoise", "euler"])
def test_a_batch_equals_its_clips_one_by_one_with_fewer_backbone_calls(sampler):
    b = bundle([f"method.sampler={sampler}"])
    assert b.settings.steps == 4 and b.settings.mode == sampler
    calls = count_calls(b.backbone)
    batched = b.generate_latents(PROMPTS, SEEDS, 9, 64, 48)
    assert calls[0] == b.settings.steps  # one call per step for the whole batch
    calls[0] = 0
    alone = torch.cat([b.generate_latents([p], [s], 9, 64, 48) for p, s in zip(PROMPTS, SEEDS)])
    assert calls[0] == len(PROMPTS) * b.settings.steps  # 4x more calls one by one
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
    # the same seed with the same prompt gives the same clip whatever shares its batch
    torch.testing.assert_close(batched[1], b.generate_latents(["x", PROMPTS[1]], [9, SEEDS[1]], 9, 64, 48)[1],
                               rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched[1], batched[3])  # same seed, other prompt: another clip


def test_generate_returns_uint8_clips_of_the_requested_size():
    b = bundle()
    clips = b.generate(PROMPTS[:2], seeds=[0, 1], num_frames=9, height=48, width=64)
    assert clips.dtype == torch.uint8 and clips.shape == (2, 9, 48, 64, 3)


def test_bad_sizes_and_images_are_value_errors():
    b = bundle()
    with pytest.raises(ValueError, match="num_frames"):
        b.generate_latents(["a"], [0], 8, 64, 48)
    with pytest.raises(ValueError, match="multiples"):
        b.generate_latents(["a"], [0], 9, 60, 48)
    with pytest.raises(ValueError, match="text-to-video"):
        b.generate_latents(["a"], [0], 9, 64, 48, images=[np.zeros((64, 48, 3), np.uint8)])
    with pytest.raises(ValueError, match="one seed"):
        b.generate_latents(["a", "b"], [0], 9, 64, 48)


def test_image_to_video_needs_and_uses_the_reference_image():
    b = bundle(["model.family=hunyuan-i2v", "model.arch.in_channels=33", "model.arch.guidance_embeds=false",
                "model.arch.image_condition_type=latent_concat", "method.guidance=none"])
    with pytest.raises(ValueError, match="reference image"):
        b.generate_latents(["a"], [0], 9, 64, 48)
    dark, bright = np.zeros((80, 60, 3), np.uint8), np.full((80, 60, 3), 255, np.uint8)
    out = b.generate_latents(["a", "a"], [0, 0], 9, 64, 48, images=[dark, bright])
    assert out.shape == (2, 16, 3, 8, 6)
    assert not torch.allclose(out[0], out[1])  # the image conditions the clip


def test_timings_split_one_generation_into_its_phases():
    b = bundle()
    timings: dict = {}
    b.generate(PROMPTS[:2], seeds=[0, 1], timings=timings)
    assert set(timings) == {"encode_s", "transformer_s", "decode_s"}
    assert all(v > 0 for v in timings.values())
