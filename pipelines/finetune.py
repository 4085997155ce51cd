"""Teacher fine-tuning on Ray Train + DeepSpeed: flow matching on portrait latents, full or LoRA.

    w2svd finetune --config debug --data LATENTS --run-dir RUN [optim.finetune_lora_rank=8 …]
    python -m pipelines.finetune …            # the same program

The export (``RUN_DIR/export``) is a diffusers-layout teacher with its N-step Euler sampler (the
EMA of its weights with ``optim.finetune_ema`` > 0):
``w2svd distill … model.teacher=RUN_DIR/export`` distills it.
"""

from __future__ import annotations

import contextlib
import sys

from pipelines.ema import WeightEMA
from pipelines.training import main as training_main
from pipelines.worker import WorkerSession
from w2svd.baselines import flow_matching_step
from w2svd.export import sampler_settings_for, save_generator_export
from w2svd.models.hunyuan import build_backbone
from w2svd.roles import View, adapter_parameters, add_lora
from w2svd.schedule import sample_training_sigmas

ADAPTER = "finetune"


def train_loop_per_worker(config: dict) -> None:
    s = WorkerSession.start(config)
    cfg, o, m = s.cfg, s.cfg.optim, s.cfg.method
    teacher = build_backbone(cfg.model, device=s.device)
    lora = o.finetune_lora_rank > 0
    if lora:
        teacher.requires_grad_(False)
        add_lora(teacher, ADAPTER, o.finetune_lora_rank, float(o.finetune_lora_rank), m.lora_targets)
        teacher.to(s.device)
        model_view, params = View(teacher, {ADAPTER: 1.0}), adapter_parameters(teacher, ADAPTER)
    else:
        teacher.requires_grad_(True)
        model_view, params = View(teacher), list(teacher.parameters())
    model = s.engine("teacher", [teacher], [(params, o.finetune_lr)], betas=o.finetune_betas)
    trained = [model]
    ema = WeightEMA(params, o.finetune_ema) if o.finetune_ema > 0 else None
    s.count_memory(teacher)
    s.restore(trained, ema=ema)
    settings = sampler_settings_for(cfg, role="teacher")
    exported = ema.applied if ema is not None else contextlib.nullcontext
    validation_samples = s.previews_of(model_view, settings, exported)

    shift = m.shift if o.finetune_sigma_shift is None else o.finetune_sigma_shift
    batches = s.batches()
    while s.step < s.total_steps:
        batch = next(batches)
        x = batch.x
        metrics, grad_norms = {"data/std": batch.x.std().item()}, {}
        with s.timed(metrics):
            sigma = sample_training_sigmas(x.shape[0], shift, generator=s.rng, device=x.device,
                                           density=o.finetune_sigma_density)
            metrics |= flow_matching_step(model_view, x, batch.cond, sigma, backward=model.backward,
                                          uncond_prob=o.finetune_uncond_prob, generator=s.rng)
            if not s.healthy_before_update(metrics):
                break
            grad_norms["teacher"] = model.step()
            if ema is not None:
                ema.update()
        if not s.after_step(metrics, grad_norms, trained, sample=validation_samples, ema=ema):
            break
    else:
        with exported():
            s.export(lambda folder: save_generator_export(teacher, folder, settings, cfg,
                                                          adapter=ADAPTER if lora else None), [teacher])
    s.finish(trained)


def main(argv: list[str] | None = None) -> int:
    return training_main("finetune", train_loop_per_worker, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
