"""What one rank holds: the planner's constants, the parameter inventory of the roles (shapes
on the meta device) and the state per rank under ZeRO-2 and ZeRO-3 (weights, gradients,
optimizer state, reduce buckets, optimizer-step temporaries, generator EMA)."""

from __future__ import annotations

import bisect
import dataclasses
import functools
import re
from dataclasses import dataclass

from w2svd.config import Config

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
    """Bytes one rank holds (the package docstring has the equations)."""

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
