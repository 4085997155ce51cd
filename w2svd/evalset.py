"""The fixed evaluation set: prompts, noise seeds, sizes and reference clips, all from the config.

    evalset = build_evalset(cfg.eval)
    evalset.fingerprint()                 # numbers are comparable only under the same fingerprint
    ref_BTHWC = reference_clips(evalset)  # uint8 synthetic portraits, the "real" side of domain FVD
    noise = item_noise(item, latent_shape)

Item ``i`` is a synthetic portrait (:mod:`w2svd.data.synth`) drawn from ``rng([factor_seed, i])``
at the evaluation size: its caption is the prompt and its rendering the reference clip, so the
reference set needs no files and is identical on every machine. The generator's starting noise
for item ``i`` comes from ``torch.Generator().manual_seed(seed + i)``: every model sees the same
noise for the same prompt, which is what makes a challenger/champion comparison fair.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
import torch

from w2svd import rng
from w2svd.config import EvalConfig

# Bump when the way items or references are made changes, so old fingerprints stop matching.
EVALSET_VERSION = 1


@dataclass(frozen=True)
class EvalItem:
    index: int
    prompt: str
    seed: int
    num_frames: int
    height: int
    width: int
    fps: float


@dataclass(frozen=True)
class EvalSet:
    items: tuple[EvalItem, ...]
    factor_seed: int
    # Identifies the domain encoder whose features define "fvd/domain" (a content hash).
    domain_encoder_id: str = ""

    def __len__(self) -> int:
        return len(self.items)

    @property
    def prompts(self) -> list[str]:
        return [it.prompt for it in self.items]

    def fingerprint(self) -> str:
        """A short hash of everything that decides the numbers: items, references, feature net."""
        payload = {"version": EVALSET_VERSION, "factor_seed": self.factor_seed,
                   "domain_encoder": self.domain_encoder_id, "items": [asdict(it) for it in self.items]}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def with_domain_encoder(self, encoder_id: str) -> EvalSet:
        return EvalSet(self.items, self.factor_seed, encoder_id)


def _factors(factor_seed: int, index: int, num_frames: int, height: int, width: int, fps: float) -> dict:
    from w2svd.data.synth import sample_factors

    # Width/height order follows the renderer's size tuples.
    return sample_factors(np.random.default_rng([factor_seed, index]), portrait_sizes=((width, height),),
                          landscape_sizes=((width, height),), lengths=(num_frames,), fps_choices=(fps,),
                          orientation="portrait" if height >= width else "landscape")


def build_evalset(cfg: EvalConfig) -> EvalSet:
    from w2svd.data.synth import caption_for

    items = []
    for i in range(cfg.num_prompts):
        factors = _factors(cfg.factor_seed, i, cfg.num_frames, cfg.height, cfg.width, cfg.fps)
        items.append(EvalItem(index=i, prompt=caption_for(factors), seed=cfg.seed + i, num_frames=cfg.num_frames,
                              height=cfg.height, width=cfg.width, fps=cfg.fps))
    return EvalSet(tuple(items), cfg.factor_seed)


def reference_factors(evalset: EvalSet) -> list[dict]:
    return [_factors(evalset.factor_seed, it.index, it.num_frames, it.height, it.width, it.fps)
            for it in evalset.items]


def reference_clips(evalset: EvalSet) -> torch.Tensor:
    """uint8 ``[B, T, H, W, 3]``: the synthetic portrait each prompt describes."""
    from w2svd.data.synth import render_clip

    return torch.from_numpy(np.stack([render_clip(f) for f in reference_factors(evalset)]))


def domain_training_clips(cfg: EvalConfig) -> tuple[torch.Tensor, list[dict]]:
    """Clips for training the domain encoder: same sizes as the set, disjoint factor seeds
    (``factor_seed + 1``), so the encoder never saw the references it later embeds."""
    from w2svd.data.synth import render_clip

    factors = [_factors(cfg.factor_seed + 1, i, cfg.num_frames, cfg.height, cfg.width, cfg.fps)
               for i in range(cfg.domain_train_clips)]
    return torch.from_numpy(np.stack([render_clip(f) for f in factors])), factors


def item_noise(item: EvalItem, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """The starting noise ``latent_shape`` (``[C, T', h, w]``) of one item, from its seed alone."""
    return rng.randn(latent_shape, torch.Generator().manual_seed(item.seed))
