"""Export contract: the folder layout other stages load, merged LoRA weights, sampling from it."""

from __future__ import annotations

import json

import pytest
import torch

from w2svd.config import load_config
from w2svd.export import (
    SamplerSettings,
    generate_latents,
    load_generator,
    sampler_settings_for,
    save_generator_export,
)
from w2svd.models.hunyuan import build_backbone, dummy_cond
from w2svd.roles import GENERATOR, build_roles_from_config


def _cond(cfg, batch=2):
    return dummy_cond(cfg.model, batch, 4, generator=torch.Generator().manual_seed(1))


def test_full_generator_export_round_trip(tmp_path):
    cfg = load_config("debug")
    backbone = build_backbone(cfg.model)
    settings = sampler_settings_for(cfg)
    out = save_generator_export(backbone, tmp_path / "export", settings, cfg)

    assert (out / "transformer" / "config.json").is_file()
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "config.yaml").is_file()
    raw = json.loads((out / "sampler.json").read_text())
    assert set(raw) == {"steps", "sigmas", "shift", "mode", "guidance_mode", "guidance_scale", "family",
                        "latent_channels", "method"}
    assert raw["steps"] == cfg.method.student_steps == len(raw["sigmas"]) and raw["sigmas"][0] == 1.0

    loaded, loaded_settings = load_generator(out)
    assert loaded_settings == settings
    noise = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = _cond(cfg)
    a = generate_latents(backbone, settings, cond, noise, torch.Generator().manual_seed(2))
    b = generate_latents(loaded, loaded_settings, cond, noise, torch.Generator().manual_seed(2))
    assert a.shape == noise.shape and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)

    # A finetune export doubles as a teacher folder for distillation.
    teacher = build_backbone(load_config("debug", [f"model.teacher={out}"]).model)
    for (k, p), (_, q) in zip(backbone.state_dict().items(), teacher.state_dict().items(), strict=True):
        assert torch.equal(p, q), k


def test_lora_generator_export_merges_only_the_generator_adapter(tmp_path):
    cfg = load_config("debug", ["method.generator=lora"])
    teacher = build_backbone(cfg.model)
    roles = build_roles_from_config(teacher, cfg.method)
    with torch.no_grad():  # make both adapters non-zero, so a wrong merge would show
        for p in roles.critic_parameters() + roles.generator_parameters():
            p.normal_(0, 0.05)
    settings = sampler_settings_for(cfg)
    out = save_generator_export(roles.generator.backbone, tmp_path / "export", settings, cfg, adapter=GENERATOR)
    assert (out / "transformer_lora" / "adapter_model.safetensors").is_file()

    loaded, _ = load_generator(out)
    x = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    s = torch.full((2,), 0.7)
    cond = _cond(cfg)
    with torch.no_grad():
        expected = roles.generator(x, s, cond)
        got = loaded(x, s, cond)
        base = roles.teacher(x, s, cond)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - base).abs().max() > 1e-4  # the adapter is really in there


def test_teacher_settings_and_bad_sampler_file(tmp_path):
    cfg = load_config("debug")
    t = sampler_settings_for(cfg, role="teacher")
    assert (t.mode, t.steps, t.method) == ("euler", cfg.method.teacher_steps, "finetune")
    with pytest.raises(ValueError, match="sigmas"):
        SamplerSettings(2, [1.0], 1.0, "euler", "none", 1.0, "hunyuan-t2v", 16, "w2svd")
    with pytest.raises(FileNotFoundError, match="sampler.json"):
        load_generator(tmp_path)


def test_lcm_trains_validates_and_exports_at_one_guidance(tmp_path):
    """The LCM student sees in training the guidance its sampler.json declares, and the
    training-time validation sample equals the exported generator's sample on the same noise."""
    import copy

    from w2svd.baselines import lcm_step
    from w2svd.export import sample_latents
    from w2svd.roles import Guidance, View

    cfg = load_config("debug", ["method.name=lcm", "method.guidance_scale=6.0"])
    settings = sampler_settings_for(cfg)
    assert (settings.guidance_mode, settings.guidance_scale) == ("embedded", 6.0)
    teacher = build_backbone(cfg.model).requires_grad_(False)
    student = View(copy.deepcopy(teacher).requires_grad_(True))
    target = View(copy.deepcopy(teacher))
    seen = []
    for view in (student, target):
        view.backbone.register_forward_pre_hook(
            lambda _m, args, kwargs: seen.append(float((args + (None,) * 4)[3].flatten()[0])), with_kwargs=True)
    x, cond = torch.randn(2, 16, 3, 8, 6), _cond(cfg)
    lcm_step(student, target, View(teacher), x, cond, teacher_steps=4, shift=cfg.method.shift,
             guidance=Guidance.from_config(cfg.method), generator=torch.Generator().manual_seed(0))
    assert seen == [settings.guidance_scale * 1000.0] * 2  # target and student, as served

    noise = torch.randn(2, 16, 3, 8, 6, generator=torch.Generator().manual_seed(5))
    validation = sample_latents(student, settings, cond, noise, torch.Generator().manual_seed(6))
    save_generator_export(student.backbone, tmp_path / "export", settings, cfg)
    exported, loaded_settings = load_generator(tmp_path / "export")
    served = generate_latents(exported, loaded_settings, cond, noise, torch.Generator().manual_seed(6))
    torch.testing.assert_close(served, validation, rtol=1e-5, atol=1e-6)
