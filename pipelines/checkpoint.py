"""Checkpoint files of a training run: what every rank writes into, and reads from, one folder.

    CKPT/<role>/…                 DeepSpeed state of each trained role (trained parameters and
                                  optimizer state; the frozen base is rebuilt from the teacher)
    CKPT/state.json               step, data position, health, in_band, world size and the
                                  fingerprint of every trained parameter (rank 0)
    CKPT/config.yaml              the resolved config (rank 0)
    CKPT/rng_rank<r>.pt           the RNG states of rank r
    CKPT/samples_rank<r>.pt       rank r's fixed validation batch
    CKPT/ema_rank<r>.pt           rank r's share of the generator EMA (when on)
    CKPT/<name>.pt                extra modules, e.g. LCM's target network (rank 0)

Every rank writes into its own temporary folder and Ray Train merges them into
``RUN_DIR/train/checkpoint_step<NNNNNNNN>``. A checkpoint is written whenever one is due and
says whether the run was in band then; a rollback resumes from the newest one that was.
Ray Train keeps the newest checkpoint and three more ranked by ``keep_rank``: the newest while
the drift signal improves, and always the one with its lowest value (what a drift stop exports).
Restore is strict: the fingerprint (sum and sum of squares) of every trained parameter after
loading must match the one recorded at save, so a key DeepSpeed skipped cannot pass silently.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipelines.engines import Trained, param_stats
from w2svd.data import storage

STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
DIR_PREFIX = "checkpoint_step"


def dir_name(step: int) -> str:
    return f"{DIR_PREFIX}{step:08d}"


class NonFiniteParameters(RuntimeError):
    """A trained parameter holds NaN/inf although the health check passed: never checkpointed."""


def check_finite(trained: list[Trained], step: int) -> None:
    """Raise unless every element of every trained parameter is finite (partition-aware)."""
    for t in trained:
        bad = param_stats(t.params)[:, 2]
        if bad.sum() > 0:
            idx = torch.nonzero(bad).flatten().tolist()
            raise NonFiniteParameters(f"refusing to checkpoint step {step}: {t.name} has non-finite values in "
                                      f"parameters {idx[:5]} although the health check passed")


def fingerprints(trained: list[Trained]) -> dict[str, list[list[float]]]:
    """Per role, ``[sum, sum of squares]`` of every trained parameter (the same on every rank)."""
    return {t.name: param_stats(t.params)[:, :2].tolist() for t in trained}


def check_restored(trained: list[Trained], expected: dict[str, list[list[float]]], where: str) -> None:
    """Every trained parameter holds what was saved (to float rounding), or a one-line error."""
    for t in trained:
        if t.name not in expected:
            raise RuntimeError(f"{where} holds no state for the trained role {t.name!r}")
        got = torch.tensor(fingerprints([t])[t.name], dtype=torch.float64)
        want = torch.tensor(expected[t.name], dtype=torch.float64)
        if got.shape != want.shape:
            raise RuntimeError(f"{where}: role {t.name!r} has {len(got)} trained parameters, the checkpoint "
                               f"{len(want)}")
        off = ~torch.isclose(got, want, rtol=1e-5, atol=1e-6).all(dim=1)
        if off.any():
            raise RuntimeError(f"{where}: role {t.name!r} parameters {torch.nonzero(off).flatten().tolist()[:5]} "
                               "were not restored (DeepSpeed skipped their keys)")


def rng_states(rng: torch.Generator, device: torch.device) -> dict:
    out = {"step": rng.get_state(), "torch": torch.get_rng_state(), "numpy": np.random.get_state(),
           "python": random.getstate()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_states(rng: torch.Generator, device: torch.device, states: dict) -> None:
    rng.set_state(states["step"])
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


@dataclass
class Saved:
    """What a restore hands back to the worker besides the engines it loaded."""

    state: dict
    samples: dict | None
    # This rank's EMA share, or every rank's (in rank order) when the world size changed.
    ema: dict | list[dict] | None


def write(folder: Path, trained: list[Trained], rank: int, state: dict, rng: dict, samples: dict,
          extra: dict[str, nn.Module], ema: dict | None, config_yaml: str) -> None:
    """This rank's files of one checkpoint (``state`` must already hold what rank 0 records)."""
    for t in trained:
        t.engine.save_checkpoint(str(folder), tag=t.name, save_latest=False, exclude_frozen_parameters=True)
    torch.save(rng, folder / f"rng_rank{rank}.pt")
    torch.save(samples, folder / f"samples_rank{rank}.pt")
    if ema is not None:
        torch.save(ema, folder / f"ema_rank{rank}.pt")
    if rank == 0:
        for name, module in extra.items():
            torch.save(module.state_dict(), folder / f"{name}.pt")
        (folder / STATE_FILE).write_text(json.dumps(state))
        (folder / CONFIG_FILE).write_text(config_yaml)


def to_universal(folder: Path, tag: str, out: Path) -> None:
    """DeepSpeed's universal form of one role's checkpoint (``out/<tag>``): parameter by parameter
    instead of partition by rank, which is what lets a run resume on another number of workers."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(folder / tag), output_folder=str(out / tag), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    with contextlib.redirect_stdout(io.StringIO()):  # progress bars of a conversion nobody watches
        ds_to_universal.main(args)


def read(folder: Path, trained: list[Trained], rank: int, rng: torch.Generator, device: torch.device,
         extra: dict[str, nn.Module], world: int) -> Saved:
    """Load every engine (strictly checked), the extra modules and this rank's RNG; returns the
    recorded state and this rank's samples and EMA share (None when absent).

    A checkpoint written by another number of workers is converted to DeepSpeed's universal form
    first (each rank into its own temporary folder; the engines must have been built with
    ``load_universal``), and its data position is rescaled to the new world."""
    state = json.loads((folder / STATE_FILE).read_text())
    reshaped = state.get("world_size", world) != world
    with tempfile.TemporaryDirectory(prefix=f"w2svd-universal-{rank}-") as tmp:
        for t in trained:
            if reshaped:
                to_universal(folder, t.name, Path(tmp))
                t.engine.load_checkpoint(tmp, tag=t.name, load_module_strict=False)
            else:
                t.engine.load_checkpoint(str(folder), tag=t.name, load_module_strict=False)
    check_restored(trained, state["fingerprints"], f"checkpoint at step {state['step']}")
    if reshaped:  # the same number of batches seen in all, spread over the new ranks
        state["data_position"] = state["data_position"] * state["world_size"] // world
    for name, module in extra.items():
        module.load_state_dict(torch.load(folder / f"{name}.pt", map_location=device))
    rng_file = folder / f"rng_rank{rank}.pt"
    if rng_file.is_file():  # absent when the world grew: new ranks keep their fresh seeds
        set_rng_states(rng, device, torch.load(rng_file, weights_only=False))

    def optional(name: str):
        path = folder / name
        return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None

    ema = optional(f"ema_rank{rank}.pt")
    if reshaped and ema is not None:
        ema = [optional(f"ema_rank{r}.pt") for r in range(state["world_size"])]
    return Saved(state, optional(f"samples_rank{rank}.pt"), ema)


def written(checkpoints_uri: str, options: storage.StorageOptions | None) -> dict[int, str]:
    """step → URI of every checkpoint under ``checkpoints_uri`` (Ray Train's experiment folder)."""
    steps: dict[int, str] = {}
    for entry in storage.list_files(checkpoints_uri, options):
        rel = storage.relative(entry.uri, checkpoints_uri)
        folder, _, name = rel.partition("/")
        if name == STATE_FILE and folder.startswith(DIR_PREFIX):
            steps[int(folder[len(DIR_PREFIX):])] = storage.join(checkpoints_uri, folder)
    return steps


def newest_in_band(checkpoints_uri: str, options: storage.StorageOptions | None,
                   before: int | None = None) -> str | None:
    """The URI of the newest checkpoint written while the run was in band, at a step below
    ``before`` if given; None if none is."""
    steps = written(checkpoints_uri, options)
    for step in sorted(steps, reverse=True):
        if before is not None and step >= before:
            continue
        state = storage.read_json(storage.join(steps[step], STATE_FILE), options) or {}
        if state.get("in_band", True):
            return steps[step]
    return None


def drift_signals(checkpoints_uri: str, options: storage.StorageOptions | None) -> dict[int, tuple[float, str]]:
    """step → (drift signal, URI) of every written checkpoint that recorded a finite signal."""
    out = {}
    for step, uri in written(checkpoints_uri, options).items():
        signal = (storage.read_json(storage.join(uri, STATE_FILE), options) or {}).get("drift_signal")
        if signal is not None and math.isfinite(signal):
            out[step] = (float(signal), uri)
    return out


def best_by_drift(checkpoints_uri: str, options: storage.StorageOptions | None) -> str | None:
    """The URI of the kept checkpoint with the lowest drift signal (the drift guard's "keep the
    best" when it stops a run); None when no checkpoint recorded one."""
    signals = drift_signals(checkpoints_uri, options)
    return min(signals.values())[1] if signals else None


# Ray Train keeps the newest checkpoint and the ``KEEP`` ranked highest by ``KEEP_RANK``
# (``CheckpointConfig`` in pipelines/training.py).
KEEP = 3
KEEP_RANK = "checkpoint_keep_rank"
BEST_TIER = 1e12  # above any step


def keep_rank(step: int, drift_signal: float, earlier_best: float | None) -> float:
    """How Ray Train ranks a checkpoint for keeping (higher is kept): ``step``, plus ``BEST_TIER``
    when its drift signal is finite and below ``earlier_best``, the lowest signal of the checkpoints
    written before it (None: none recorded one).

    So the newest checkpoints are kept while the signal improves, and the one with the lowest
    signal, the state a drift stop exports, is always kept: ranked by age alone, it would be
    deleted three checkpoints after the signal's best, which can come before the guard fires
    (warm-up and patience are counted in checks, not checkpoints). Without a signal (the
    fine-tune, a guard turned off) the rank is the step: the newest."""
    lowered = math.isfinite(drift_signal) and (earlier_best is None or drift_signal < earlier_best)
    return float(step) + (BEST_TIER if lowered else 0.0)


def rank_for_keeping(checkpoints_uri: str, options: storage.StorageOptions | None, step: int,
                     drift_signal: float) -> float:
    """``keep_rank`` of a checkpoint about to be written at ``step``, against the written ones
    before it (a deleted checkpoint never held the lowest signal, so the written ones suffice)."""
    earlier = [signal for s, (signal, _) in drift_signals(checkpoints_uri, options).items() if s < step]
    return keep_rank(step, drift_signal, min(earlier) if earlier else None)
