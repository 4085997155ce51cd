"""A teacher's face rate on captions it never trained on, beside the clips those captions describe.

The evaluation job's report set has 16 prompts, and a face rate over 16 prompts spreads by about
±0.1 (docs/benchmarks.md, "The face criterion on 64 prompts"): too coarse to judge "within 0.1 of the real
clips'". Here the evaluation set is grown to ``4 × n`` items and the first ``n`` whose caption no
training clip has are sampled from the evaluation job's noise (item ``i``: seed ``eval.seed + i``),
so the first of them are the report set's own samples. The gap real − samples comes with its
standard error over the prompts (``face_rates``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np


def split_captions(train_captions: list[str], candidates: list[str], n: int) -> tuple[list[int], list[int]]:
    """``n`` evenly spaced indices into ``train_captions`` and the first ``n`` indices into
    ``candidates`` whose caption no training clip has (fewer where too few are new)."""
    if n < 1:
        raise ValueError(f"the number of prompts must be at least 1, got {n}")
    seen = list(range(0, len(train_captions), max(1, len(train_captions) // n)))[:n]
    known = set(train_captions)
    held_out = [i for i, c in enumerate(candidates) if c not in known][:n]
    return seen, held_out


def face_rates(samples_BTHWC, real_BTHWC) -> dict:
    """Face rates of samples and real clips (overall and per prompt) and the gap real − samples
    with its standard error: every clip has the same frames, so a rate is the mean of the
    per-prompt ones and the gap's error comes from the paired per-prompt differences."""
    from w2svd.metrics.portrait import face_detection_rate

    ours = np.array([face_detection_rate(np.asarray(c)[None]) for c in samples_BTHWC])
    real = np.array([face_detection_rate(np.asarray(c)[None]) for c in real_BTHWC])
    gap = real - ours
    return {"prompts": len(ours), "face_rate": float(ours.mean()), "face_rate_real": float(real.mean()),
            "gap": float(gap.mean()), "gap_se": float(gap.std(ddof=1) / np.sqrt(len(gap))) if len(gap) > 1 else None,
            "face_rate_per_prompt": ours.round(3).tolist(), "face_rate_real_per_prompt": real.round(3).tolist()}


def sample_like(bundle, prompts: list[str], seeds: list[int], real_BTHWC, batch: int) -> np.ndarray:
    """uint8 samples ``[B, T, H, W, 3]`` at the real clips' size (their first frames as references
    for an image-to-video bundle)."""
    samples = []
    size = tuple(real_BTHWC.shape[1:4])
    for lo in range(0, len(prompts), batch):
        chunk = slice(lo, lo + batch)
        images = [np.asarray(c[0]) for c in real_BTHWC[chunk]] if bundle.image_to_video else None
        samples.append(bundle.generate(prompts[chunk], seeds[chunk], *size, images=images).numpy())
    return np.concatenate(samples)


def training_captions(latents_dir: Path) -> list[str]:
    """The caption of every clip in a pre-encode output folder (its ``shards/*.parquet``)."""
    import pyarrow.parquet as pq

    files = sorted((Path(latents_dir) / "shards").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no pre-encoded shards under {Path(latents_dir) / 'shards'}")
    return [c for f in files for c in pq.read_table(f, columns=["caption"]).column(0).to_pylist()]


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """The held-out side: sampled clips, the real clips their captions describe, and their factors."""

    rates: dict
    samples_BTHWC: np.ndarray
    real_BTHWC: np.ndarray
    factors: list[dict]


def held_out_face_rates(bundle, train_captions: list[str], n: int, batch: int = 8, log=print) -> HeldOut:
    """``face_rates`` of ``bundle`` on the first ``n`` evaluation items (of ``bundle.cfg.eval``
    grown to ``4 × n``) whose caption no training clip has, against the clips they describe."""
    from w2svd.evalset import build_evalset, reference_clips, reference_factors

    evalset = build_evalset(dataclasses.replace(bundle.cfg.eval, num_prompts=4 * n))
    _, held_out = split_captions(train_captions, evalset.prompts, n)
    if len(held_out) < n:
        log(f"[held-out] only {len(held_out)} new captions among {len(evalset)} evaluation items")
    real = reference_clips(evalset)[held_out].numpy()
    samples = sample_like(bundle, [evalset.prompts[i] for i in held_out], [evalset.items[i].seed for i in held_out],
                          real, batch)
    factors = reference_factors(evalset)
    return HeldOut({**face_rates(samples, real), "evalset_index": held_out}, samples, real,
                   [factors[i] for i in held_out])
