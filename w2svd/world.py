"""The portrait world: the self-trained parts that make a tiny config's videos mean something.

A random-init VAE decodes any latent to noise, so nothing a generator makes can be looked at or
measured. Here the real ``AutoencoderKLHunyuanVideo`` class, at a small size, is trained on
synthetic portrait clips (:mod:`w2svd.data.synth`, rendered by :func:`render_clips` here) until
it reconstructs clips it never saw (:mod:`w2svd.world_vae`); the teacher is then fine-tuned on latents it encodes (by the ``finetune`` job: see
``pipelines/world.py``, which builds a whole world).

Configs name world parts by URI, resolved here to the cached folders:

    model:
      vae: world:portrait/vae            # the VAE of config "portrait", trained by `w2svd world build`
      teacher: world:portrait/teacher    # its fine-tuned teacher

A part lives under ``$W2SVD_CACHE_DIR/worlds/<part>-<key>/`` where ``key`` hashes every
setting the part depends on, so changing one rebuilds it and two configs with the same settings
share it. ``PREBUILT_DIR`` holds parts committed with the code (the small VAE), checked the same
way: a prebuilt part is used only under the exact key it was built with.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from w2svd.config import Config, load_config

SCHEME = "world:"
PARTS = ("vae", "teacher")
PREBUILT_DIR = Path(__file__).parent / "worlds"
REPORT_FILE = "world.json"
# Bump when the training code (w2svd/world_vae.py) changes what a given recipe produces.
VAE_RECIPE_VERSION = 2


# ---------------------------------------------------------------------------------------------
# URIs and cache


def is_world_uri(uri: str | None) -> bool:
    return isinstance(uri, str) and uri.startswith(SCHEME)


def parse_world_uri(uri: str) -> tuple[str, str]:
    """``world:CONFIG/PART[@KEY]`` → ``(CONFIG, PART)``; CONFIG is a config name or a YAML path."""
    body = uri[len(SCHEME):]
    config, sep, part = body.rpartition("/")
    part = part.split("@", 1)[0]
    if not sep or not config or part not in PARTS:
        raise ValueError(f"world URI {uri!r} must look like world:CONFIG/PART with PART one of {list(PARTS)}")
    return config, part


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def first_bucket_size(cfg: Config) -> tuple[int, int, int]:
    b = cfg.data.buckets[0]
    return b.frames, b.height, b.width


def vae_recipe(cfg: Config) -> dict:
    """Everything the trained VAE depends on (its cache key is the hash of this)."""
    w, a = cfg.world, cfg.model.vae_arch
    arch = {k: v for k, v in asdict(a).items() if k != "scaling_factor"}  # measured, not chosen
    return {"version": VAE_RECIPE_VERSION, "arch": arch, "clip_size": list(first_bucket_size(cfg)),
            "fps": cfg.data.fps, "seed": w.seed, "clips": w.vae_clips, "test_clips": w.vae_test_clips,
            "steps": w.vae_steps, "batch_size": w.vae_batch_size, "crop": list(w.vae_crop), "lr": w.vae_lr,
            "kl_weight": w.vae_kl_weight}


def vae_key(cfg: Config) -> str:
    return _digest(vae_recipe(cfg))


# The method settings a fine-tuned teacher depends on (its training sigmas' shift, its adapter
# targets, the Euler sampler and guidance saved beside it); the rest only steer distillation, so
# a distillation recipe can change without invalidating a built (or committed) teacher.
TEACHER_METHOD_FIELDS = ("shift", "lora_targets", "guidance", "guidance_scale", "teacher_steps")
# Optimiser settings of the distillation roles only (the fine-tune has finetune_* of its own).
DISTILL_ONLY_OPTIM_FIELDS = ("generator_lr", "critic_lr", "disc_lr", "generator_lr_schedule", "betas")
# Settings added after teachers were committed, hashed only away from the value that reproduces
# how those teachers were built (so adding a setting does not orphan every committed teacher).
LATER_OPTIM_FIELDS = {"finetune_ema": 0.0}
# How the job runs, not what it learns: hashed at the value the committed teachers were built
# with whatever the config says, so a config can change them without orphaning its teacher.
EXECUTION_PARALLEL_FIELDS = {"materialize_data": False}


def teacher_key(cfg: Config) -> str:
    """Hash of what the fine-tuned teacher depends on: its VAE, the text encoders, the data, the
    model, parallel and world sections, the optimiser's without ``DISTILL_ONLY_OPTIM_FIELDS`` (and
    ``LATER_OPTIM_FIELDS`` at their old behaviour), ``EXECUTION_PARALLEL_FIELDS`` at fixed values
    and the method's ``TEACHER_METHOD_FIELDS`` (the teacher itself left out)."""
    from w2svd.config import to_dict
    from w2svd.models.encoders import encoder_ids

    raw = to_dict(cfg)
    raw["model"]["teacher"] = None
    raw["method"] = {k: raw["method"][k] for k in TEACHER_METHOD_FIELDS}
    raw["optim"] = {k: v for k, v in raw["optim"].items() if k not in DISTILL_ONLY_OPTIM_FIELDS
                    and not (k in LATER_OPTIM_FIELDS and v == LATER_OPTIM_FIELDS[k])}
    raw["parallel"] |= EXECUTION_PARALLEL_FIELDS
    keep = {k: raw[k] for k in ("model", "method", "data", "optim", "parallel", "world")}
    return _digest({"vae": vae_key(cfg), "text": encoder_ids(cfg)[1], "config": keep})


def part_key(cfg: Config, part: str) -> str:
    return vae_key(cfg) if part == "vae" else teacher_key(cfg)


def part_dir_name(part: str, key: str) -> str:
    # No config name: two configs with the same settings (a fast variant that changes only the
    # teacher) share a part, and the key covers everything the part depends on.
    return f"{part}-{key}"


def world_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    from w2svd.data.storage import cache_dir as default_cache

    return Path(cache_dir) if cache_dir else default_cache("worlds")


def part_location(config: str, part: str, cache_dir: str | os.PathLike | None = None) -> tuple[Path, Path | None]:
    """(the cache folder of a part, the prebuilt folder with the same key if one is committed)."""
    name = part_dir_name(part, part_key(load_config(config), part))
    prebuilt = PREBUILT_DIR / name
    return world_cache_root(cache_dir) / name, prebuilt if prebuilt.is_dir() else None


def built_part(part: str, key: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The finished folder of ``part`` built with settings ``key``: the cache's, else the committed
    one; ``None`` if neither has its report (a half-built folder never counts)."""
    name = part_dir_name(part, key)
    return next((f for f in (world_cache_root(cache_dir) / name, PREBUILT_DIR / name) if (f / REPORT_FILE).is_file()),
                None)


def pinned_key(uri: str) -> str | None:
    """The KEY of a pinned ``world:CONFIG/PART@KEY`` (what an export records), else None."""
    _, sep, key = uri.rpartition("/")[2].partition("@")
    return key if sep else None


def resolve_world_uri(uri: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local folder of a built world part; a one-line error naming the build command if absent.

    ``world:CONFIG/PART`` follows CONFIG's current settings; ``…@KEY`` is the part built with the
    settings of that key, whatever CONFIG says now (so an export keeps the VAE it was trained with)."""
    config, part = parse_world_uri(uri)
    pinned = pinned_key(uri)
    key = pinned or part_key(load_config(config), part)
    found = built_part(part, key, cache_dir)
    if found is not None:
        return found
    if pinned is not None:
        raise FileNotFoundError(f"{uri}: the {part} built with settings {pinned} is not here (world {config!r} now "
                                f"builds {part_dir_name(part, part_key(load_config(config), part))}); build it with "
                                "the settings it was built with, or retrain on the current world")
    raise FileNotFoundError(f"{uri}: the {part} of world {config!r} is not built (looked for "
                            f"{part_dir_name(part, key)}); run `w2svd world build --config {config}`")


def world_part_id(uri: str) -> str:
    """A stable id of a world part (shard metadata, an export's config): the URI pinned to the
    key of its settings, ``world:CONFIG/PART@KEY``."""
    if pinned_key(uri) is not None:
        return uri
    config, part = parse_world_uri(uri)
    return f"{uri}@{part_key(load_config(config), part)}"


def pin_world_parts(cfg: Config) -> Config:
    """``cfg`` with its ``world:`` VAE and teacher pinned to their keys (``world_part_id``): what
    an export writes, so a world rebuilt later does not change what the export decodes with."""
    from dataclasses import replace

    pinned = {k: world_part_id(v) for k in ("vae", "teacher") if is_world_uri(v := getattr(cfg.model, k))}
    return replace(cfg, model=replace(cfg.model, **pinned)) if pinned else cfg


def publish(tmp: Path, final: Path) -> Path:
    """Move a finished build into place; a half-written folder is never taken for a built part."""
    if final.exists():
        shutil.rmtree(final)
    tmp.replace(final)
    return final


# ---------------------------------------------------------------------------------------------
# Clips


def render_clips(seed: int, count: int, frames: int, height: int, width: int, fps: float,
                 start: int = 0) -> tuple[np.ndarray, list[dict]]:
    """uint8 ``[N, T, H, W, 3]`` synthetic portraits (clip ``i`` from ``rng([seed, i])``) and their factors,
    drawn exactly as ``synth.write_dataset`` draws them at one size."""
    from w2svd.data.synth import render_clip, sample_factors

    factors = [sample_factors(np.random.default_rng([seed, i]), portrait_sizes=((width, height),),
                              landscape_sizes=((width, height),), lengths=(frames,), fps_choices=(fps,),
                              orientation="portrait" if height >= width else "landscape")
               for i in range(start, start + count)]
    return np.stack([render_clip(f) for f in factors]), factors


def to_pixels(clips_BTHWC: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, T, H, W, 3]`` → float ``[B, 3, T, H, W]`` in [-1, 1] (the VAE's input)."""
    x = torch.as_tensor(np.asarray(clips_BTHWC)).float()
    return (x / 127.5 - 1.0).permute(0, 4, 1, 2, 3).contiguous()


# VAE clips: training from seed (world.seed, 1), tests from (world.seed, 2): disjoint by construction.
def vae_train_seed(cfg: Config) -> int:
    return hash_seed(cfg.world.seed, "vae-train")


def vae_test_seed(cfg: Config) -> int:
    return hash_seed(cfg.world.seed, "vae-test")


def hash_seed(seed: int, tag: str) -> int:
    return int(hashlib.sha256(f"{seed}:{tag}".encode()).hexdigest()[:8], 16)
