"""The one canonical clip format of ``w2svd.metrics`` and the single converter into it.

Every metric takes ``clips_BTHWC``: a ``[B, T, H, W, 3]`` uint8 tensor (RGB, 0..255), the layout a
video decoder returns. A single clip ``[T, H, W, 3]`` is promoted to ``B = 1``; float clips are
read as 0..1 if their max is ≤ 1, else as 0..255 (the VAE's [-1, 1] output must be mapped by the
caller: that choice belongs to the decoder, not here).
"""

from __future__ import annotations

import numpy as np
import torch


def as_clips_BTHWC(clips) -> torch.Tensor:
    """Any clip batch (tensor or ndarray, uint8 or float, 4-D or 5-D) → uint8 ``[B, T, H, W, 3]``."""
    x = torch.as_tensor(np.asarray(clips) if not isinstance(clips, torch.Tensor) else clips)
    if x.dim() == 4:
        x = x.unsqueeze(0)
    if x.dim() != 5 or x.shape[-1] != 3:
        raise ValueError(f"expected clips [B, T, H, W, 3] (or one clip [T, H, W, 3]), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x
    x = x.detach().float()
    if x.numel() and x.max() <= 1.0:
        x = x * 255.0
    return x.round().clamp(0, 255).to(torch.uint8)


def to_float_BCTHW(clips_BTHWC: torch.Tensor, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    """uint8 ``[B, T, H, W, 3]`` → float ``[B, 3, T, H, W]`` scaled linearly from 0..255 to ``[lo, hi]``."""
    x = as_clips_BTHWC(clips_BTHWC).permute(0, 4, 1, 2, 3).float()
    return lo + (hi - lo) * x / 255.0


def gray_frames_THW(clip_THWC) -> np.ndarray:
    """One uint8 clip (tensor or array) → float32 luma frames ``[T, H, W]`` (BT.601, as OpenCV's RGB2GRAY)."""
    x = np.asarray(clip_THWC, dtype=np.float32)
    return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114
