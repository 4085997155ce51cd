"""Which resolution/frame bucket a clip goes to, which frames it keeps, and resize + crop.

Buckets follow the HunyuanVideo VAE's constraint (frames 4k+1, sizes multiples of 16; the
config validates it). A clip goes to the bucket closest to its aspect ratio among those it has
enough frames for, preferring the largest such bucket, so portrait clips land in portrait
buckets and a short clip can still use a shorter bucket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:  # imported where tensors are made, so that decode tasks start without torch
    import torch


class Rejected(ValueError):
    """A clip that no bucket can take; ``reason`` is a quarantine reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Bucket:
    name: str
    frames: int
    height: int
    width: int

    @classmethod
    def from_config(cls, b) -> Bucket:
        return cls(b.name, int(b.frames), int(b.height), int(b.width))


# HunyuanVideo's causal 3-D VAE: 4× in time (plus the first frame), 8× in height and width.
VAE_TEMPORAL_RATIO = 4
VAE_SPATIAL_RATIO = 8


def latent_size(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Latent ``(t, h, w)`` of a clip: ``t = (frames − 1) / 4 + 1``, ``h = height / 8``, ``w = width / 8``."""
    return (frames - 1) // VAE_TEMPORAL_RATIO + 1, height // VAE_SPATIAL_RATIO, width // VAE_SPATIAL_RATIO


def frame_stride(src_fps: float, target_fps: float) -> int:
    """Keep every ``stride``-th source frame to approach ``target_fps`` (never upsample)."""
    if not src_fps or src_fps <= 0 or target_fps <= 0:
        return 1
    return max(1, int(round(src_fps / target_fps)))


def sample_frame_indices(num_src_frames: int, frames: int, stride: int) -> list[int] | None:
    """``frames`` indices ``stride`` apart, centred in the clip; a smaller stride when the clip
    is too short for the preferred one; ``None`` when it is too short even at stride 1."""
    for s in range(stride, 0, -1):
        span = (frames - 1) * s + 1
        if span <= num_src_frames:
            start = (num_src_frames - span) // 2
            return [start + i * s for i in range(frames)]
    return None


def choose_bucket(
    height: int, width: int, num_src_frames: int, buckets: list[Bucket], *, min_side: int
) -> Bucket:
    if not buckets:
        raise ValueError("no buckets configured (data.buckets is empty)")
    if min(height, width) < min_side:
        raise Rejected("too_small", f"{width}x{height} is below data.min_side = {min_side}")
    fitting = [b for b in buckets if b.frames <= num_src_frames]
    if not fitting:
        need = min(b.frames for b in buckets)
        raise Rejected("too_short", f"{num_src_frames} frames, the shortest bucket needs {need}")
    aspect = math.log(height / width)

    def key(b: Bucket):
        return (round(abs(math.log(b.height / b.width) - aspect), 3), -b.frames, -b.height * b.width)

    return min(fitting, key=key)


def resize_and_crop(frames_THWC: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale uint8 frames to cover ``height x width``, then crop the centre."""
    _, src_h, src_w, _ = frames_THWC.shape
    scale = max(height / src_h, width / src_w)
    new_h, new_w = max(height, round(src_h * scale)), max(width, round(src_w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    top, left = (new_h - height) // 2, (new_w - width) // 2
    out = np.empty((len(frames_THWC), height, width, 3), np.uint8)
    for i, frame in enumerate(frames_THWC):
        resized = cv2.resize(frame, (new_w, new_h), interpolation=interp) if (new_h, new_w) != (src_h, src_w) else frame
        out[i] = resized[top:top + height, left:left + width]
    return out


def to_model_input(frames_THWC: np.ndarray) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` → float ``[3, T, H, W]`` in [-1, 1], the VAE's input range."""
    import torch

    # astype copies, so read-only buffers (frames straight from Arrow bytes) are fine.
    return torch.from_numpy(frames_THWC.astype(np.float32)).permute(3, 0, 1, 2).div_(127.5).sub_(1.0)


def clips_from_model_output(video_BCTHW: torch.Tensor) -> torch.Tensor:
    """Decoder output, float ``[B, 3, T, H, W]`` in [-1, 1] → uint8 clips ``[B, T, H, W, 3]``
    (the inverse of ``to_model_input``; values outside [-1, 1] are clipped)."""
    import torch

    x = ((video_BCTHW.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).contiguous().cpu()
