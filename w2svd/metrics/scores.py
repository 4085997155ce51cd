"""The evaluation's per-clip scores: every number of a report except the Fréchet distance is the
mean over clips of :func:`clip_scores`, and :func:`score_backends` says how each one is computed
(the exact VBench definition, an offline proxy, a pixel check of the synthetic factors)."""

from __future__ import annotations

import numpy as np

FACE_KEY = "face_detection_rate"
FACTOR_KEY = "factor_agreement"
# Image-to-video models only: the clip against its reference image (the evaluation item's first
# real frame), the paper's "i2v" column (w2svd.metrics.vbench.i2v_subject_consistency, a proxy).
I2V_KEY = "i2v_consistency"
I2V_FIRST_KEY = "i2v_first_frame_ssim"  # the first frame alone against the reference
# Caption factors checked from the pixels (blink timing is left out: a generated clip has no
# "true" blink frames, only the caption's "blinking").
FACTOR_KEYS = ("talking", "blink", "skin_tone", "hair_color", "background")
VBENCH_DIMS = ("dynamic_degree", "temporal_flickering", "motion_smoothness", "subject_consistency",
               "background_consistency", "aesthetic_quality", "imaging_quality")


def clip_scores(clip_THWC: np.ndarray, fps: float, factors: dict | None = None,
                reference: np.ndarray | None = None) -> dict[str, float]:
    """Per-clip values whose mean over clips is the set's value (every metric here is one).

    With the item's synthetic ``factors`` also the agreement of the clip with its caption
    (``factor/<name>``: talking, blink, skin tone, hair colour, background; 0 or 1 per clip) and
    their mean ``factor_agreement``; with the ``reference`` image of an image-to-video model, its
    ``i2v_consistency``."""
    from w2svd.metrics import face_detection_rate, vbench_report
    from w2svd.metrics.clips import gray_frames_THW
    from w2svd.metrics.portrait import clip_factor_agreement
    from w2svd.metrics.vbench import i2v_subject_consistency, ssim

    report = vbench_report(clip_THWC[None], fps=fps, dimensions=list(VBENCH_DIMS))
    scores = {name: float(entry["value"]) for name, entry in report.items()}
    scores[FACE_KEY] = float(face_detection_rate(clip_THWC[None]))
    if factors is not None:
        agreement = {k: v for k, v in clip_factor_agreement(clip_THWC, factors).items() if k in FACTOR_KEYS}
        scores |= {f"factor/{k}": float(v) for k, v in agreement.items()}
        scores[FACTOR_KEY] = float(np.mean(list(agreement.values())))
    if reference is not None:
        scores[I2V_KEY] = i2v_subject_consistency(clip_THWC[None], reference[None])
        scores[I2V_FIRST_KEY] = ssim(*gray_frames_THW(np.stack([reference, clip_THWC[0]])))
    return scores


def score_backends(metrics: dict) -> dict[str, str]:
    """How each per-clip score present in ``metrics`` is computed."""
    from w2svd.metrics.vbench import DIMENSIONS

    backends = {name: DIMENSIONS[name].backend for name in VBENCH_DIMS}
    backends[FACE_KEY] = "opencv-haar"
    if I2V_KEY in metrics:
        backends[I2V_KEY] = "offline-proxy: SSIM on luma instead of DINO (w2svd.metrics.vbench)"
        backends[I2V_FIRST_KEY] = "SSIM of the first frame's luma against the reference's"
    if FACTOR_KEY in metrics:
        backends[FACTOR_KEY] = "pixel checks of the synthetic factors (w2svd.metrics.portrait)"
    return backends
