"""The training side of the latent shards: an endless, deterministic stream of batches per rank.

Every rank iterates the same ordered stream and keeps batches ``rank, rank + world, …``; the
order is then a function of the step alone, and ``position`` (batches this rank has consumed)
is all a checkpoint needs to resume it, in at most two passes over the data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from w2svd.models.base import Cond


@dataclass
class Batch:
    x: torch.Tensor  # [B, C, T, H, W]
    cond: Cond
    bucket: str


class LatentStream:
    """Batches of one bucket each from a Ray Train dataset shard, endlessly, for one rank."""

    def __init__(self, shard, batch_size: int, rank: int, world: int, device, position: int = 0):
        self.shard, self.batch_size, self.rank, self.world = shard, batch_size, rank, world
        self.device = device
        self.position = position  # batches of this rank consumed (a checkpoint's data position)
        # The first batch read (fixed validation prompts when the checkpoint has none for this rank).
        self.first: Batch | None = None
        self._it = self._batches(first=position * world + rank)

    def _batches(self, first: int):
        """This rank's batches, from global batch ``first`` on. Every pass over the shard yields
        the same batches in the same order, so whole passes before ``first`` are counted, not
        read: a resume reads at most two passes, not every batch the run ever consumed."""
        from pipelines.reader import iter_latent_batches

        index, period = 0, None  # global batches so far; batches per pass, known after one pass
        while True:
            if period is not None and first - index >= period:
                index += (first - index) // period * period
            produced = 0
            for batch in iter_latent_batches(self.shard, self.batch_size, drop_last=True):
                produced += 1
                index += 1
                if index - 1 >= first and (index - 1) % self.world == self.rank:
                    yield batch
            if produced == 0:
                raise ValueError(f"the data holds fewer than optim.batch_size = {self.batch_size} clips in "
                                 "every bucket; lower optim.batch_size or encode more clips")
            period = produced

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        b = next(self._it)
        self.position += 1
        cond = Cond(text=b.text.float(), text_mask=b.text_mask.float(), pooled=b.pooled.float(),
                    image=None if b.image is None else b.image.float())
        batch = Batch(b.latents.float().to(self.device), cond.to(self.device), b.bucket)
        if self.first is None:  # the first batch this process read, also after a resume
            self.first = batch
        return batch
