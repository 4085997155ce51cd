"""Fréchet distances (FID on frames, FVD on clips) over a pluggable feature network.

``d² = ‖μ_r − μ_f‖² + Tr(Σ_r + Σ_f − 2 (Σ_r Σ_f)^½)`` between Gaussians fitted to the features of the
real and the generated set. The statistics are torchmetrics' ``FrechetInceptionDistance`` states
(feature sums, feature outer-product sums and counts, float64): they are sums, so partial states from
several workers merge exactly (:meth:`FrechetDistance.merge`), and under ``torch.distributed`` the
metric syncs itself in ``compute``.

Feature networks are plain ``nn.Module`` s with an int ``num_features``:

* clip networks (``unit="clip"``, FVD): uint8 clips ``[B, T, H, W, 3]`` → ``[B, D]`` —
  :class:`w2svd.metrics.i3d.I3DFeatures` (Kinetics-400 I3D, the original FVD) or
  :class:`w2svd.metrics.domain.DomainVideoEncoder` (the offline "domain FVD");
* frame networks (``unit="frame"``, FID): uint8 frames ``[N, H, W, 3]`` → ``[N, D]`` —
  :class:`w2svd.metrics.inception.InceptionFeatures`.

Which network produced a number changes its meaning entirely, so :meth:`FrechetDistance.compute`
results should be reported under the network's ``name`` (e.g. ``fvd/i3d-k400``, ``fvd/domain``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from w2svd.metrics.clips import as_clips_BTHWC

Unit = Literal["clip", "frame"]


class FrechetDistance:
    """Streaming Fréchet distance between a real and a generated set under ``feature_net``.

    ``update(clips_BTHWC, real=…)`` any number of times (on any number of workers), ``merge`` the
    workers' :meth:`state` s into one, then ``compute()``. With ``unit="frame"`` every frame of every
    clip is one sample (FID over frames); with ``unit="clip"`` every clip is one sample (FVD).
    """

    def __init__(self, feature_net: nn.Module, unit: Unit = "clip", batch_size: int = 16):
        if unit not in ("clip", "frame"):
            raise ValueError(f"unit must be 'clip' or 'frame', got {unit!r}")
        if not isinstance(getattr(feature_net, "num_features", None), int):
            raise TypeError("feature_net needs an int attribute `num_features` (its output width)")
        self.unit = unit
        self.batch_size = batch_size
        self.feature_net = feature_net.eval()
        self.metric = FrechetInceptionDistance(feature=self.feature_net, reset_real_features=True)
        # torchmetrics learns the output dtype in update(); a metric that only received merged
        # states would otherwise fail in compute().
        self.metric.orig_dtype = torch.float32

    @property
    def name(self) -> str:
        prefix = "fid" if self.unit == "frame" else "fvd"
        return f"{prefix}/{getattr(self.feature_net, 'name', type(self.feature_net).__name__)}"

    @torch.no_grad()
    def update(self, clips_BTHWC, real: bool) -> None:
        """Add clips (or, for ``unit="clip"``, anything the feature net accepts) to one side."""
        x = clips_BTHWC
        if self.unit == "frame":
            x = as_clips_BTHWC(x).flatten(0, 1)  # [B·T, H, W, 3]: every frame is a sample
        for chunk in torch.as_tensor(x).split(self.batch_size):
            self.metric.update(chunk, real=real)

    def compute(self) -> float:
        """The distance ``d²`` (≥ 0 up to round-off); needs at least 2 samples per side."""
        return float(self.metric.compute())

    def state(self) -> dict[str, torch.Tensor]:
        """This worker's sufficient statistics (sums and counts), e.g. to ship to a reducer."""
        return {k: v.detach().clone() for k, v in self.metric.metric_state.items()}

    def merge(self, other: FrechetDistance | dict[str, torch.Tensor]) -> None:
        """Add another worker's statistics: equal to having seen its samples here."""
        self.metric.merge_state(other.state() if isinstance(other, FrechetDistance) else other)
        # Merged statistics count as an update, so torchmetrics does not warn "compute before update".
        self.metric._update_count += 1

    def reset(self) -> None:
        self.metric.reset()


def frechet_distance(real, fake, feature_net: nn.Module, unit: Unit = "clip", batch_size: int = 16) -> float:
    """One-shot ``d²`` between two clip sets (``[B, T, H, W, 3]`` each) under ``feature_net``."""
    fd = FrechetDistance(feature_net, unit=unit, batch_size=batch_size)
    fd.update(real, real=True)
    fd.update(fake, real=False)
    return fd.compute()


def fvd(real_clips_BTHWC, fake_clips_BTHWC, clip_net: nn.Module, batch_size: int = 16) -> float:
    """Fréchet Video Distance: one sample per clip, features from a clip network (I3D or domain)."""
    return frechet_distance(real_clips_BTHWC, fake_clips_BTHWC, clip_net, "clip", batch_size)


def fid(real_clips_BTHWC, fake_clips_BTHWC, frame_net: nn.Module, batch_size: int = 64) -> float:
    """Fréchet Inception Distance over frames: every frame of every clip is one sample."""
    return frechet_distance(real_clips_BTHWC, fake_clips_BTHWC, frame_net, "frame", batch_size)
