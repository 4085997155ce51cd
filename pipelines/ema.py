"""An exponential moving average of a role's trained parameters: the generator's in
distillation (``method.generator_ema``), the teacher's in a fine-tune (``optim.finetune_ema``).

    θ_ema ← d·θ_ema + (1 − d)·θ        after every update of those parameters

Kept in fp32 over the values this rank holds (``engines.local_values``: a ZeRO-3 partition, or
the whole parameter), so it costs one copy of this rank's share and needs no collective. For
the validation samples and the export the EMA values are swapped into the parameters for the
span of a block (``applied``), where ZeRO-3's gather then assembles whole EMA weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from pipelines.collectives import world
from pipelines.engines import local_values


class WeightEMA:
    def __init__(self, params: list[nn.Parameter], decay: float):
        assert 0.0 < decay < 1.0, decay
        self.params, self.decay = list(params), decay
        self.shadow = [local_values(p).float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for shadow, p in zip(self.shadow, self.params, strict=True):
            shadow.lerp_(local_values(p).float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The parameters hold the EMA values inside the block and their own values after it."""
        saved = []
        with torch.no_grad():
            for shadow, p in zip(self.shadow, self.params, strict=True):
                values = local_values(p)
                saved.append(values.clone())
                values.copy_(shadow.to(values.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for kept, p in zip(saved, self.params, strict=True):
                    local_values(p).copy_(kept)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.clone() for s in self.shadow]}

    def load_shares(self, shares: list[dict]) -> None:
        """The EMA from every rank's ``state_dict`` (in rank order) of a run with another number
        of workers: a ZeRO-3 share is a slice of the flattened parameter, so the shares joined
        in rank order are the whole parameter, re-sliced here for this rank's partition."""
        rank = world()[0]
        for i, p in enumerate(self.params):
            part = getattr(p, "ds_tensor", None)
            if part is None:  # whole on every rank
                self.shadow[i] = shares[0]["shadow"][i].float().clone()
                continue
            flat = torch.cat([s["shadow"][i].reshape(-1) for s in shares])
            start = rank * part.numel()
            self.shadow[i] = flat[start:start + self.shadow[i].numel()].float().clone()

    def load_state_dict(self, state: dict) -> None:
        shapes = [tuple(s.shape) for s in self.shadow]
        loaded = [tuple(s.shape) for s in state["shadow"]]
        if shapes != loaded:
            raise ValueError("the checkpoint's generator EMA was kept over other parameter partitions "
                             "(another number of workers under ZeRO-3, or another generator)")
        self.shadow = [s.float().clone() for s in state["shadow"]]
