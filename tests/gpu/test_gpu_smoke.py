"""GPU smoke suite: the production path on a small HunyuanVideo, where a CUDA device exists.

    make test-gpu          # under five minutes on one GPU

One W2SVD distillation through the real job (Ray Train + DeepSpeed, NCCL) in bf16 with gradient
checkpointing and ZeRO-3 (2 workers if 2 GPUs, else 1), its resume, its export, and a sample
through the generation API; plus the two steps in bf16 outside DeepSpeed. Peak memory and step
time are printed (``pytest -s``) for docs/benchmarks.md. Skipped without CUDA
(tests/conftest.py skips every ``gpu``-marked test).
"""

from __future__ import annotations

import json

import pytest
import torch

from pipelines import distill
from pipelines.training import train
from w2svd import memory
from w2svd.config import load_config
from w2svd.data.synthetic_latents import write_synthetic_latents
from w2svd.distill import StepSettings, critic_step, generator_step
from w2svd.generate import load_export_bundle
from w2svd.models.hunyuan import build_backbone, dummy_cond
from w2svd.roles import build_roles_from_config

pytestmark = pytest.mark.gpu

SMALL = ["model.dtype=bfloat16", "model.gradient_checkpointing=true", "model.arch.num_layers=2",
         "model.arch.num_single_layers=2", "model.arch.num_attention_heads=4", "model.arch.attention_head_dim=32",
         "model.arch.rope_axes_dim=[8,12,12]"]


@pytest.mark.parametrize("generator", ["full", "lora"])
def test_bf16_steps_outside_deepspeed(generator):
    cfg = load_config("debug", [*SMALL, f"method.generator={generator}"])
    torch.cuda.reset_peak_memory_stats()
    roles = build_roles_from_config(build_backbone(cfg.model, device="cuda"), cfg.method).cuda()
    st = StepSettings.from_config(cfg.method)
    x = torch.randn(2, 16, 5, 16, 12, device="cuda", dtype=torch.bfloat16)
    cond = dummy_cond(cfg.model, 2, 8).map(lambda t: t.to("cuda", torch.bfloat16))
    g = torch.Generator().manual_seed(0)  # a CPU generator, as the training worker holds
    metrics = critic_step(roles, x, cond, st, generator=g) | generator_step(roles, x, cond, st, generator=g)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    print(f"{generator}: peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")


def test_zero3_bf16_distillation_resumes_exports_and_generates(tmp_path, ray_local):
    workers = min(2, torch.cuda.device_count())
    common = [*SMALL, "parallel.use_gpu=true", "parallel.precision=bf16", "parallel.zero_stage=3",
              f"parallel.num_workers={workers}", "parallel.materialize_data=true", "optim.checkpoint_every=2",
              "tracking.log_samples=false", "method.generator_ema=0.9"]
    data = write_synthetic_latents(str(tmp_path / "latents"), load_config("debug", SMALL), clips_per_bucket=4)
    run = str(tmp_path / "run")
    first = train("distill", distill.train_loop_per_worker, load_config("debug", [*common, "optim.steps=2"]), data, run)
    (tmp_path / "run" / "result.json").unlink()
    resumed = train("distill", distill.train_loop_per_worker, load_config("debug", [*common, "optim.steps=4"]),
                    data, run)
    assert first["steps"] == 2 and resumed["status"] == "finished" and resumed["steps"] == 4
    stats = resumed["stats"]
    # The planner's prediction for the same config, beside the measured peak, for
    # docs/benchmarks.md (recorded, not asserted: not yet compared on a GPU; the measured peak also
    # holds the CUDA context's allocations that the planner leaves to --reserve-gib).
    predicted = memory.plan(load_config("debug", [*common, "optim.steps=4"]), workers, 1e6, with_max_batch=False)
    print(f"ZeRO-3 bf16, {workers} GPU(s): step {stats['stats/step_time_s']:.3f} s, peak "
          f"{stats['stats/peak_memory_mb_per_worker']:.0f} MiB per worker, planner "
          f"{predicted.peak() / 2**20:.0f} MiB (w2svd plan)")
    bundle = load_export_bundle(resumed["export"], device="cuda")
    clips = bundle.generate(["a person talking"], seeds=[0])
    assert clips.dtype == torch.uint8 and clips.shape[0] == 1
    print(json.dumps({"workers": workers, **stats, "planner_peak_mb": predicted.peak() / 2**20}))
