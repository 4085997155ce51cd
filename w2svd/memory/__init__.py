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

(``R``: DeepSpeed's ``reduce_bucket_size``, ``REDUCE_BUCKET_ELEMENTS`` in ``state``, which
``pipelines.engines`` passes to DeepSpeed.) Activations are a linear model in the shapes of one
step (``activation_features``), fitted to peaks measured on CPU (``bench/memory.py --fit``):
one coefficient set per step (critic, generator), gradient checkpointing on or off, and dtype.

The peak of a rank is the state it always holds plus the largest of its phases: the critic's
and the generator's forward + backward (activations, that engine's gradients and, under ZeRO-2,
a reduce bucket) and each optimizer step. Not modelled: the CUDA context, NCCL's buffers and
the caching allocator's fragmentation (``reserve_gib``), and sequence parallelism (not
implemented: one sample's activations live on one GPU).

Files: ``state`` (inventory, state per rank), ``activations`` (+ DeepSpeed's step terms), ``planner`` (the plan).

Plain torch and Python: no ray, deepspeed or mlflow.
"""

from w2svd.memory.activations import (
    ACTIVATION_COEFFICIENTS,
    DEEPSPEED_COEFFICIENTS,
    FEATURES,
    GATHER_FEATURES,
    Shape,
    activation_bytes,
    activation_features,
    deepspeed_step_bytes,
    gather_features,
)
from w2svd.memory.planner import (
    Plan,
    gib,
    largest_batch,
    largest_frames,
    plan,
    smallest_gpus,
    step_activations,
    weight_bytes,
)
from w2svd.memory.state import (
    _BYTES,
    ADAM_BYTES,
    FP32,
    GIB,
    METHOD_LABELS,
    METHODS,
    REDUCE_BUCKET_ELEMENTS,
    STEP_TEMPORARIES,
    Engine,
    Inventory,
    Layout,
    State,
    _inventory,
    inventory,
    layout,
    lora_shapes,
    method_key,
    partition,
    state_bytes,
    zero2_gradient_elements,
)

__all__ = [
    "ACTIVATION_COEFFICIENTS",
    "ADAM_BYTES",
    "DEEPSPEED_COEFFICIENTS",
    "Engine",
    "FEATURES",
    "FP32",
    "GATHER_FEATURES",
    "GIB",
    "Inventory",
    "Layout",
    "METHODS",
    "METHOD_LABELS",
    "Plan",
    "REDUCE_BUCKET_ELEMENTS",
    "STEP_TEMPORARIES",
    "Shape",
    "State",
    "_BYTES",
    "_inventory",
    "activation_bytes",
    "activation_features",
    "deepspeed_step_bytes",
    "gather_features",
    "gib",
    "inventory",
    "largest_batch",
    "largest_frames",
    "layout",
    "lora_shapes",
    "method_key",
    "partition",
    "plan",
    "smallest_gpus",
    "state_bytes",
    "step_activations",
    "weight_bytes",
    "zero2_gradient_elements",
]
