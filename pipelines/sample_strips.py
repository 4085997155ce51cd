"""Sample strips: PNGs of real clips of the evaluation set above models' clips for the same
prompts and noise (``w2svd evaluate --strip``, the world build's check, the benchmarks' strips).
Generated in this process: these are for looking at, the evaluation job makes the numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.evaluate import load_source, teacher_source
from w2svd.config import Config
from w2svd.evalset import build_evalset, reference_clips


def sample_clips(sources: dict[str, dict], cfg: Config, count: int = 4) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The first ``count`` real clips of the evaluation set and each source's clips for the same
    prompts and noise (in this process: for pictures, not for numbers). A label may name the
    loaded sampler's ``{steps}`` and ``{method}``."""
    evalset = build_evalset(cfg.eval)
    items = evalset.items[:count]
    real = reference_clips(evalset).numpy()[:count]
    clips = {}
    for label, source in sources.items():
        bundle = load_source(source, device="cpu")
        label = label.format(steps=bundle.settings.steps, method=bundle.settings.method)
        images = list(real[:, 0]) if bundle.image_to_video else None
        clips[label] = bundle.generate([it.prompt for it in items], [it.seed for it in items], items[0].num_frames,
                                       items[0].height, items[0].width, images=images).numpy()
    return real, clips


def strip_sources(source: dict, cfg: Config, config: str, overrides: list[str]) -> dict[str, dict]:
    """The rows of a sample strip for ``source``: the config's teacher at ``method.teacher_steps``
    first (the reference a distilled model is read against), then ``source`` itself."""
    rows = {}
    if cfg.model.teacher and source["kind"] != "teacher":
        rows["teacher\nEuler {steps} steps"] = teacher_source(config, cfg.method.teacher_steps, config, overrides)
    rows["teacher\nEuler {steps} steps" if source["kind"] == "teacher" else "generator ({method})\n{steps} steps"] = source
    return rows


def write_sample_strip(path: str | Path, real: np.ndarray, rows: dict[str, np.ndarray], scale: int = 2) -> Path:
    """A PNG: real clips in the first row, then one row per model (frames left to right)."""
    from w2svd.data.video import encode_png
    from w2svd.previews import sample_grid

    grid = sample_grid([("real clips", real), *rows.items()], clips=len(real), scale=scale,
                       label_width=150 if scale > 1 else 110)
    Path(path).write_bytes(encode_png(grid))
    return Path(path)
