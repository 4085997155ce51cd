"""Distillation on Ray Train + DeepSpeed: W2SVD, vanilla DMD2 and LCM, chosen by ``method.name``.

    w2svd distill --config debug --data LATENTS --run-dir RUN [method.name=dmd2 optim.steps=20 …]
    python -m pipelines.distill …            # the same program

The teacher comes from ``model.teacher`` (a finetune export or a diffusers folder, local or
s3://; ``null`` in the debug config builds tiny random weights). ``method.name = euler`` has
nothing to train: evaluate the teacher's N-step sampler instead.
"""

from __future__ import annotations

import contextlib
import copy
import sys

import torch

from pipelines.ema import WeightEMA
from pipelines.engines import check_zero3_sharing, make_role_engines
from pipelines.training import main as training_main
from pipelines.worker import WorkerSession
from w2svd import rng
from w2svd.baselines import ema_update, lcm_step
from w2svd.config import Config
from w2svd.distill import StepSettings
from w2svd.drift import check_interval, earliest_firing_step
from w2svd.export import sample_latents, sampler_settings_for, save_generator_export
from w2svd.iteration import Cadence, train_iteration
from w2svd.models.hunyuan import build_backbone
from w2svd.roles import GENERATOR, Guidance, View, build_roles_from_config


def train_loop_per_worker(config: dict) -> None:
    s = WorkerSession.start(config)
    cfg = s.cfg
    teacher = build_backbone(cfg.model, device=s.device)
    if cfg.method.name == "lcm":
        return lcm_loop(s, teacher)

    if s.rank == 0:
        warn_about_the_guard(cfg)
    roles = build_roles_from_config(teacher, cfg.method).to(s.device)
    shares_base = cfg.method.generator == "lora"
    critic, generator = make_role_engines(roles, cfg, load_universal=s.reshaped)
    trained = [critic, generator]
    ema = WeightEMA(generator.params, cfg.method.generator_ema) if cfg.method.generator_ema > 0 else None
    s.count_memory(roles)
    s.restore(trained, ema=ema)

    st = StepSettings.from_config(cfg.method)
    cadence = Cadence.from_config(cfg)
    settings = sampler_settings_for(cfg)
    exported = ema.applied if ema is not None else contextlib.nullcontext
    validation_samples = s.previews_of(roles.generator, settings, exported)

    def guard_samples(batch, generator):  # what the drift guard compares with the batch
        with exported():
            noise = rng.randn(batch.x.shape, generator, batch.x.device, batch.x.dtype)
            return sample_latents(roles.generator, settings, batch.cond, noise, generator)

    batches = s.batches()
    export_ready = True  # the loop ran out of steps, or a drift stop left the best state loaded
    while s.step < s.total_steps:
        batch = next(batches)
        metrics = {"data/std": batch.x.std().item()}
        with s.timed(metrics):
            # The same iteration as the toy benchmark: critic every step, generator when due.
            # Backward simulation's depth from a stream of the step alone: alike on every rank
            # (ZeRO-3 gathers parameters per forward) and after a resume, with no state to save.
            shared = torch.Generator().manual_seed(cfg.optim.seed * 1_000_003 + s.step)
            out = train_iteration(s.step, roles, batch.x, batch.cond, st, cadence, critic, generator, rng=s.rng,
                                  shared_rng=shared, ema=ema, lr_scale=s.guards.lr_scale, check=s.healthy_before_update)
        if out.stopped:
            export_ready = False
            break
        metrics |= out.metrics
        s.guards.observe(s.step, out.metrics, batch.x, batch.cond.pooled, lambda g, b=batch: guard_samples(b, g))
        if not s.after_step(metrics, out.grad_norms, trained, sample=validation_samples, ema=ema):
            # A drift stop ends with the best state by the guard's signal; a health stop exports nothing.
            export_ready = s.restore_best_by_drift(trained, ema=ema)
            break
    if export_ready:
        with exported():
            s.export(lambda folder: save_generator_export(roles.base if shares_base else roles.generator.backbone,
                                                          folder, settings, cfg,
                                                          adapter=GENERATOR if shares_base else None),
                     [roles.generator.backbone])
    s.finish(trained)


def lcm_loop(s: WorkerSession, teacher) -> None:
    """LCM baseline: a full student copy trained towards an EMA target through the teacher's grid."""
    cfg, m = s.cfg, s.cfg.method
    teacher.requires_grad_(False)
    student = View(copy.deepcopy(teacher).requires_grad_(True))
    target = View(copy.deepcopy(teacher))
    teacher_view = View(teacher)
    model = s.engine("student", [student.backbone], [(list(student.backbone.parameters()), cfg.optim.generator_lr)])
    trained, extra = [model], {"lcm_target": target.backbone}
    s.count_memory(student.backbone, target.backbone, teacher)
    s.restore(trained, extra)
    settings = sampler_settings_for(cfg)
    guidance = Guidance.from_config(m)
    validation_samples = s.previews_of(student, settings)

    batches = s.batches()
    while s.step < s.total_steps:
        batch = next(batches)
        metrics, grad_norms = {"data/std": batch.x.std().item()}, {}
        with s.timed(metrics):
            metrics |= lcm_step(student, target, teacher_view, batch.x, batch.cond, teacher_steps=m.lcm_teacher_steps,
                                shift=m.shift, guidance=guidance, backward=model.backward, generator=s.rng)
            if not s.healthy_before_update(metrics):
                break
            grad_norms["student"] = model.step()
            ema_update(target.backbone, student.backbone, m.lcm_target_ema)
        if not s.after_step(metrics, grad_norms, trained, sample=validation_samples, extra=extra):
            break
    else:
        s.export(lambda folder: save_generator_export(student.backbone, folder, settings, cfg), [student.backbone])
    s.finish(trained)


def warn_about_the_guard(cfg: Config) -> None:
    """Say so when the drift guard's warmup and patience outlast the run, or when it can act
    before the first checkpoint (a stop then has no checkpointed state to keep)."""
    h = cfg.health
    if not h.drift_enabled:
        return
    first = earliest_firing_step(check_interval(h.drift_every, cfg.method.gen_update_every),
                                 h.drift_warmup, h.drift_patience)
    # Warnings, not errors: short runs (smoke tests, the table's) are legitimately unguarded.
    if first > cfg.optim.steps:
        print(f"[w2svd] warning: the drift guard cannot fire in this run: its earliest firing is step {first} "
              f"(health.drift_every × (max(drift_warmup, 1) + drift_patience)), after optim.steps = "
              f"{cfg.optim.steps}", file=sys.stderr, flush=True)
    elif h.drift_action != "log" and cfg.optim.checkpoint_every > first:
        print(f"[w2svd] warning: the drift guard can act at step {first}, before the first checkpoint "
              f"(optim.checkpoint_every = {cfg.optim.checkpoint_every}): a stop there exports the state at the "
              f"stop and a rollback starts over; set optim.checkpoint_every to at most {first}",
              file=sys.stderr, flush=True)


def check(cfg: Config) -> None:
    if cfg.method.name == "euler":
        raise ValueError("method.name = 'euler' is the teacher's N-step sampler and has nothing to train; "
                         "evaluate the teacher with `w2svd evaluate --teacher` or pick w2svd, dmd2 or lcm")
    if cfg.method.name == "lcm" and cfg.parallel.zero_stage == 3:
        # The EMA target reads the student's weights directly, which ZeRO-3 partitions away.
        raise ValueError("method.name = 'lcm' needs parallel.zero_stage <= 2 (its EMA target copies the "
                         "student's weights every step)")
    check_zero3_sharing(cfg)


def main(argv: list[str] | None = None) -> int:
    return training_main("distill", train_loop_per_worker, argv, __doc__.splitlines()[0], check=check)


if __name__ == "__main__":
    sys.exit(main())
