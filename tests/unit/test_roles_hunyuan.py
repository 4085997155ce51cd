"""The roles on the real architecture (tiny HunyuanVideo T2V and I2V): steps run, bytes add up."""

import copy

import pytest
import torch

from w2svd.config import load_config
from w2svd.distill import StepSettings, critic_step, generator_step
from w2svd.models.base import count_parameter_bytes
from w2svd.models.hunyuan import build_backbone, dummy_cond
from w2svd.roles import CRITIC, adapter_parameters, build_roles_from_config
from w2svd.schedule import x0_from_velocity


def tiny(family: str, generator: str = "full", overrides=()):
    over = [f"method.generator={generator}", *overrides]
    if family == "hunyuan-i2v":
        over += ["model.family=hunyuan-i2v", "model.arch.in_channels=33", "model.arch.guidance_embeds=false",
                 "model.arch.image_condition_type=latent_concat", "method.guidance=cfg"]
    return load_config("debug", over)


def latents_and_cond(cfg, family):
    x = torch.randn(2, 16, 3, 8, 6)
    image = torch.randn(2, 16, 1, 8, 6) if family == "hunyuan-i2v" else None
    return x, dummy_cond(cfg.model, 2, 5, image_latent=image)


@pytest.mark.parametrize("family", ["hunyuan-t2v", "hunyuan-i2v"])
@pytest.mark.parametrize("generator", ["full", "lora"])
def test_steps_run_on_tiny_hunyuan_and_only_train_their_role(family, generator):
    cfg = tiny(family, generator)
    teacher = build_backbone(cfg.model)
    roles = build_roles_from_config(teacher, cfg.method)
    st = StepSettings.from_config(cfg.method)
    x, cond = latents_and_cond(cfg, family)
    gen, critic = roles.generator_parameters(), roles.critic_parameters()

    metrics = critic_step(roles, x, cond, st)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in critic)
    assert all(p.grad is None for p in gen)
    for p in critic:
        p.grad = None

    metrics = generator_step(roles, x, cond, st)
    assert {"gen/dmd", "gen/gan"} <= set(metrics)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen)
    assert all(p.grad is None for p in critic)


def test_shared_base_holds_one_copy_of_the_hunyuan_base():
    cfg = tiny("hunyuan-t2v", "lora")
    teacher = build_backbone(cfg.model)
    base_bytes = count_parameter_bytes(teacher)
    roles = build_roles_from_config(teacher, cfg.method)
    adapters = sum(p.numel() * p.element_size() for p in roles.critic_parameters() + roles.generator_parameters())
    assert count_parameter_bytes(roles) == base_bytes + adapters
    full_cfg = tiny("hunyuan-t2v", "full")
    full = build_roles_from_config(build_backbone(full_cfg.model), full_cfg.method)
    assert count_parameter_bytes(full) > 2 * base_bytes


def test_alpha_weak_zero_is_the_frozen_hunyuan_teacher():
    cfg = tiny("hunyuan-t2v", "full", ["method.alpha_weak=0.0"])
    teacher = build_backbone(cfg.model)
    reference = copy.deepcopy(teacher)
    roles = build_roles_from_config(teacher, cfg.method)
    with torch.no_grad():
        for p in adapter_parameters(roles.base, CRITIC):
            p.add_(0.05 * torch.randn_like(p))
    x, cond = latents_and_cond(cfg, "hunyuan-t2v")
    s = torch.tensor([0.3, 0.8])
    g = torch.full((2,), cfg.method.guidance_scale * 1000.0)
    want = x0_from_velocity(x, reference(x, s, cond, g), s)
    assert torch.equal(roles.real_x0(x, s, cond), want)
    assert not torch.allclose(roles.fake_x0(x, s, cond), want)


@pytest.mark.parametrize("generator", ["full", "lora"])
def test_bf16_backbone_runs_both_steps_outside_deepspeed(generator):
    # model.dtype = bfloat16 with no DeepSpeed cast around it (precision fp32, evaluation): the
    # discriminator head (fp32) must take the backbone's bf16 features.
    cfg = tiny("hunyuan-t2v", generator, ["model.dtype=bfloat16"])
    roles = build_roles_from_config(build_backbone(cfg.model), cfg.method)
    assert roles.base.dtype == torch.bfloat16 and roles.disc is not None
    st = StepSettings.from_config(cfg.method)
    x, cond = latents_and_cond(cfg, "hunyuan-t2v")
    critic = critic_step(roles, x, cond, st)
    gen = generator_step(roles, x, cond, st)
    assert {"critic/disc", "critic/flow_matching"} <= set(critic) and "gen/gan" in gen
    assert all(torch.isfinite(torch.tensor(v)) for v in (*critic.values(), *gen.values()))
    trained = [p for p in roles.generator_parameters() if p.grad is not None]
    assert trained and all(torch.isfinite(p.grad.float()).all() for p in trained)
