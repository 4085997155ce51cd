"""HunyuanVideo (T2V and I2V) as a W2SVD backbone, over diffusers' ``HunyuanVideoTransformer3DModel``.

    backbone = build_backbone(cfg.model)                  # random tiny weights, a folder, or s3://
    v_BCTHW = backbone(x_BCTHW, sigma_B, cond, guidance_B)
    save_backbone(backbone, "export/")                    # diffusers layout, loads back the same

Text-to-video: the 13B T2V checkpoint is guidance-distilled, so guidance enters as an embedding
(``guidance = 1000·g``). Image-to-video ("latent_concat", as HunyuanVideo-I2V): the transformer
sees ``[noisy latent | reference latent at frame 0, zeros after | mask, 1 at frame 0]`` on
channels (2·C + 1) and predicts a C-channel velocity; its text states are what the I2V text
encoder (LLaVA, image tokens included) produced upstream, so nothing here differs for them.

The wrapper does not copy diffusers' forward: it only assembles inputs, so PEFT adapters
injected into ``backbone.transformer`` and diffusers' own gradient checkpointing keep working.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import HunyuanVideoTransformer3DModel
from torch import nn

from w2svd.config import ModelConfig, TransformerArch
from w2svd.data import storage
from w2svd.models.base import Cond, Denoiser
from w2svd.schedule import timesteps

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Guidance scale 1.0 in diffusers' units: "no extra guidance" for a guidance-distilled model.
DEFAULT_GUIDANCE = 1000.0
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


class HunyuanVideoBackbone(Denoiser):
    """Velocity predictor ``v ≈ eps − x0`` over a diffusers HunyuanVideo transformer."""

    def __init__(self, transformer: HunyuanVideoTransformer3DModel):
        super().__init__()
        config = transformer.config
        if config.image_condition_type not in (None, "latent_concat"):
            # token_replace (SkyReels-style) needs its own frame-0 handling of the velocity.
            raise ValueError(
                f"image_condition_type = {config.image_condition_type!r} is not supported; "
                "use None (text-to-video) or 'latent_concat' (HunyuanVideo-I2V)"
            )
        self.transformer = transformer
        self.image_conditioned = config.image_condition_type == "latent_concat"
        self.latent_channels = int(config.out_channels or config.in_channels)
        expected_in = 2 * self.latent_channels + 1 if self.image_conditioned else self.latent_channels
        if config.in_channels != expected_in:
            raise ValueError(
                f"transformer has in_channels = {config.in_channels}, but "
                f"image_condition_type = {config.image_condition_type!r} with out_channels = "
                f"{self.latent_channels} needs {expected_in}"
            )
        self.guidance_embedded = bool(config.guidance_embeds)
        # The discriminator reads video tokens after the last dual-stream block (W2SVD / DMD2).
        self.feature_module = transformer.transformer_blocks[-1]
        self.feature_dim = int(config.num_attention_heads * config.attention_head_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def forward(self, x_BCTHW: torch.Tensor, sigma_B: torch.Tensor, cond: Cond,
                guidance_B: torch.Tensor | None = None) -> torch.Tensor:
        B, C, T, H, W = x_BCTHW.shape
        if C != self.latent_channels:
            raise ValueError(f"latent has {C} channels, the transformer expects {self.latent_channels}")
        if cond.pooled is None:
            raise ValueError("HunyuanVideo needs cond.pooled (the CLIP pooled text embedding)")
        dtype, device = self.transformer.dtype, x_BCTHW.device

        sigma_B = torch.as_tensor(sigma_B, device=device).reshape(-1).expand(B)
        # Timestep and guidance stay float32: diffusers' sinusoidal projection casts after the
        # sin/cos, and 1000·sigma in bf16 would be rounded to steps of 4.
        t_B = timesteps(sigma_B.float())
        guidance = None
        if self.guidance_embedded:
            guidance = (torch.full((B,), DEFAULT_GUIDANCE, device=device) if guidance_B is None
                        else torch.as_tensor(guidance_B, device=device).float().reshape(-1).expand(B))
        elif guidance_B is not None:
            # Silently ignoring it would turn a guidance setting into a no-op.
            raise ValueError("guidance_B given, but this transformer has no guidance embedding; use CFG")

        hidden_BCTHW = x_BCTHW
        if self.image_conditioned:
            hidden_BCTHW = torch.cat([x_BCTHW, *self._image_channels(cond, x_BCTHW)], dim=1)

        text_mask_BL = cond.text_mask
        if text_mask_BL is None:
            text_mask_BL = torch.ones(cond.text.shape[:2], device=device, dtype=dtype)
        v_BCTHW = self.transformer(
            hidden_states=hidden_BCTHW.to(dtype),
            timestep=t_B,
            encoder_hidden_states=cond.text.to(device=device, dtype=dtype),
            encoder_attention_mask=text_mask_BL.to(device=device, dtype=dtype),
            pooled_projections=cond.pooled.to(device=device, dtype=dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
        return v_BCTHW.to(x_BCTHW.dtype)

    def _image_channels(self, cond: Cond, x_BCTHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference latent at frame 0 (zeros after) and its mask, as HunyuanVideo-I2V's pipeline."""
        B, C, T, H, W = x_BCTHW.shape
        if cond.image is None:
            raise ValueError("image-to-video backbone needs cond.image, the [B, C, 1, h, w] reference latent")
        image_BC1HW = cond.image.to(device=x_BCTHW.device, dtype=x_BCTHW.dtype)
        if image_BC1HW.dim() == 4:
            image_BC1HW = image_BC1HW.unsqueeze(2)
        if tuple(image_BC1HW.shape) != (B, C, 1, H, W):
            raise ValueError(
                f"cond.image has shape {tuple(image_BC1HW.shape)}; expected {(B, C, 1, H, W)} for a "
                f"latent of shape {tuple(x_BCTHW.shape)}"
            )
        rest_BCTHW = x_BCTHW.new_zeros(B, C, T - 1, H, W)
        image_BCTHW = torch.cat([image_BC1HW, rest_BCTHW], dim=2)
        mask_B1THW = torch.cat([x_BCTHW.new_ones(B, 1, 1, H, W), x_BCTHW.new_zeros(B, 1, T - 1, H, W)], dim=2)
        return image_BCTHW, mask_B1THW


# ---------------------------------------------------------------------------------------------
# Building, loading, exporting


def arch_kwargs(arch: TransformerArch) -> dict:
    """``TransformerArch`` → keyword arguments of ``HunyuanVideoTransformer3DModel``."""
    return dict(
        in_channels=arch.in_channels,
        out_channels=arch.out_channels,
        num_attention_heads=arch.num_attention_heads,
        attention_head_dim=arch.attention_head_dim,
        num_layers=arch.num_layers,
        num_single_layers=arch.num_single_layers,
        num_refiner_layers=arch.num_refiner_layers,
        mlp_ratio=arch.mlp_ratio,
        patch_size=arch.patch_size,
        patch_size_t=arch.patch_size_t,
        text_embed_dim=arch.text_embed_dim,
        pooled_projection_dim=arch.pooled_projection_dim,
        rope_axes_dim=tuple(arch.rope_axes_dim),
        guidance_embeds=arch.guidance_embeds,
        image_condition_type=arch.image_condition_type,
    )


def build_backbone(model_cfg: ModelConfig, device: str | torch.device | None = None,
                   cache_dir: str | os.PathLike | None = None) -> HunyuanVideoBackbone:
    """The teacher backbone of ``model_cfg``: from ``model_cfg.teacher`` or random from ``arch``.

    ``teacher`` is a local diffusers folder (the model folder with a ``transformer/`` subfolder,
    or the transformer folder itself) or an ``s3://bucket/prefix`` mirrored into ``cache_dir``
    (the project cache root, default ``storage.cache_dir()``). ``device="meta"``
    builds the structure without memory (parameter counts, sharded init); it reads only
    ``config.json`` of a teacher.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    on_meta = device.type == "meta"
    dtype = _DTYPES[model_cfg.dtype]

    if model_cfg.teacher is None:
        kwargs = arch_kwargs(model_cfg.arch)
        if on_meta:
            with torch.device("meta"):
                transformer = HunyuanVideoTransformer3DModel(**kwargs)
        else:
            # Built on CPU under a private seed: the same weights on every device and worker,
            # without touching the caller's RNG stream.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(model_cfg.seed)
                transformer = HunyuanVideoTransformer3DModel(**kwargs)
    else:
        folder = resolve_teacher(model_cfg.teacher, cache_dir=cache_dir, config_only=on_meta)
        if on_meta:
            with torch.device("meta"):
                transformer = HunyuanVideoTransformer3DModel.from_config(
                    HunyuanVideoTransformer3DModel.load_config(folder))
        else:
            transformer = HunyuanVideoTransformer3DModel.from_pretrained(folder, torch_dtype=dtype)
        _check_family(model_cfg, transformer, source=str(model_cfg.teacher))

    if transformer.dtype != dtype:  # random init; from_pretrained already cast (keeping fp32 modules)
        transformer = transformer.to(dtype=dtype)
    transformer = transformer.to(device=device)
    if model_cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    backbone = HunyuanVideoBackbone(transformer)
    if model_cfg.teacher is None:
        _check_family(model_cfg, transformer, source="model.arch")
    return backbone


def _check_family(model_cfg: ModelConfig, transformer: HunyuanVideoTransformer3DModel, source: str) -> None:
    kind = transformer.config.image_condition_type
    if model_cfg.family == "hunyuan-i2v" and kind != "latent_concat":
        raise ValueError(
            f"model.family = 'hunyuan-i2v' but {source} has image_condition_type = {kind!r}; "
            "HunyuanVideo-I2V needs 'latent_concat' (in_channels = 2·C + 1)"
        )
    if model_cfg.family == "hunyuan-t2v" and kind is not None:
        raise ValueError(f"model.family = 'hunyuan-t2v' but {source} has image_condition_type = {kind!r}")


def resolve_teacher(teacher: str, cache_dir: str | os.PathLike | None = None,
                    config_only: bool = False) -> Path:
    """The local transformer folder (``config.json`` + safetensors) named by ``teacher``: a
    local folder, an ``s3://`` prefix mirrored by ``storage.copy_to_local`` (the configured
    endpoint and credentials; only ``config.json`` when ``config_only``), or a portrait world's
    ``world:CONFIG/teacher`` (``w2svd.world``)."""
    def wanted(rel: str) -> bool:
        name = rel.rsplit("/", 1)[-1]
        return name == "config.json" if config_only else name.endswith((".json", ".safetensors"))

    from w2svd import world

    if world.is_world_uri(teacher):
        teacher = str(world.resolve_world_uri(teacher, None if cache_dir is None else Path(cache_dir) / "worlds"))
    if teacher.startswith("s3://"):
        try:
            root = storage.copy_to_local(teacher, cache_dir, include=wanted)
        except FileNotFoundError:
            raise FileNotFoundError(f"teacher weights not found: nothing under {teacher!r}") from None
    else:
        root = Path(teacher).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"teacher weights not found: {teacher!r} does not exist")
    for folder in (root / "transformer", root):
        if (folder / "config.json").is_file():
            break
    else:
        raise FileNotFoundError(
            f"teacher {teacher!r} holds no config.json (looked in {root / 'transformer'} and {root})"
        )
    if not config_only and not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"teacher {teacher!r}: no *.safetensors weights in {folder}")
    return folder


def save_backbone(backbone: HunyuanVideoBackbone, folder: str | os.PathLike) -> Path:
    """Export the transformer in diffusers' layout (config.json + safetensors); returns ``folder``.

    ``build_backbone`` with ``teacher=folder`` loads it back. An injected PEFT adapter must be
    merged (or removed) first: its renamed ``base_layer`` keys would not load into a plain model.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer) for m in backbone.transformer.modules()):
        raise ValueError("backbone.transformer carries PEFT adapter layers; merge and unload them before export")
    folder = Path(folder)
    backbone.transformer.save_pretrained(folder, safe_serialization=True)
    return folder


def dummy_cond(model_cfg: ModelConfig, batch: int, seq_len: int, generator: torch.Generator | None = None,
               image_latent: torch.Tensor | None = None) -> Cond:
    """Random conditions with the shapes the backbone of ``model_cfg`` expects (tests, benchmarks)."""
    arch = model_cfg.arch
    return Cond(
        text=torch.randn(batch, seq_len, arch.text_embed_dim, generator=generator),
        text_mask=torch.ones(batch, seq_len),
        pooled=torch.randn(batch, arch.pooled_projection_dim, generator=generator),
        image=image_latent,
    )


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
