"""The portrait world's codec: the real ``AutoencoderKLHunyuanVideo`` class at a small size,
trained on synthetic portrait clips (:func:`w2svd.world.render_clips`) until it reconstructs clips
it never saw, and cached under the hash of its settings (:mod:`w2svd.world`: URIs and keys).

    folder, report = build_world_vae("portrait")        # trained once, then taken from the cache
    vae = load_vae(folder)
    psnr_dB = reconstruction_psnr(vae, clips_BTHWC)     # per clip, on decode(mode(encode(x)))
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from w2svd.config import Config, load_config
from w2svd.world import (
    REPORT_FILE,
    built_part,
    first_bucket_size,
    part_location,
    publish,
    render_clips,
    to_pixels,
    vae_key,
    vae_recipe,
    vae_test_seed,
    vae_train_seed,
)

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
