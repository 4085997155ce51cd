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


def sample_grid(rows: list[tuple[str, np.ndarray]], frames: int = 3, clips: int = 4, scale: int = 2,
                label_width: int = 150) -> np.ndarray:
    """One still image of several clip sets: a row per set (its label on the left), ``clips`` clips
    per row, each shown as ``frames`` evenly spaced frames, upscaled ``scale``× (nearest, so what is
    shown is what the metrics saw). Rows of different clip sizes are resized to the first's."""
    import cv2

    if not rows:
        raise ValueError("sample_grid needs at least one row")
    first = np.asarray(rows[0][1])
    T, H, W = first.shape[1:4]
    picks = np.linspace(0, T - 1, frames).round().astype(int)
    gap, out_rows = 4, []
    for label, clips_BTHWC in rows:
        clips_BTHWC = np.asarray(clips_BTHWC)[:clips]
        tiles = []
        for clip in clips_BTHWC:
            idx = np.linspace(0, len(clip) - 1, frames).round().astype(int) if len(clip) != T else picks
            strip = np.concatenate([cv2.resize(np.ascontiguousarray(clip[i]), (W, H), interpolation=cv2.INTER_AREA)
                                    for i in idx], axis=1)
            tiles += [strip, np.full((H, gap, 3), 255, np.uint8)]
        row = np.concatenate(tiles, axis=1)
        row = cv2.resize(row, (row.shape[1] * scale, H * scale), interpolation=cv2.INTER_NEAREST)
        text = np.full((H * scale, label_width, 3), 255, np.uint8)
        for j, line in enumerate(label.split("\n")[:4]):
            cv2.putText(text, line, (4, 16 + 16 * j), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
        out_rows += [np.concatenate([text, row], axis=1), np.full((gap, label_width + row.shape[1], 3), 255, np.uint8)]
    width = max(r.shape[1] for r in out_rows)
    out_rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in out_rows]
    return np.concatenate(out_rows, axis=0)
