"""Memory per GPU of a distillation run: weights, gradients, optimizer state, activations.

    p = plan(load_config("hunyuan-t2v-13b"), gpus=8, gpu_mem_gib=80)
    p.fits, p.peak, p.max_batch, smallest_gpus(cfg, 80)

The state is counted, not estimated: parameter shapes come from the architecture on the meta
device (no memory), LoRA shapes from the Linear layers the adapter targets, and how DeepSpeed
holds them was read from its engines by ``w2svd bench memory``. With N data-parallel ranks,
``e`` the bytes of a weight (2 in bf16, 4 in fp32) and ``T`` the trained elements of an engine:

    ZeRO-2  weights      every role's parameters, whole, on every rank             Σ n · e
            gradients    the engine's partition, during its backward and step     ⌈T/N⌉ · e
                         (whole gradients of the parameters it overlaps: a bit more)
            optimizer    fp32 master partition + Adam's two moments                ⌈T/N⌉ · 12
            buckets      one reduce bucket, during a backward                     R · e
    ZeRO-3  weights      each parameter of an engine's modules split over ranks   Σ ⌈n/N⌉ · e
                         (one of at most ``persistence`` elements also kept whole: + n · e),
                         parameters in no engine (DMD2's frozen real score) whole  Σ n · e
            gradients    partitions of both engines, allocated once                Σ ⌈T/N⌉ · e
            optimizer    as ZeRO-2                                                 ⌈T/N⌉ · 12
            buckets      one per engine, allocated once                            2 · R · e
    optimizer step       the fp32 gradient and two Adam temporaries of the largest
                         parameter group, while the step runs                      3 · ⌈G/N⌉ · 4
    generator EMA        fp32 copy of the generator engine's trained values this
                         rank holds (``method.generator_ema`` > 0; pipelines/ema.py):
                         ZeRO-2 whole, ZeRO-3 its partitions                       Σ n · 4, Σ ⌈n/N⌉ · 4

(``R``: DeepSpeed's ``reduce_bucket_size``, ``REDUCE_BUCKET_ELEMENTS`` below, which
``pipelines.engines`` passes to DeepSpeed.) Activations are a linear model in the shapes of one
step (``activation_features``), fitted to peaks measured on CPU (``bench/memory.py --fit``):
one coefficient set per step (critic, generator), gradient checkpointing on or off, and dtype.

The peak of a rank is the state it always holds plus the largest of its phases: the critic's
and the generator's forward + backward (activations, that engine's gradients and, under ZeRO-2,
a reduce bucket) and each optimizer step. Not modelled: the CUDA context, NCCL's buffers and
the caching allocator's fragmentation (``reserve_gib``), and sequence parallelism (not
implemented: one sample's activations live on one GPU).

Plain torch and Python: no ray, deepspeed or mlflow.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import re
from dataclasses import dataclass, field

from w2svd.config import Config
from w2svd.data.buckets import latent_size

GIB = 2**30
# DeepSpeed's default, named so that the engines and this model agree (pipelines/engines.py).
REDUCE_BUCKET_ELEMENTS = 500_000_000
FP32 = 4
ADAM_BYTES = 12  # fp32 master copy + exp_avg + exp_avg_sq, per trained element
STEP_TEMPORARIES = 3  # fp32 gradient of the group + two Adam temporaries (measured)
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

METHODS = {
    "dmd2": ["method.name=dmd2", "method.generator=full"],
    "w2svd-full": ["method.name=w2svd", "method.generator=full"],
    "w2svd-lora": ["method.name=w2svd", "method.generator=lora"],
}
METHOD_LABELS = {"dmd2": "vanilla DMD2", "w2svd-full": "W2SVD, full generator",
                 "w2svd-lora": "W2SVD, shared base (LoRA generator)"}


def method_key(cfg: Config) -> str:
    if cfg.method.name == "dmd2":
        return "dmd2"
    if cfg.method.name == "w2svd":
        return f"w2svd-{cfg.method.generator}"
    raise ValueError(f"method.name = {cfg.method.name!r}: the planner covers w2svd and dmd2")


# ---------------------------------------------------------------------------------------------
# Parameter inventory


@dataclass(frozen=True)
class Inventory:
    """Element counts of every parameter of each piece of the roles."""

    base: tuple[int, ...]
    critic_lora: tuple[int, ...]
    generator_lora: tuple[int, ...]
    disc: tuple[int, ...]
    dual_block_elements: int = 0  # of one copy, in the dual-stream blocks (the features path)


def lora_shapes(named_linears: list[tuple[str, int, int]], targets: str, rank: int) -> tuple[int, ...]:
    """Elements of the LoRA weights on every Linear whose name ``targets`` matches in full (as
    PEFT matches a string pattern): ``A`` is ``rank × in``, ``B`` is ``out × rank``."""
    pattern = re.compile(targets)
    out: list[int] = []
    for name, fan_in, fan_out in named_linears:
        if pattern.fullmatch(name):
            out += [rank * fan_in, fan_out * rank]
    return tuple(out)


@functools.lru_cache(maxsize=32)
def _inventory(arch_items: tuple, targets: str, rank: int, generator_rank: int, disc: bool) -> Inventory:
    import torch
    from diffusers import HunyuanVideoTransformer3DModel

    from w2svd.config import TransformerArch
    from w2svd.models.hunyuan import arch_kwargs
    from w2svd.roles import DiscriminatorHead

    arch = TransformerArch(**dict(arch_items))
    with torch.device("meta"):
        transformer = HunyuanVideoTransformer3DModel(**arch_kwargs(arch))
        head = DiscriminatorHead(arch.num_attention_heads * arch.attention_head_dim) if disc else None
    # Names as the roles see them: the adapter is injected into the backbone that wraps this.
    linears = [(f"transformer.{n}", m.in_features, m.out_features)
               for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    return Inventory(base=tuple(p.numel() for p in transformer.parameters()),
                     dual_block_elements=sum(p.numel() for p in transformer.transformer_blocks.parameters()),
                     critic_lora=lora_shapes(linears, targets, rank),
                     generator_lora=lora_shapes(linears, targets, generator_rank),
                     disc=tuple(p.numel() for p in head.parameters()) if head is not None else ())


def inventory(cfg: Config) -> Inventory:
    """The parameter inventory of ``cfg``'s roles, from ``model.arch`` (the shapes of the 13B
    configs are HunyuanVideo's own), without allocating any weight."""
    m = cfg.method
    arch = tuple((f.name, tuple(v) if isinstance(v := getattr(cfg.model.arch, f.name), list) else v)
                 for f in dataclasses.fields(cfg.model.arch))
    return _inventory(arch, m.lora_targets, m.lora_rank, m.generator_lora_rank,
                      m.lambda_gan_gen > 0 or m.lambda_gan_disc > 0)


@dataclass(frozen=True)
class Engine:
    """One DeepSpeed engine: the parameters of the modules it wraps, and its trained groups."""

    module_params: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]

    @property
    def trained(self) -> int:
        return sum(sum(g) for g in self.groups)


@dataclass(frozen=True)
class Layout:
    """What a rank holds for a method: the engines, and parameters that are in no engine."""

    engines: tuple[Engine, ...]
    outside: tuple[int, ...]  # parameters in no engine (never partitioned)
    distinct: tuple[int, ...]  # every distinct parameter once


def layout(inv: Inventory, method: str) -> Layout:
    """The roles of ``w2svd.roles.build_roles`` and the engines of ``pipelines.engines.make_role_engines``.

    dmd2:        frozen teacher (real score, in no engine) + fake copy & head (critic) + generator copy
    w2svd-full:  teacher + critic LoRA & head (critic, the teacher's weights frozen) + generator copy
    w2svd-lora:  teacher + critic LoRA + generator LoRA, one module in both engines, + head
    """
    b, c, g, d = inv.base, inv.critic_lora, inv.generator_lora, inv.disc
    if method == "dmd2":
        critic, gen = Engine(b + d, (b, d)), Engine(b, (b,))
        return Layout((critic, gen), outside=b, distinct=b + b + d + b)
    if method == "w2svd-full":
        critic, gen = Engine(b + c + d, (c, d)), Engine(b, (b,))
        return Layout((critic, gen), outside=(), distinct=b + c + d + b)
    if method == "w2svd-lora":
        shared = b + c + g
        critic, gen = Engine(shared + d, (c, d)), Engine(shared, (g,))
        return Layout((critic, gen), outside=(), distinct=shared + d)
    raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")


# ---------------------------------------------------------------------------------------------
# State per rank


def partition(n: int, ranks: int) -> int:
    """Elements of an ``n``-element tensor on each of ``ranks`` ranks: ``⌈n / ranks⌉`` (padded)."""
    return -(-n // ranks)


def zero2_gradient_elements(group: tuple[int, ...], ranks: int) -> int:
    """Gradient elements a ZeRO-2 rank holds for one parameter group (the most any rank holds).

    The group is flattened in order and cut into ``ranks`` contiguous partitions of
    ``P = ⌈Σn / ranks⌉`` elements; rank ``r`` keeps the whole gradient of every parameter that
    overlaps ``[r·P, (r+1)·P)``, so beyond its partition it holds the rest of the (at most two)
    parameters its boundaries cut.
    """
    if not group:
        return 0
    size = partition(sum(group), ranks)
    starts = [0]
    for n in group:
        starts.append(starts[-1] + n)
    best = 0
    for r in range(ranks):
        lo, hi = r * size, (r + 1) * size
        first = bisect.bisect_right(starts, lo) - 1  # the parameter containing element lo
        last = bisect.bisect_left(starts, hi) - 1  # the last parameter starting before hi
        if first < len(group) and first <= last:
            best = max(best, starts[min(last, len(group) - 1) + 1] - starts[first])
    return best


@dataclass(frozen=True)
class State:
    """Bytes one rank holds (the module docstring has the equations)."""

    parameters: int
    gradients: tuple[int, ...]  # per engine
    optimizer: int
    buckets: int
    buckets_held: bool  # ZeRO-3: allocated once; ZeRO-2: during each backward
    step_transient: tuple[int, ...]  # per engine
    ema: int = 0  # the generator EMA's fp32 shadow (0 without EMA)


def state_bytes(lay: Layout, ranks: int, zero_stage: int, weight_bytes: int,
                persistence: int = 0, bucket_elements: int = REDUCE_BUCKET_ELEMENTS, ema: bool = False) -> State:
    """Parameters, gradients, optimizer state, reduce buckets, optimizer-step temporaries and
    (``ema``) the generator EMA of one of ``ranks`` ranks under ZeRO ``zero_stage`` (2 or 3)."""
    if zero_stage not in (2, 3):
        raise ValueError(f"zero_stage {zero_stage}: the planner models ZeRO-2 and ZeRO-3")
    e = weight_bytes
    if zero_stage == 2:
        params = sum(lay.distinct) * e
    else:
        # Each module's parameters once (the shared-base engines wrap one module).
        seen_modules: set[tuple[int, ...]] = set()
        params = sum(lay.outside) * e
        for eng in lay.engines:
            if eng.module_params in seen_modules:
                continue
            seen_modules.add(eng.module_params)
            for n in eng.module_params:
                params += partition(n, ranks) * e + (n * e if n <= persistence else 0)
    grads = tuple(sum(zero2_gradient_elements(g, ranks) if zero_stage == 2 else sum(partition(n, ranks) for n in g)
                      for g in eng.groups) * e for eng in lay.engines)
    trained = [sum(partition(sum(g), ranks) if zero_stage == 2 else sum(partition(n, ranks) for n in g)
                   for g in eng.groups) for eng in lay.engines]
    step = tuple(STEP_TEMPORARIES * FP32 * max((partition(sum(g), ranks) for g in eng.groups), default=0)
                 for eng in lay.engines)
    n_buckets = len(lay.engines) if zero_stage == 3 else 1
    gen = [n for g in lay.engines[-1].groups for n in g]  # the generator engine's trained parameters
    ema_bytes = FP32 * sum(partition(n, ranks) if zero_stage == 3 else n for n in gen) if ema else 0
    return State(parameters=params, gradients=grads, optimizer=ADAM_BYTES * sum(trained),
                 buckets=n_buckets * bucket_elements * e, buckets_held=zero_stage == 3, step_transient=step,
                 ema=ema_bytes)


# ---------------------------------------------------------------------------------------------
# Activations


@dataclass(frozen=True)
class Shape:
    """The numbers one training step's activations depend on."""

    batch: int
    latent_frames: int
    latent_height: int
    latent_width: int
    text_tokens: int
    hidden: int
    heads: int
    mlp_ratio: float
    dual_blocks: int
    single_blocks: int
    refiner_blocks: int
    lora_rank: int
    dual_block_elements: int
    patch: int
    patch_t: int
    latent_channels: int

    @property
    def video_tokens(self) -> int:
        return (self.latent_frames // self.patch_t) * (self.latent_height // self.patch) * (self.latent_width // self.patch)

    @classmethod
    def from_config(cls, cfg: Config, batch: int | None = None, frames: int | None = None) -> Shape:
        """The step shape of ``cfg``'s largest bucket (by tokens) at ``batch`` (default: the
        configured batch per GPU), optionally with ``frames`` instead of the bucket's."""
        a = cfg.model.arch
        bucket = max(cfg.data.buckets, key=lambda b: b.frames * b.height * b.width)
        t, h, w = latent_size(frames or bucket.frames, bucket.height, bucket.width)
        return cls(batch=batch or cfg.optim.batch_size, latent_frames=t, latent_height=h, latent_width=w,
                   text_tokens=cfg.model.text_max_length, hidden=a.num_attention_heads * a.attention_head_dim,
                   heads=a.num_attention_heads, mlp_ratio=a.mlp_ratio, dual_blocks=a.num_layers,
                   single_blocks=a.num_single_layers, refiner_blocks=a.num_refiner_layers,
                   lora_rank=max(cfg.method.lora_rank, cfg.method.generator_lora_rank),
                   dual_block_elements=inventory(cfg).dual_block_elements, patch=a.patch_size,
                   patch_t=a.patch_size_t, latent_channels=a.out_channels)


FEATURES = ("B·N·D·Ld", "B·N·r·D·Ld", "B·N·D·Ls", "B·N·r·D·Ls", "B·N·H·L", "B·N·D", "B·N·r·D",
            "B·Nv·c", "B·Nt·D·Lr", "B·N·ρ·L", "P2", "B", "1")


def activation_features(s: Shape, method: str) -> list[float]:
    """The terms of the activation model, in the order of ``FEATURES``:

    B batch, Nv = video tokens ``(t/pt)(h/p)(w/p)``, Nt text tokens, N = Nv + Nt, D hidden size,
    H heads, r MLP ratio, Ld / Ls / Lr dual-stream / single-stream / refiner blocks, L = Ld + Ls,
    c = latent elements per video token ``C·p²·pt``, ρ the LoRA rank (0 for DMD2, whose fake
    score is a plain copy), P2 the parameter elements of DMD2's trained fake copy that one
    backward reaches twice (its dual-stream blocks run for the fake sample and again for the
    discriminator's real features, so their weight gradients are summed: a second, parameter-
    sized gradient lives for a moment). The block terms are what a block saves for backward per
    token; the unscaled ``B·N·D`` and ``B·N·r·D`` terms are one block's working set (the block
    being run, or recomputed under gradient checkpointing); ``B·Nv·c`` the latent-space tensors
    of the losses; ``B`` and ``1`` per-sample and fixed overheads.
    """
    nv, nt = s.video_tokens, s.text_tokens
    n, d, r, b = nv + nt, s.hidden, s.mlp_ratio, s.batch
    layers = s.dual_blocks + s.single_blocks
    rho = 0 if method == "dmd2" else s.lora_rank
    twice = s.dual_block_elements if method == "dmd2" else 0
    c = s.latent_channels * s.patch * s.patch * s.patch_t
    return [b * n * d * s.dual_blocks, b * n * r * d * s.dual_blocks, b * n * d * s.single_blocks,
            b * n * r * d * s.single_blocks, b * n * s.heads * layers, b * n * d, b * n * r * d, b * nv * c,
            b * nt * d * s.refiner_blocks, b * n * rho * layers, twice, b, 1.0]


# Bytes per unit of each feature, fitted by ``bench/memory.py --fit`` (CPU, torch 2.13,
# diffusers 0.42.1): bf16 to the probe grid's peaks, fp32 jointly with DeepSpeed's terms to the
# probes and the measured cells (no bf16 cell runs on CPU); key:
# "dtype/method/step/checkpointing=…". Per method, because which weights are trained decides
# what a step saves.
ACTIVATION_COEFFICIENTS: dict[str, list[float]] = {
    "bfloat16/dmd2/critic/checkpointing=False": [71.446, 0.0, 51.755, 15.02, 87.871, 0.0, 0.0, 87.867, 147.049, 0.0, 1.853, 0.0, 0.0],
    "bfloat16/dmd2/critic/checkpointing=True": [0.0, 0.0, 1.191, 0.0, 0.0, 64.345, 0.0, 61.672, 74.153, 0.0, 2.706, 0.0, 0.0],
    "bfloat16/dmd2/generator/checkpointing=False": [79.868, 9.315, 74.426, 6.297, 44.819, 16.772, 0.298, 60.802, 78.805, 0.0, 0.0, 5139.171, 0.0],
    "bfloat16/dmd2/generator/checkpointing=True": [3.289, 0.927, 5.49, 0.408, 0.0, 51.553, 0.0, 47.661, 83.154, 0.0, 0.107, 0.0, 0.0],
    "bfloat16/w2svd-full/critic/checkpointing=False": [59.2, 3.668, 49.066, 2.957, 13.748, 0.462, 2.608, 77.521, 7.905, 14.958, 0.0, 518.489, 0.0],
    "bfloat16/w2svd-full/critic/checkpointing=True": [3.609, 0.0, 0.498, 1.118, 0.0, 29.573, 3.327, 62.543, 10.137, 0.0, 0.0, 0.0, 6441.932],
    "bfloat16/w2svd-full/generator/checkpointing=False": [71.229, 5.791, 61.253, 5.538, 19.246, 10.644, 1.656, 60.443, 35.077, 11.528, 0.0, 3258.478, 0.0],
    "bfloat16/w2svd-full/generator/checkpointing=True": [4.891, 0.256, 4.733, 0.0, 0.0, 34.564, 2.319, 49.498, 41.251, 0.0, 0.0, 0.0, 1027.212],
    "bfloat16/w2svd-lora/critic/checkpointing=False": [59.2, 3.668, 49.066, 2.957, 13.748, 0.462, 2.608, 77.521, 7.905, 14.958, 0.0, 518.489, 0.0],
    "bfloat16/w2svd-lora/critic/checkpointing=True": [3.609, 0.0, 0.498, 1.118, 0.0, 29.573, 3.327, 62.543, 10.137, 0.0, 0.0, 0.0, 6441.932],
    "bfloat16/w2svd-lora/generator/checkpointing=False": [58.054, 3.657, 50.137, 3.435, 14.878, 1.357, 2.289, 59.252, 0.0, 15.903, 0.0, 8.58, 0.0],
    "bfloat16/w2svd-lora/generator/checkpointing=True": [4.498, 0.419, 4.273, 0.017, 0.0, 34.871, 1.848, 45.053, 0.728, 0.0, 0.0, 0.0, 1540.766],
    "float32/dmd2/critic/checkpointing=False": [112.528, 0.0, 67.0, 22.22, 182.0, 23.894, 10.318, 106.882, 295.135, 0.0, 3.714, 0.0, 0.0],
    "float32/dmd2/critic/checkpointing=True": [0.0, 0.0, 0.0, 0.0, 0.0, 181.774, 0.0, 41.686, 232.521, 0.0, 3.481, 0.0, 26024.438],
    "float32/dmd2/generator/checkpointing=False": [130.189, 15.509, 105.344, 16.949, 97.295, 32.17, 0.0, 82.089, 155.164, 0.0, 0.095, 0.0, 0.0],
    "float32/dmd2/generator/checkpointing=True": [14.747, 0.0, 14.093, 0.0, 0.0, 61.007, 11.849, 50.31, 193.624, 0.0, 0.0, 9619.29, 0.0],
    "float32/w2svd-full/critic/checkpointing=False": [94.332, 6.731, 68.431, 6.959, 0.0, 0.0, 0.0, 113.84, 0.0, 18.078, 0.0, 17861.048, 0.0],
    "float32/w2svd-full/critic/checkpointing=True": [17.289, 0.0, 0.099, 0.0, 0.0, 77.549, 1.204, 78.325, 0.0, 5.076, 0.0, 0.0, 1365.125],
    "float32/w2svd-full/generator/checkpointing=False": [81.985, 22.302, 92.637, 12.03, 0.0, 81.098, 0.0, 51.189, 0.0, 81.553, 0.0, 43685.639, 0.0],
    "float32/w2svd-full/generator/checkpointing=True": [4.918, 0.0, 20.355, 0.0, 0.0, 89.715, 0.656, 40.49, 3.167, 17.113, 0.0, 44466.643, 0.0],
    "float32/w2svd-lora/critic/checkpointing=False": [98.91, 9.418, 45.451, 12.544, 0.0, 0.0, 0.0, 102.374, 0.0, 5.124, 0.0, 44595.843, 0.0],
    "float32/w2svd-lora/critic/checkpointing=True": [7.337, 0.0, 0.0, 0.0, 1.729, 40.12, 11.471, 94.345, 31.502, 3.025, 0.0, 0.0, 0.0],
    "float32/w2svd-lora/generator/checkpointing=False": [80.659, 6.853, 79.405, 0.0, 0.0, 0.0, 9.649, 92.21, 17.31, 1.398, 0.0, 8245.337, 0.0],
    "float32/w2svd-lora/generator/checkpointing=True": [3.542, 0.0, 0.0, 0.0, 0.0, 97.817, 0.0, 51.567, 0.0, 22.331, 0.0, 0.0, 0.0],
}


def activation_bytes(s: Shape, method: str, step: str, checkpointing: bool, dtype: str) -> float:
    """Peak bytes allocated and freed again within one ``step`` ("critic" or "generator"):
    ``Σ_k c_k · φ_k(s)`` with ``φ = activation_features`` and ``c`` the fitted coefficients."""
    key = f"{dtype}/{method}/{step}/checkpointing={checkpointing}"
    if key not in ACTIVATION_COEFFICIENTS:
        raise ValueError(f"no activation coefficients for {key}; run `w2svd bench memory --fit`")
    return sum(c * f for c, f in zip(ACTIVATION_COEFFICIENTS[key], activation_features(s, method), strict=True))


# ---------------------------------------------------------------------------------------------
# The plan


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


# Multipliers fitted by ``bench/memory.py --fit`` (jointly with the fp32 activation
# coefficients, to the probes and the DeepSpeed cells: fp32, 2026-12-06, the run in
# docs/benchmarks.md); key: "method/step/checkpointing=…"; values: k_T, then the
# coefficients of ``GATHER_FEATURES``.
DEEPSPEED_COEFFICIENTS: dict[str, tuple[float, ...]] = {
    "dmd2/critic/checkpointing=False": (0.1069, 0.2575, 0.4943, 0.0),
    "dmd2/critic/checkpointing=True": (0.1589, 0.3025, 0.064, 0.0),
    "dmd2/generator/checkpointing=False": (0.0, 0.0, 0.0, 0.048),
    "dmd2/generator/checkpointing=True": (0.0036, 0.0, 0.0, 0.0627),
    "w2svd-full/critic/checkpointing=False": (3.4604, 0.0, 0.1906, 0.0),
    "w2svd-full/critic/checkpointing=True": (0.8819, 0.1561, 0.0, 5.0393),
    "w2svd-full/generator/checkpointing=False": (0.0126, 0.0278, 0.0, 0.0),
    "w2svd-full/generator/checkpointing=True": (0.0045, 0.0, 0.0, 0.0627),
    "w2svd-lora/critic/checkpointing=False": (4.4569, 0.0, 0.0, 0.0),
    "w2svd-lora/critic/checkpointing=True": (1.2669, 0.0, 0.0, 0.0),
    "w2svd-lora/generator/checkpointing=False": (7.6816, 0.0, 0.0, 0.0),
    "w2svd-lora/generator/checkpointing=True": (1.0564, 0.0, 0.0, 0.0),
}

GATHER_FEATURES = ("M", "M≥1e5", "max")


def gather_features(engine: Engine) -> list[float]:
    """Parameter elements of ``engine``'s modules that a ZeRO-3 step on several ranks gathers:
    all of them (M), those in tensors of at least 1e5 elements, and the largest tensor (one
    gathered weight at a time, prefetch off)."""
    sizes = engine.module_params
    return [float(sum(sizes)), float(sum(n for n in sizes if n >= 100_000)), float(max(sizes))]


def deepspeed_step_bytes(plain: float, method: str, step: str, checkpointing: bool, engine: Engine, ranks: int,
                         zero_stage: int, e: int, bucket_elements: int = REDUCE_BUCKET_ELEMENTS) -> float:
    """A step's transient peak inside DeepSpeed, from its plain-autograd peak (measured causes):

        a = plain + k_T·T·e + [ZeRO-3, N > 1]·Σ_j k_j·G_j·e
        gradients reduced across ranks (N > 1, or ZeRO-3): a ← max(a, T·e)  if T ≤ R
                                                           a ← a + R·e      otherwise

    ``T`` the engine's trained elements, ``G = gather_features(engine)``, ``R`` the reduce
    bucket. k_T: DeepSpeed's gradient hooks on adapters (their gradients are copied, and the
    adapter runs twice in the critic step). k_j: under ZeRO-3, a linear layer's backward keeps
    the gathered weight it saw in the forward (through the transposed view that ``linear``
    saves), so a step holds a share of its module gathered; which share grows with the model
    in a way one term did not follow (the fit over four sizes needs the three). The max: a
    reduction flattens the gradients of one bucket at a time; a module smaller than a bucket
    is flattened whole at the end of the backward, when most activations are gone.
    """
    k_t, *k_g = DEEPSPEED_COEFFICIENTS.get(f"{method}/{step}/checkpointing={checkpointing}",
                                           (0.0,) * (1 + len(GATHER_FEATURES)))
    trained = engine.trained
    a = plain + k_t * trained * e
    if zero_stage == 3 and ranks > 1:
        a += sum(k * g for k, g in zip(k_g, gather_features(engine), strict=True)) * e
    if ranks > 1 or zero_stage == 3:
        a = max(a, trained * e) if trained <= bucket_elements else a + bucket_elements * e
    return a


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
