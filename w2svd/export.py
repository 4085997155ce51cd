"""The exported generator: the one folder registry, Serve and batch generation load.

    EXPORT/transformer/config.json                              diffusers layout, full weights
    EXPORT/transformer/diffusion_pytorch_model.safetensors
    EXPORT/transformer_lora/adapter_model.safetensors           only for a LoRA generator (PEFT keys)
    EXPORT/transformer_lora/adapter_config.json
    EXPORT/sampler.json                                         how to sample it (SamplerSettings)
    EXPORT/config.yaml                                          the resolved training config

    save_generator_export(backbone, "export/", sampler_settings_for(cfg), cfg)
    backbone, settings = load_generator("export/")           # local folder or s3://
    latents = generate_latents(backbone, settings, cond, noise)

A LoRA generator is exported merged (base + adapter in one set of weights), so every loader has
one path; the adapter alone is kept next to it. ``build_backbone`` with ``model.teacher=EXPORT``
loads ``transformer/`` too, which is how a fine-tuned teacher feeds distillation.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import HunyuanVideoTransformer3DModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from w2svd import world
from w2svd.config import Config, ModelConfig, to_yaml
from w2svd.models.base import Cond
from w2svd.models.hunyuan import HunyuanVideoBackbone, build_backbone, save_backbone
from w2svd.roles import Guidance, View, guided_velocity, lora_layers, student_guidance
from w2svd.sampling import sample
from w2svd.schedule import student_sigmas

SAMPLER_FILE = "sampler.json"
CONFIG_FILE = "config.yaml"
TRANSFORMER_DIR = "transformer"
LORA_DIR = "transformer_lora"


@dataclass(frozen=True)
class SamplerSettings:
    steps: int
    sigmas: list[float]
    shift: float
    mode: str  # "renoise" | "euler"
    guidance_mode: str  # "embedded" | "cfg" | "none"
    guidance_scale: float
    family: str  # "hunyuan-t2v" | "hunyuan-i2v"
    latent_channels: int
    method: str

    def __post_init__(self):
        if self.mode not in ("renoise", "euler"):
            raise ValueError(f"sampler mode {self.mode!r}; choose 'renoise' or 'euler'")
        if self.guidance_mode not in ("embedded", "cfg", "none"):
            raise ValueError(f"guidance_mode {self.guidance_mode!r}; choose 'embedded', 'cfg' or 'none'")
        if len(self.sigmas) != self.steps:
            raise ValueError(f"sampler has steps = {self.steps} but {len(self.sigmas)} sigmas")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> SamplerSettings:
        raw = json.loads(text)
        missing = sorted(set(cls.__dataclass_fields__) - set(raw))
        if missing:
            raise ValueError(f"{SAMPLER_FILE} lacks {missing}")
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__})


def sampler_settings_for(cfg: Config, role: str = "generator") -> SamplerSettings:
    """How to sample what a run trains: the distilled student, or (``role="teacher"``) the
    fine-tuned teacher with its N-step Euler sampler and full guidance."""
    m = cfg.method
    if role == "teacher":
        steps, mode, guidance, scale, method = m.teacher_steps, "euler", m.guidance, m.guidance_scale, "finetune"
    elif role == "generator":
        steps, mode, method = m.student_steps, m.sampler, m.name
        guidance, scale = student_guidance(Guidance.from_config(m))
    else:
        raise ValueError(f"role {role!r}; choose 'generator' or 'teacher'")
    return SamplerSettings(
        steps=steps, sigmas=[float(s) for s in student_sigmas(steps, m.shift)], shift=float(m.shift),
        mode=mode, guidance_mode=guidance, guidance_scale=float(scale), family=cfg.model.family,
        latent_channels=int(cfg.model.arch.out_channels), method=method,
    )


# ---------------------------------------------------------------------------------------------
# LoRA → plain weights


def merged_state_dict(transformer: torch.nn.Module, adapter: str | None) -> dict[str, torch.Tensor]:
    """The plain-model state dict of ``transformer`` with adapter ``adapter`` merged at scale 1
    (``None``: the base alone). Other adapters are dropped. No module is copied or modified."""
    plain: dict[str, torch.Tensor] = {}
    for key, value in transformer.state_dict().items():
        if ".lora_" in key:
            continue
        plain[key.replace(".base_layer.", ".")] = value.detach().clone()
    if adapter is None:
        return plain
    found = False
    for name, layer in transformer.named_modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
            continue
        found = True
        a = layer.lora_A[adapter].weight.detach().float()
        b = layer.lora_B[adapter].weight.detach().float()
        scaling = layer.lora_alpha[adapter] / layer.r[adapter]
        key = f"{name}.weight"
        plain[key] = (plain[key].float() + (b @ a) * scaling).to(plain[key].dtype)
    if not found:
        raise ValueError(f"adapter {adapter!r} not found in the transformer")
    return plain


def adapter_state_dict(transformer: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """PEFT-style keys (``…lora_A.weight``) of one adapter, for ``transformer_lora/``."""
    out = {}
    for key, value in transformer.state_dict().items():
        if f".lora_A.{adapter}." in key or f".lora_B.{adapter}." in key:
            out[key.replace(f".{adapter}.", ".")] = value.detach().contiguous().clone()
    if not out:
        raise ValueError(f"adapter {adapter!r} not found in the transformer")
    return out


def plain_backbone(backbone: HunyuanVideoBackbone, adapter: str | None = None) -> HunyuanVideoBackbone:
    """A new adapter-free backbone: ``backbone``'s base with ``adapter`` merged (or the base alone).
    Adapters that are not the generator (a critic) never leak into the export."""
    transformer = backbone.transformer
    if not lora_layers(transformer):
        return backbone
    state = merged_state_dict(transformer, adapter)
    with torch.device("meta"):
        fresh = HunyuanVideoTransformer3DModel.from_config(transformer.config)
    fresh.load_state_dict(state, strict=True, assign=True)
    return HunyuanVideoBackbone(fresh)


# ---------------------------------------------------------------------------------------------
# Save / load


def save_generator_export(backbone: HunyuanVideoBackbone, folder: str | os.PathLike,
                          sampler_settings: SamplerSettings, cfg: Config, adapter: str | None = None) -> Path:
    """Write the export folder (local). ``adapter``: the LoRA adapter of ``backbone`` that *is*
    the generator (shared-base mode); it is merged into ``transformer/`` and also saved alone."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if adapter is not None:
        lora_dir = folder / LORA_DIR
        lora_dir.mkdir(exist_ok=True)
        save_file(adapter_state_dict(backbone.transformer, adapter), lora_dir / "adapter_model.safetensors")
        layer = next(iter(lora_layers(backbone.transformer)))
        (lora_dir / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": layer.r[adapter], "lora_alpha": layer.lora_alpha[adapter],
            "target_modules": cfg.method.lora_targets, "adapter_name": adapter,
        }, indent=2))
    save_backbone(plain_backbone(backbone, adapter), folder / TRANSFORMER_DIR)
    (folder / SAMPLER_FILE).write_text(sampler_settings.to_json())
    (folder / CONFIG_FILE).write_text(to_yaml(world.pin_world_parts(cfg)))
    return folder


def load_generator(folder: str | os.PathLike, device: str | torch.device | None = None,
                   dtype: str = "float32", cache_dir: str | os.PathLike | None = None
                   ) -> tuple[HunyuanVideoBackbone, SamplerSettings]:
    """The exported generator (eval mode, no gradients) and its sampler settings; ``folder`` is
    a local path or ``s3://bucket/prefix``."""
    folder = str(folder)
    if folder.startswith("s3://"):
        from w2svd.data import storage

        local = storage.copy_to_local(folder, cache_dir)
    else:
        local = Path(folder).expanduser()
    sampler_path = local / SAMPLER_FILE
    if not sampler_path.is_file():
        raise FileNotFoundError(f"{folder!r} is not a generator export: no {SAMPLER_FILE}")
    settings = SamplerSettings.from_json(sampler_path.read_text())
    model_cfg = ModelConfig(family=settings.family, teacher=str(local), dtype=dtype)
    backbone = build_backbone(model_cfg, device=device)
    backbone.eval().requires_grad_(False)
    if backbone.latent_channels != settings.latent_channels:
        raise ValueError(f"{folder!r}: transformer has {backbone.latent_channels} latent channels, "
                         f"{SAMPLER_FILE} says {settings.latent_channels}")
    return backbone, settings


@torch.no_grad()
def sample_latents(view: View, settings: SamplerSettings, cond: Cond, noise: torch.Tensor,
                   generator=None) -> torch.Tensor:
    """Latents ``[B, C, T, H, W]`` from ``noise`` with sampler ``settings``: how an export is
    served and how a training run draws its validation samples (one rule for both). ``generator``
    may be one generator or one per sample (``w2svd.rng``)."""
    sigmas = torch.tensor(settings.sigmas, dtype=torch.float32)

    def velocity(x, s_B):
        return guided_velocity(view, x, s_B, cond, settings.guidance_mode, settings.guidance_scale)

    return sample(velocity, noise, sigmas, settings.mode, generator)


def generate_latents(backbone: HunyuanVideoBackbone, settings: SamplerSettings, cond: Cond,
                     noise: torch.Tensor, generator=None) -> torch.Tensor:
    """``sample_latents`` of a plain (exported) backbone."""
    return sample_latents(View(backbone), settings, cond, noise, generator)
