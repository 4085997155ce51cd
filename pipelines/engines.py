"""DeepSpeed engines: one per trained role, over the parameter groups the roles name.

Each trained role (the critic: LoRA or DMD2's fake copy plus the discriminator head; the
generator; a fine-tuned teacher; LCM's student) gets its own engine and optimizer, so two roles
on one shared base train, clip and checkpoint separately while the frozen base is never
duplicated. The optimizer is a plain ``torch.optim.AdamW`` (DeepSpeed's own optimizer block
would JIT-compile fused Adam).

ZeRO-3 partitions the parameters of the modules an engine wraps. The roles call those modules
directly (never the wrapper), in an order that changes from step to step: the critic and
generator passes, and the shared base at several adapter scales within one step. DeepSpeed's
trace-based prefetcher would be invalidated every step, so parameters are fetched on demand
(prefetch off) by the hooks every submodule carries. Values of a partitioned parameter live in
its ``ds_tensor`` on each rank; ``param_stats`` reads them there, so checks and fingerprints see
every element exactly once, without gathering whole parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipelines.collectives import all_reduce, world
from w2svd.config import Config
from w2svd.memory import REDUCE_BUCKET_ELEMENTS


def deepspeed_config(cfg: Config, load_universal: bool = False) -> dict:
    """DeepSpeed's config from the typed one: ZeRO stage, precision (fp32 on CPU), clipping, and
    whether checkpoints load in universal form (a resume on another number of workers)."""
    p = cfg.parallel
    # Stated, not left to DeepSpeed's default: w2svd/memory/ plans with the same bucket.
    zero: dict = {"stage": p.zero_stage, "reduce_bucket_size": REDUCE_BUCKET_ELEMENTS}
    if p.zero_stage == 3:
        # Reuse distance 0: a gathered parameter is released as soon as its module has run.
        # Otherwise, whenever DeepSpeed's trace happens to be complete, it keeps parameters
        # gathered that it expects to reuse soon, and a rank's peak depends on the call order.
        zero.update(stage3_prefetch_bucket_size=0, stage3_max_reuse_distance=0,
                    stage3_param_persistence_threshold=p.zero3_persistence_threshold)
    return {
        "checkpoint": {"load_universal": load_universal},
        "train_micro_batch_size_per_gpu": cfg.optim.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": p.precision == "bf16" and p.use_gpu},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }


@dataclass
class Trained:
    """One trained role: its DeepSpeed engine and the configured learning rate of each group
    (a ``w2svd.iteration.Trainable``: the distributed job runs the library's iteration)."""

    name: str
    engine: object
    optimizer: torch.optim.Optimizer
    lrs: list[float]
    params: list[nn.Parameter]

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float:
        """Clip (DeepSpeed's ``gradient_clipping``), step, zero; returns the gradient norm."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def set_lr_scale(self, scale: float) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.lrs, strict=True):
            group["lr"] = lr * scale

    def learning_rates(self) -> dict[str, float]:
        return {f"lr/{self.name}" + (f"_{i}" if i else ""): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}

    def destroy(self) -> None:
        self.engine.destroy()  # ZeRO-3 may abort at interpreter exit without it


def make_engine(name: str, modules: list[nn.Module], groups: list[tuple[list[nn.Parameter], float]],
                cfg: Config, load_universal: bool = False, betas: list[float] | None = None) -> Trained:
    """Wrap the parameter groups ``[(params, lr), …]`` of one role in a DeepSpeed engine.

    ``modules`` are the modules whose forward uses the parameters: ZeRO-3 partitions them and
    gathers their parameters in their own forward hooks. Only the trained parameters enter the
    optimizer. ``betas``: AdamW's (default ``optim.betas``, the distillation roles' β1 = 0).
    """
    import deepspeed

    o = cfg.optim
    groups = [(list(params), lr) for params, lr in groups if params]
    optimizer = torch.optim.AdamW([{"params": params, "lr": lr} for params, lr in groups],
                                  betas=tuple(o.betas if betas is None else betas), weight_decay=o.weight_decay)
    wrapped = nn.ModuleList(modules)
    # Recorded in every checkpoint; its presence is what lets DeepSpeed convert the checkpoint to
    # universal form (a resume on another number of workers). Empty: no tensor-parallel slicing.
    wrapped.universal_checkpoint_info = {}
    engine, _, _, _ = deepspeed.initialize(model=wrapped, optimizer=optimizer,
                                           config=deepspeed_config(cfg, load_universal), dist_init_required=False)
    return Trained(name, engine, optimizer, [lr for _, lr in groups], [p for params, _ in groups for p in params])


def make_role_engines(roles, cfg: Config, load_universal: bool = False) -> tuple[Trained, Trained]:
    """The critic engine (fake score: LoRA or DMD2's copy, plus the discriminator head) and the
    generator engine of the distillation roles (``w2svd.roles.Roles``): what ``pipelines.distill``
    trains and ``bench/memory.py`` measures. ``load_universal``: a resume on another number of
    workers (``WorkerSession.reshaped``)."""
    o = cfg.optim
    disc = [] if roles.disc is None else [roles.disc]
    critic = make_engine("critic", [roles.fake.backbone, *disc],
                         [(roles.fake_score_parameters(), o.critic_lr), (roles.disc_parameters(), o.disc_lr)], cfg,
                         load_universal=load_universal)
    generator = make_engine("generator", [roles.generator.backbone],
                            [(roles.generator_parameters(), o.generator_lr)], cfg, load_universal=load_universal)
    return critic, generator


def check_zero3_sharing(cfg: Config) -> None:
    """ZeRO-3 partitions each engine's modules, so two engines cannot share one base."""
    if cfg.parallel.zero_stage == 3 and cfg.method.generator == "lora" and cfg.method.name == "w2svd":
        raise ValueError(
            "parallel.zero_stage = 3 partitions each engine's modules, but method.generator = 'lora' puts the "
            "generator and the critic adapters on ONE shared base; use parallel.zero_stage = 2 "
            "(the frozen base is in no optimizer, so ZeRO-2 already shards all trained state)")


def local_values(p: torch.Tensor) -> torch.Tensor:
    """The values of ``p`` this rank holds, each element on exactly one rank: a ZeRO-3
    parameter's own partition (padding excluded), or ``p`` itself when it is not partitioned."""
    part = getattr(p, "ds_tensor", None)
    if part is None:
        return p.detach()
    rank = world()[0]
    valid = max(0, min(part.numel(), p.ds_numel - rank * part.numel()))
    return part.detach().reshape(-1)[:valid]


def param_stats(params: list[torch.Tensor]) -> torch.Tensor:
    """``[n, 3]`` float64: per parameter, the sum, the sum of squares and the count of
    non-finite values over all its elements, identical on every rank (one all-reduce)."""
    rank = world()[0]
    rows = []
    for p in params:
        partitioned = hasattr(p, "ds_tensor")
        x = local_values(p).double()
        if not partitioned and rank != 0:  # whole on every rank: count it once
            x = x[:0]
        finite = torch.isfinite(x)
        clean = torch.where(finite, x, torch.zeros_like(x))
        rows.append(torch.stack([clean.sum(), (clean * clean).sum(), (~finite).sum().double()]))
    stats = torch.stack(rows).cpu() if rows else torch.zeros(0, 3, dtype=torch.float64)
    return all_reduce(stats)
