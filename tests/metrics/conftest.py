"""Clip makers for the metric tests: small drawn portraits, static and moving, uint8 [B, T, H, W, 3]."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch


def draw_face_clip(T=8, H=64, W=64, dx_per_frame=0.0, seed=0, face_scale=1.0) -> np.ndarray:
    """A cartoon face (ellipse, eyes, mouth) on a textured background, sliding ``dx_per_frame`` px per frame."""
    rng = np.random.default_rng(seed)
    bg = rng.integers(40, 200, size=(H // 8, W // 8, 3)).astype(np.uint8)
    bg = cv2.resize(bg, (W, H), interpolation=cv2.INTER_CUBIC)
    frames = []
    for t in range(T):
        img = bg.copy()
        cx, cy = int(W / 2 + dx_per_frame * (t - T / 2)), H // 2
        a, b = int(W * 0.22 * face_scale), int(H * 0.3 * face_scale)
        cv2.ellipse(img, (cx, cy), (a, b), 0, 0, 360, (220, 180, 150), -1)
        for side in (-1, 1):
            cv2.circle(img, (cx + side * a // 2, cy - b // 4), max(1, a // 6), (20, 20, 20), -1)
        cv2.ellipse(img, (cx, cy + b // 2), (a // 2, max(1, b // 10)), 0, 0, 360, (120, 40, 40), -1)
        frames.append(img)
    return np.stack(frames)


@pytest.fixture
def face_clips():
    def make(B=2, **kw) -> torch.Tensor:
        return torch.from_numpy(np.stack([draw_face_clip(seed=b, **kw) for b in range(B)]))

    return make


@pytest.fixture(autouse=True)
def _one_thread():
    # These tensors are tiny: on a shared 2-core machine, intra-op threads only spin against other jobs.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
