"""The transient bytes of one step: the activation model in the step's shape (fitted to
measured peaks) and DeepSpeed's terms on top of it, fitted together by ``bench/memory.py --fit``."""

from __future__ import annotations

from dataclasses import dataclass

from w2svd.config import Config
from w2svd.data.buckets import latent_size
from w2svd.memory.state import REDUCE_BUCKET_ELEMENTS, Engine, inventory

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
# DeepSpeed's step terms


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
