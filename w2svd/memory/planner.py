"""The plan: a rank's peak (its held state plus the largest phase of an iteration) on a number
of GPUs, and the searches built on it: the largest batch, the smallest GPU count and the most
frames that fit."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from w2svd.config import Config
from w2svd.memory.activations import Shape, activation_bytes, deepspeed_step_bytes
from w2svd.memory.state import _BYTES, GIB, State, inventory, layout, method_key, state_bytes


@dataclass
class Plan:
    method: str
    gpus: int
    zero_stage: int
    gpu_mem_gib: float
    reserve_gib: float
    batch: int
    checkpointing: bool
    state: State
    activations: dict[str, dict[bool, float]]  # step → checkpointing → bytes
    activation_dtype: str
    notes: list[str] = field(default_factory=list)
    max_batch: int | None = None

    @property
    def parameters(self) -> int:
        return self.state.parameters

    @property
    def gradients(self) -> int:
        return sum(self.state.gradients)

    @property
    def optimizer(self) -> int:
        return self.state.optimizer

    def phases(self, checkpointing: bool | None = None) -> dict[str, float]:
        """Bytes above the held state in each phase of an iteration."""
        ck = self.checkpointing if checkpointing is None else checkpointing
        st = self.state
        held_grads = st.buckets_held  # ZeRO-3: both gradient buffers exist all the time
        bucket = 0 if st.buckets_held else st.buckets
        out = {}
        for i, step in enumerate(("critic", "generator")):
            grads = 0 if held_grads else st.gradients[i]
            out[step] = self.activations[step][ck] + grads + bucket
            out[f"{step} optimizer step"] = grads + st.step_transient[i]
        return out

    @property
    def held(self) -> float:
        st = self.state
        return st.parameters + st.optimizer + st.ema + (sum(st.gradients) + st.buckets if st.buckets_held else 0)

    def peak(self, checkpointing: bool | None = None) -> float:
        return self.held + max(self.phases(checkpointing).values())

    @property
    def usable(self) -> float:
        return (self.gpu_mem_gib - self.reserve_gib) * GIB

    @property
    def fits(self) -> bool:
        return self.peak() <= self.usable

    def as_dict(self) -> dict:
        return {"method": self.method, "gpus": self.gpus, "zero_stage": self.zero_stage, "batch": self.batch,
                "parameters": self.parameters, "gradients": self.gradients, "optimizer": self.optimizer,
                "buckets": self.state.buckets, "ema": self.state.ema, "step_transient": max(self.state.step_transient),
                "activations": {k: {str(c).lower(): v for c, v in d.items()} for k, d in self.activations.items()},
                "peak": self.peak(), "fits": self.fits, "max_batch": getattr(self, "max_batch", None),
                "notes": self.notes}


def weight_bytes(cfg: Config) -> int:
    """Bytes of a weight in training: DeepSpeed's bf16 mode casts every engine's modules to bf16."""
    return 2 if cfg.parallel.precision == "bf16" else _BYTES[cfg.model.dtype]


def step_activations(cfg: Config, method: str, dtype: str, batch: int | None = None, frames: int | None = None,
                     ranks: int = 1, zero_stage: int = 2) -> dict[str, dict[bool, float]]:
    """Peak transient bytes of each step (checkpointing off / on) inside DeepSpeed's engines."""
    shape = Shape.from_config(cfg, batch=batch, frames=frames)
    lay, e = layout(inventory(cfg), method), weight_bytes(cfg)
    out = {}
    for eng, step in zip(lay.engines, ("critic", "generator"), strict=True):
        out[step] = {ck: deepspeed_step_bytes(activation_bytes(shape, method, step, ck, dtype), method, step, ck,
                                              eng, ranks, zero_stage, e)
                     for ck in (False, True)}
    return out


def plan(cfg: Config, gpus: int, gpu_mem_gib: float, zero_stage: int | None = None, batch: int | None = None,
         reserve_gib: float = 0.0, frames: int | None = None, with_max_batch: bool = True) -> Plan:
    """Per-GPU memory of ``cfg`` on ``gpus`` data-parallel GPUs of ``gpu_mem_gib`` each (of
    which ``reserve_gib`` is kept for the CUDA context, NCCL and fragmentation)."""
    method = method_key(cfg)
    stage = cfg.parallel.zero_stage if zero_stage is None else zero_stage
    notes = []
    if method == "w2svd-lora" and stage == 3:
        notes.append("shared base under ZeRO-3 is refused (two engines cannot partition one module): "
                     "planned with ZeRO-2")
        stage = 2
    e = weight_bytes(cfg)
    dtype = "bfloat16" if e == 2 else "float32"
    st = state_bytes(layout(inventory(cfg), method), gpus, stage, e,
                     persistence=cfg.parallel.zero3_persistence_threshold if stage == 3 else 0,
                     ema=cfg.method.generator_ema > 0)
    batch = batch or cfg.optim.batch_size
    p = Plan(method, gpus, stage, gpu_mem_gib, reserve_gib, batch, cfg.model.gradient_checkpointing, st,
             step_activations(cfg, method, dtype, batch, frames, gpus, stage), dtype, notes)
    if with_max_batch:
        p.max_batch = largest_batch(cfg, p, frames=frames)
    return p


def largest_batch(cfg: Config, p: Plan, frames: int | None = None, limit: int = 4096) -> int:
    """The largest batch per GPU whose peak fits (0: not even one sample); activations grow
    with the batch, the state does not."""
    def fits(b: int) -> bool:
        acts = step_activations(cfg, p.method, p.activation_dtype, b, frames, p.gpus, p.zero_stage)
        return dataclasses.replace(p, activations=acts).peak() <= p.usable

    lo, hi = 0, 1
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def smallest_gpus(cfg: Config, gpu_mem_gib: float, zero_stage: int | None = None, reserve_gib: float = 0.0,
                  batch: int | None = None, limit: int = 1 << 16) -> int | None:
    """The smallest number of GPUs on which ``cfg`` fits (None: not with data parallelism alone,
    e.g. when one sample's activations exceed a GPU). More ranks never hold more, so the count
    is found by doubling, then bisection."""
    def fits(n: int) -> bool:
        return plan(cfg, n, gpu_mem_gib, zero_stage, batch, reserve_gib, with_max_batch=False).fits

    hi = 1
    while not fits(hi):
        if hi >= limit:
            return None
        hi *= 2
    lo = hi // 2  # does not fit (or 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def largest_frames(cfg: Config, p: Plan) -> int:
    """The most frames (``4k + 1``, up to the bucket's) at the largest bucket's height and width
    whose step fits at batch 1 on ``p``'s GPUs (0: not even one latent frame)."""
    bucket = max(cfg.data.buckets, key=lambda b: b.frames * b.height * b.width)
    best = 0
    for frames in range(1, bucket.frames + 1, 4):
        acts = step_activations(cfg, p.method, p.activation_dtype, 1, frames, p.gpus, p.zero_stage)
        if dataclasses.replace(p, activations=acts).peak() > p.usable:
            break
        best = frames
    return best


def gib(n: float) -> float:
    return n / GIB
