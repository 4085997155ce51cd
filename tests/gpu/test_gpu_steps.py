"""On a CUDA machine: the W2SVD steps in bf16 on the real architecture, shared-base memory on device.

Skipped where no GPU is present (tests/conftest.py skips every ``gpu``-marked test).
"""

import pytest
import torch

from w2svd.config import load_config
from w2svd.distill import StepSettings, critic_step, generator_step
from w2svd.models.hunyuan import build_backbone, dummy_cond
from w2svd.roles import build_roles_from_config

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("generator", ["full", "lora"])
def test_bf16_steps_on_cuda_are_finite_and_shared_base_saves_memory(generator):
    cfg = load_config("debug", ["model.dtype=bfloat16", "model.gradient_checkpointing=true",
                                f"method.generator={generator}", "model.arch.num_layers=2",
                                "model.arch.num_single_layers=2", "model.arch.num_attention_heads=4",
                                "model.arch.attention_head_dim=32", "model.arch.rope_axes_dim=[8,12,12]"])
    torch.cuda.reset_peak_memory_stats()
    teacher = build_backbone(cfg.model).cuda()
    roles = build_roles_from_config(teacher, cfg.method).cuda()
    st = StepSettings.from_config(cfg.method)
    x = torch.randn(2, 16, 5, 16, 12, device="cuda", dtype=torch.bfloat16)
    cond = dummy_cond(cfg.model, 2, 8).map(
        lambda t: t.to("cuda", torch.bfloat16) if t.is_floating_point() else t.to("cuda"))
    metrics = critic_step(roles, x, cond, st) | generator_step(roles, x, cond, st)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    assert any(p.grad is not None for p in roles.generator_parameters())
    print(f"{generator}: peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
