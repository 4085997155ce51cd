"""The portrait world: the self-trained parts that make a tiny config's videos mean something.

A random-init VAE decodes any latent to noise, so nothing a generator makes can be looked at or
measured. Here the real ``AutoencoderKLHunyuanVideo`` class, at a small size, is trained on
synthetic portrait clips (:mod:`w2svd.data.synth`) until it reconstructs clips it never saw;
the teacher is then fine-tuned on latents it encodes (by the ``finetune`` job: see
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
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from w2svd.config import Config, load_config

SCHEME = "world:"
PARTS = ("vae", "teacher")
PREBUILT_DIR = Path(__file__).parent / "worlds"
REPORT_FILE = "world.json"
# Bump when the training code changes what a given recipe produces.
VAE_RECIPE_VERSION = 2


# ---------------------------------------------------------------------------------------------
# Math


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of each sample (first dim): ``10·log10(range² / MSE)``.

    Identical samples give ``inf``."""
    if x.shape != y.shape:
        raise ValueError(f"psnr of shapes {tuple(x.shape)} and {tuple(y.shape)}")
    mse = (x.double() - y.double()).pow(2).reshape(x.shape[0], -1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean, exp(logvar)) || N(0, 1))`` summed over all but the first dim, averaged over it."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.reshape(kl.shape[0], -1).sum(1).mean()


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


def teacher_key(cfg: Config) -> str:
    """Hash of what the fine-tuned teacher depends on: its VAE, the text encoders, the data, the
    model, parallel and world sections, the optimiser's without ``DISTILL_ONLY_OPTIM_FIELDS`` (and
    ``LATER_OPTIM_FIELDS`` at their old behaviour) and the method's ``TEACHER_METHOD_FIELDS`` (the
    teacher itself left out)."""
    from w2svd.config import to_dict
    from w2svd.models.encoders import encoder_ids

    raw = to_dict(cfg)
    raw["model"]["teacher"] = None
    raw["method"] = {k: raw["method"][k] for k in TEACHER_METHOD_FIELDS}
    raw["optim"] = {k: v for k, v in raw["optim"].items() if k not in DISTILL_ONLY_OPTIM_FIELDS
                    and not (k in LATER_OPTIM_FIELDS and v == LATER_OPTIM_FIELDS[k])}
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


# ---------------------------------------------------------------------------------------------
# VAE


def build_vae_module(cfg: Config):
    from diffusers import AutoencoderKLHunyuanVideo

    from w2svd.models.encoders import vae_kwargs

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.world.seed)
        return AutoencoderKLHunyuanVideo(**vae_kwargs(cfg))


def _random_crops(x_NCTHW: torch.Tensor, batch: int, crop: list[int], temporal_ratio: int,
                  gen: torch.Generator) -> torch.Tensor:
    """Crops ``[batch, C, t, h, w]``; the first frame of a crop is one the VAE encodes alone at
    inference (frame 0 or a multiple of the temporal ratio), so crops see inference's grouping."""
    N, _, T, H, W = x_NCTHW.shape
    t, h, w = min(crop[0], T), min(crop[1], H), min(crop[2], W)
    starts_t = list(range(0, T - t + 1, temporal_ratio)) or [0]
    out = []
    for _ in range(batch):
        n = int(torch.randint(N, (1,), generator=gen))
        t0 = starts_t[int(torch.randint(len(starts_t), (1,), generator=gen))]
        y0 = int(torch.randint(H - h + 1, (1,), generator=gen))
        x0 = int(torch.randint(W - w + 1, (1,), generator=gen))
        out.append(x_NCTHW[n, :, t0:t0 + t, y0:y0 + h, x0:x0 + w])
    return torch.stack(out)


@torch.no_grad()
def round_trip(vae, x_BCTHW: torch.Tensor) -> torch.Tensor:
    """``decode(mode(encode(x)))`` in [-1, 1]: what the pre-encoded latents decode back to."""
    return vae.decode(vae.encode(x_BCTHW).latent_dist.mode()).sample.clamp(-1, 1)


@torch.no_grad()
def reconstruction_psnr(vae, clips_BTHWC: np.ndarray, batch_size: int = 2) -> list[float]:
    """Per-clip PSNR (dB, range [-1, 1]) of ``round_trip`` against the clip."""
    out = []
    for i in range(0, len(clips_BTHWC), batch_size):
        x = to_pixels(clips_BTHWC[i:i + batch_size])
        out += psnr(round_trip(vae, x), x).tolist()
    return out


@torch.no_grad()
def latent_std(vae, clips_BTHWC: np.ndarray, batch_size: int = 2) -> float:
    zs = [vae.encode(to_pixels(clips_BTHWC[i:i + batch_size])).latent_dist.mode()
          for i in range(0, len(clips_BTHWC), batch_size)]
    return float(torch.cat(zs).std())


def train_vae(cfg: Config, log: Callable[[str], None] = print, eval_every: int = 100):
    """Train the config's VAE on synthetic portraits; returns ``(vae, report)``.

    Loss per step: ``MSE + 0.1·L1`` of the reconstruction from the posterior mean (on random
    crops) ``+ kl_weight·KL(posterior || N(0, I))``; Adam with linear warm-up and cosine decay.
    The report holds the PSNR on unseen clips and the latent scaling factor (``1 / std`` of the
    training latents, so the diffusion model sees unit-variance latents, as with the 13B VAE).
    Deterministic for a given config on one machine (single-threaded BLAS aside).
    """
    w = cfg.world
    frames, height, width = first_bucket_size(cfg)
    t0 = time.time()
    train_clips, _ = render_clips(vae_train_seed(cfg), w.vae_clips, frames, height, width, cfg.data.fps)
    test_clips, _ = render_clips(vae_test_seed(cfg), w.vae_test_clips, frames, height, width, cfg.data.fps)
    x_all = to_pixels(train_clips)
    vae = build_vae_module(cfg).train()
    ratio = int(vae.temporal_compression_ratio)
    gen = torch.Generator().manual_seed(w.seed)
    opt = torch.optim.Adam(vae.parameters(), lr=w.vae_lr)
    warmup = max(1, w.vae_steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return w.vae_lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, w.vae_steps - warmup)
        return w.vae_lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    curve = []
    for step in range(w.vae_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x = _random_crops(x_all, w.vae_batch_size, w.vae_crop, ratio, gen)
        posterior = vae.encode(x).latent_dist
        # Decoded from the posterior mean, not a sample: pre-encoding stores the mode, and at
        # initialisation a unit-variance sample drowns the mean, so the decoder would first only
        # learn the average clip (measured: 18 dB after 250 steps with sampling).
        rec = vae.decode(posterior.mean).sample
        loss = F.mse_loss(rec, x) + 0.1 * F.l1_loss(rec, x) + w.vae_kl_weight * kl_to_standard_normal(
            posterior.mean, posterior.logvar)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == w.vae_steps:
            vae.eval()
            test_psnr = float(np.mean(reconstruction_psnr(vae, test_clips)))
            vae.train()
            curve.append({"step": step + 1, "loss": loss.item(), "test_psnr": test_psnr})
            log(f"[world] vae step {step + 1}/{w.vae_steps}: loss {loss.item():.5f}, unseen-clip PSNR "
                f"{test_psnr:.2f} dB ({time.time() - t0:.0f} s)")
    vae.eval()
    per_clip = reconstruction_psnr(vae, test_clips)
    scaling = 1.0 / latent_std(vae, train_clips[: min(len(train_clips), 16)])
    vae.register_to_config(scaling_factor=round(scaling, 6))
    report = {"part": "vae", "recipe": vae_recipe(cfg), "key": vae_key(cfg),
              "test_psnr": float(np.mean(per_clip)), "test_psnr_min": float(np.min(per_clip)),
              "test_psnr_per_clip": per_clip, "train_psnr": float(np.mean(reconstruction_psnr(vae, train_clips[:8]))),
              "scaling_factor": round(scaling, 6), "min_psnr": w.vae_min_psnr, "curve": curve,
              "seconds": round(time.time() - t0, 1), "threads": torch.get_num_threads()}
    return vae, report


def save_vae(vae, report: dict, folder: Path) -> Path:
    """diffusers layout (``config.json`` + safetensors, loadable by ``from_pretrained``) + ``world.json``.

    Stored in float16: half the bytes of a committed prebuilt copy; the PSNR in the report is
    measured again on the float16 round trip, so it describes the saved weights."""
    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    vae.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    vae.to(torch.float32)
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return publish(tmp, folder)


def load_vae(folder: str | os.PathLike):
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo.from_pretrained(str(folder), torch_dtype=torch.float32).eval()


def build_world_vae(config: str, cache_dir: str | os.PathLike | None = None, log: Callable[[str], None] = print,
                    force: bool = False) -> tuple[Path, dict]:
    """The config's VAE folder, trained and cached unless a folder with its key exists."""
    cfg = load_config(config)
    cached, _ = part_location(config, "vae", cache_dir)
    found = None if force else built_part("vae", vae_key(cfg), cache_dir)
    if found is not None:
        log(f"[world] vae: using {found}")
        return found, json.loads((found / REPORT_FILE).read_text())
    cached.parent.mkdir(parents=True, exist_ok=True)
    log(f"[world] vae: training {cached.name} ({cfg.world.vae_steps} steps)")
    vae, report = train_vae(cfg, log)
    save_vae(vae, report, cached)
    # The saved (float16) weights are what every later stage loads: measure those.
    frames, height, width = first_bucket_size(cfg)
    test_clips, _ = render_clips(vae_test_seed(cfg), cfg.world.vae_test_clips, frames, height, width, cfg.data.fps)
    report["test_psnr_saved"] = float(np.mean(reconstruction_psnr(load_vae(cached), test_clips)))
    (cached / REPORT_FILE).write_text(json.dumps(report, indent=2))
    log(f"[world] vae: unseen-clip PSNR {report['test_psnr_saved']:.2f} dB (saved weights), "
        f"scaling factor {report['scaling_factor']}, {report['seconds']:.0f} s")
    return cached, report
