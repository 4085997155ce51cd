"""Inflated Inception-V1 (I3D, Carreira & Zisserman 2017): the feature network of the original FVD.

The architecture mirrors DeepMind's ``kinetics-i3d`` RGB stream (TF "SAME" padding, BatchNorm
eps 1e-3) with the module names of the widely used PyTorch port (``pytorch-i3d``'s
``InceptionI3d``), so its Kinetics-400 RGB state dict (``rgb_imagenet.pt``: ImageNet-inflated,
trained on Kinetics-400) loads as is. Features for FVD (Unterthiner et al. 2018): the clip is resized
to 224×224, scaled to [-1, 1], and the 400 Kinetics logits averaged over time are the features
(``feature="logits"``); ``feature="pool"`` gives the 1024-d average-pooled ``Mixed_5c`` output.

The weights are never downloaded: :meth:`I3DFeatures.from_path` reads a local file or a bucket URI and
raises :class:`~w2svd.metrics.weights.MissingWeightsError` naming the file when it is absent.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from w2svd.metrics.clips import to_float_BCTHW
from w2svd.metrics.weights import load_state_dict

I3D_WEIGHTS_FILE = "rgb_imagenet.pt"
I3D_HOW_TO_GET = (
    "Use the Kinetics-400 RGB I3D state dict of the PyTorch port of DeepMind's kinetics-i3d "
    "('rgb_imagenet.pt' from the pytorch-i3d repository's models/ folder, ~50 MB), or any "
    ".pt/.safetensors state dict with the keys of w2svd.metrics.i3d.InceptionI3d, copied on a "
    "machine with internet access."
)


def _same_pad(size: int, k: int, s: int) -> tuple[int, int]:
    """TF 'SAME' padding of one dim: total ``max(k − s, 0)`` or ``max(k − size mod s, 0)``, extra at the end."""
    total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel, stride) -> torch.Tensor:
    pads = [_same_pad(x.shape[2 + i], kernel[i], stride[i]) for i in range(3)]
    return F.pad(x, (*pads[2], *pads[1], *pads[0]))


class MaxPool3dSamePadding(nn.MaxPool3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Zero padding as in the reference: activations are post-ReLU, so 0 never wins a max wrongly.
        return super().forward(_pad_same(x, self.kernel_size, self.stride))


class Unit3D(nn.Module):
    """Conv3d (no bias) → BatchNorm(eps 1e-3) → ReLU, with TF 'SAME' padding."""

    def __init__(self, cin, cout, kernel=(1, 1, 1), stride=(1, 1, 1), relu=True, bn=True, bias=False):
        super().__init__()
        self.kernel, self.stride, self.relu = tuple(kernel), tuple(stride), relu
        self.conv3d = nn.Conv3d(cin, cout, self.kernel, self.stride, padding=0, bias=bias)
        self.bn = nn.BatchNorm3d(cout, eps=1e-3, momentum=0.01) if bn else None

    def forward(self, x):
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class InceptionModule(nn.Module):
    """Four branches: 1×1; 1×1→3×3×3; 1×1→3×3×3; maxpool 3×3×3→1×1; concatenated over channels."""

    def __init__(self, cin: int, c: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0 = Unit3D(cin, c[0])
        self.b1a, self.b1b = Unit3D(cin, c[1]), Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(cin, c[3]), Unit3D(c[3], c[4], (3, 3, 3))
        self.b3a, self.b3b = MaxPool3dSamePadding((3, 3, 3), (1, 1, 1)), Unit3D(cin, c[5])
        self.out_channels = c[0] + c[2] + c[4] + c[5]

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1)


class InceptionI3d(nn.Module):
    """RGB I3D: ``[B, 3, T, H, W]`` in [-1, 1] → (``[B, num_classes]`` time-averaged logits, ``[B, 1024]`` pool)."""

    _MIXED = {
        "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
        "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
        "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
        "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
        "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
        "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
        "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
        "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
        "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
    }

    def __init__(self, num_classes: int = 400):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSamePadding((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSamePadding((1, 3, 3), (1, 2, 2))
        self.Mixed_3b, self.Mixed_3c = (InceptionModule(*self._MIXED[k]) for k in ("Mixed_3b", "Mixed_3c"))
        self.MaxPool3d_4a_3x3 = MaxPool3dSamePadding((3, 3, 3), (2, 2, 2))
        for k in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            setattr(self, k, InceptionModule(*self._MIXED[k]))
        self.MaxPool3d_5a_2x2 = MaxPool3dSamePadding((2, 2, 2), (2, 2, 2))
        self.Mixed_5b, self.Mixed_5c = (InceptionModule(*self._MIXED[k]) for k in ("Mixed_5b", "Mixed_5c"))
        self.logits = Unit3D(1024, num_classes, relu=False, bn=False, bias=True)
        self._stages = [
            "Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3",
            "Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e",
            "Mixed_4f", "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c",
        ]  # fmt: skip

    def forward(self, x_BCTHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x_BCTHW
        for name in self._stages:
            x = getattr(self, name)(x)
        pool_B = x.mean(dim=(2, 3, 4))
        # The reference's AvgPool3d([2, 7, 7], stride 1) at 224 px; clamped so small test inputs run.
        k = (min(2, x.shape[2]), min(7, x.shape[3]), min(7, x.shape[4]))
        logits_BKT = self.logits(F.avg_pool3d(x, k, stride=1)).mean(dim=(3, 4))
        return logits_BKT.mean(dim=2), pool_B


class I3DFeatures(nn.Module):
    """FVD feature network: uint8 clips ``[B, T, H, W, 3]`` → I3D features ``[B, 400]`` (or ``[B, 1024]``)."""

    def __init__(
        self, net: InceptionI3d, feature: Literal["logits", "pool"] = "logits", size: int | None = 224
    ):
        super().__init__()
        if feature not in ("logits", "pool"):
            raise ValueError(f"feature must be 'logits' or 'pool', got {feature!r}")
        self.net, self.feature, self.size = net.eval(), feature, size
        self.num_features = net.logits.conv3d.out_channels if feature == "logits" else 1024
        self.name = f"i3d-{feature}"
        self.eval()

    @classmethod
    def from_path(
        cls,
        path_or_uri: str | os.PathLike | None,
        feature: Literal["logits", "pool"] = "logits",
        size: int | None = 224,
    ) -> I3DFeatures:
        """Load the Kinetics-400 I3D from a local path or bucket URI; a missing file raises, naming it."""
        sd = load_state_dict(path_or_uri, "FVD (I3D features)", I3D_WEIGHTS_FILE, I3D_HOW_TO_GET)
        net = InceptionI3d(
            num_classes=sd["logits.conv3d.weight"].shape[0] if "logits.conv3d.weight" in sd else 400
        )
        net.load_state_dict(sd, strict=True)
        return cls(net, feature=feature, size=size)

    def train(self, mode: bool = True) -> I3DFeatures:
        return super().train(False)  # a metric network must never update its BatchNorm statistics

    @torch.no_grad()
    def forward(self, clips_BTHWC: torch.Tensor) -> torch.Tensor:
        x = to_float_BCTHW(clips_BTHWC, -1.0, 1.0)
        if self.size is not None and x.shape[-2:] != (self.size, self.size):
            B, C, T, H, W = x.shape
            frames = x.transpose(1, 2).reshape(B * T, C, H, W)
            frames = F.interpolate(frames, size=(self.size, self.size), mode="bilinear", align_corners=False)
            x = frames.reshape(B, T, C, self.size, self.size).transpose(1, 2)
        logits_BK, pool_BD = self.net(x)
        return logits_BK if self.feature == "logits" else pool_BD
