"""Inception-V3 frame features for FID, loaded from a TorchScript file — never downloaded.

The reference FID network is the TF Inception-V3 graph of 2015-12-05 (Heusel et al. 2017). Its
PyTorch form used by StyleGAN2-ADA/StyleGAN3 is a TorchScript archive, ``inception-2015-12-05.pt``,
called as ``detector(frames_uint8_NCHW, return_features=True) → [N, 2048]`` (it resizes to 299 and
normalises internally). This module does not re-implement the architecture: it wraps that archive
(or any TorchScript module with the same call) and raises a clear error when the file is absent.
"""

from __future__ import annotations

import io
import os

import torch
from torch import nn

from w2svd.metrics.weights import read_bytes, require_weights

INCEPTION_WEIGHTS_FILE = "inception-2015-12-05.pt"
INCEPTION_HOW_TO_GET = (
    "Use the TorchScript Inception-V3 FID detector of NVlabs' StyleGAN2-ADA/StyleGAN3 metrics "
    "('inception-2015-12-05.pt', ~100 MB), copied on a machine with internet access."
)


class InceptionFeatures(nn.Module):
    """FID feature network: uint8 frames ``[N, H, W, 3]`` → pool3 features ``[N, 2048]``."""

    def __init__(self, detector: nn.Module, num_features: int = 2048):
        super().__init__()
        self.detector, self.num_features, self.name = detector, num_features, "inception-v3"

    @classmethod
    def from_path(cls, path_or_uri: str | os.PathLike | None) -> InceptionFeatures:
        path = require_weights(
            path_or_uri, "FID (Inception-V3 features)", INCEPTION_WEIGHTS_FILE, INCEPTION_HOW_TO_GET
        )
        detector = torch.jit.load(io.BytesIO(read_bytes(path)), map_location="cpu").eval()
        probe = detector(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), return_features=True)
        return cls(detector, num_features=int(probe.shape[-1]))

    @torch.no_grad()
    def forward(self, frames_NHWC: torch.Tensor) -> torch.Tensor:
        return self.detector(frames_NHWC.permute(0, 3, 1, 2).contiguous(), return_features=True).float()
