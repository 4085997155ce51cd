"""What every backbone looks like to the method: a velocity predictor with feature access.

A backbone is an ``nn.Module`` whose ``forward(x, sigma_B, cond, guidance_B=None)`` returns the
flow-matching velocity (``v ≈ eps − x0``) with the shape of ``x``, and whose
``feature_module`` is the submodule after which the discriminator head reads token features
(HunyuanVideo: the last dual-stream block). ``capture_features`` records that output during a
normal forward, so no backbone's forward is copied to reach it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Cond:
    """Conditions of a batch. ``text`` is required; the rest depend on the backbone.

    text       ``[B, L, D]`` text-encoder hidden states (toy: ``[B, D]`` class embedding input)
    text_mask  ``[B, L]`` attention mask of ``text``
    pooled     ``[B, P]`` pooled text embedding (CLIP for HunyuanVideo)
    image      ``[B, C, 1, h, w]`` reference-frame latent for image-to-video
    """

    text: torch.Tensor
    text_mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    image: torch.Tensor | None = None

    def map(self, fn) -> Cond:
        return Cond(**{f.name: (None if (v := getattr(self, f.name)) is None else fn(v))
                       for f in dataclasses.fields(self)})

    def to(self, *args, **kwargs) -> Cond:
        return self.map(lambda t: t.to(*args, **kwargs))

    def index(self, idx) -> Cond:
        return self.map(lambda t: t[idx])

    @property
    def batch_size(self) -> int:
        return self.text.shape[0]

    def null(self) -> Cond:
        """The unconditional input of classifier-free guidance: empty text, same image."""
        return Cond(
            text=torch.zeros_like(self.text),
            text_mask=None if self.text_mask is None else torch.ones_like(self.text_mask),
            pooled=None if self.pooled is None else torch.zeros_like(self.pooled),
            image=self.image,
        )

    def drop(self, drop_B: torch.Tensor) -> Cond:
        """Replace the samples where ``drop_B`` is true by the unconditional input."""
        null = self.null()

        def pick(kept, dropped):
            if kept is None or kept is dropped:
                return kept
            return torch.where(drop_B.reshape(-1, *([1] * (kept.dim() - 1))).to(kept.device), dropped, kept)

        return Cond(**{f.name: pick(getattr(self, f.name), getattr(null, f.name)) for f in dataclasses.fields(self)})

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        out = {}
        for f in dataclasses.fields(Cond):
            values = [getattr(c, f.name) for c in conds]
            out[f.name] = None if values[0] is None else torch.cat(values)
        return Cond(**out)


class Denoiser(nn.Module):
    """Base class of the backbones. Subclasses set ``feature_module`` and ``feature_dim``."""

    feature_module: nn.Module
    feature_dim: int
    # True when guidance enters as an embedding (HunyuanVideo T2V), False for CFG models.
    guidance_embedded: bool = False

    def forward(self, x: torch.Tensor, sigma_B: torch.Tensor, cond: Cond,
                guidance_B: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def _first_tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def capture_features(backbone: Denoiser):
    """Record the output of ``backbone.feature_module`` for every forward inside the block.

    Yields a list that receives one ``[B, N, D]`` (or ``[B, D]``) tensor per forward; the tensor
    keeps its autograd graph, so a loss on it backpropagates into the backbone.
    """
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(_first_tensor(output))

    handle = backbone.feature_module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def count_parameter_bytes(*modules: nn.Module) -> int:
    """Bytes of distinct parameter storages across modules (a shared tensor counts once).

    A parameter that ZeRO-3 partitioned is an empty tensor whose values live in its shard,
    ``p.ds_tensor``: the shard is what this process holds, so that is what counts."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for p in module.parameters():
            for t in (p, getattr(p, "ds_tensor", None)):
                if t is None:
                    continue
                storage = t.untyped_storage()
                if storage.nbytes() and storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total
