"""Validation previews of a training run: latents → clips a person can watch, and quick scores.

A preview must never end a training run, so both functions degrade instead of raising: a VAE
that cannot decode gives the first latent channel in grey (labelled as such, never passed off as
video), a metric that fails gives no numbers.
"""

from __future__ import annotations

import numpy as np
import torch

from w2svd.config import Config
from w2svd.data.buckets import clips_from_model_output

VAE_LABEL = "vae"
LATENT_LABEL = "latent-channel-0-grey"


def decode_samples(cfg: Config, latents_BCTHW: torch.Tensor, log=print) -> tuple[np.ndarray, str]:
    """Latents → uint8 clips ``[B, T, H, W, 3]`` and how they were made: decoded by the config's
    VAE (``"vae"``), or, when that fails, latent channel 0 in grey (``"latent-channel-0-grey"``)."""
    latents = latents_BCTHW.detach().float().cpu()
    try:
        from w2svd.models.encoders import decode_latents

        return clips_from_model_output(decode_latents(cfg, latents)).numpy(), VAE_LABEL
    except Exception as err:  # noqa: BLE001 - a preview must not end a training run
        log(f"[w2svd] VAE decode of validation samples failed ({err}); showing latent channel 0 in grey")
    x = latents[:, :1]
    lo, hi = x.amin(), x.amax()
    video = ((x - lo) / (hi - lo + 1e-8) * 2 - 1).repeat(1, 3, 1, 1, 1)
    if min(video.shape[-2:]) < 16:  # so players show something
        b, c, t, h, w = video.shape
        video = torch.nn.functional.interpolate(video.reshape(b, c * t, h, w), scale_factor=8, mode="nearest")
        video = video.reshape(b, c, t, h * 8, w * 8)
    return clips_from_model_output(video).numpy(), LATENT_LABEL


def video_strip(clips_BTHWC: np.ndarray) -> np.ndarray:
    """Clips side by side in one ``[T, H, B·W, 3]`` video, cropped to even sizes (H.264)."""
    strip = np.concatenate(list(clips_BTHWC), axis=2)
    h, w = strip.shape[1] - strip.shape[1] % 2, strip.shape[2] - strip.shape[2] % 2
    return np.ascontiguousarray(strip[:, :h, :w])


def quick_metrics(clips_BTHWC: np.ndarray, fps: float, log=print) -> dict[str, float]:
    """The evaluation's network-free VBench-style scores of the previews, named
    ``quick/<dimension>`` (offline proxies; not comparable with published VBench numbers)."""
    try:
        from w2svd.metrics.vbench import vbench_report

        report = vbench_report(clips_BTHWC, fps=fps)
    except Exception as err:  # noqa: BLE001 - a metric must not end a training run
        log(f"[w2svd] quick metrics of the previews failed: {err}")
        return {}
    return {f"quick/{name}": float(r["value"]) for name, r in report.items()}
