"""VBench-style quality dimensions (Huang et al. 2024), each a float in [0, 1], higher is better.

VBench scores most dimensions with pretrained networks (DINO, CLIP, LAION aesthetic head, MUSIQ, RAFT,
AMT) that cannot be downloaded here. Every dimension therefore carries a ``backend`` label:

* ``"vbench"``: VBench's own definition, computed exactly (only temporal flickering needs no network);
* ``"offline-proxy"``: VBench's aggregation with an offline stand-in for its network (OpenCV
  Farneback flow instead of RAFT/AMT, SSIM / thumbnail correlation instead of DINO/CLIP features,
  colour/contrast and sharpness/noise heuristics instead of LAION/MUSIQ). Proxy values are NOT
  comparable with published VBench numbers; :func:`vbench_report` labels each one so they are never
  mixed with real ones silently. :func:`load_vbench_backend` is where the real networks would come in:
  it raises :class:`~w2svd.metrics.weights.MissingWeightsError` naming the checkpoint.

Input everywhere: ``clips_BTHWC`` (see :mod:`w2svd.metrics.clips`). Scores are averaged over clips.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from w2svd.metrics.clips import as_clips_BTHWC, gray_frames_THW
from w2svd.metrics.weights import require_weights

VBENCH = "vbench"
PROXY = "offline-proxy"

# The checkpoint each VBench dimension needs (VBench's own file names).
VBENCH_WEIGHTS = {
    "subject_consistency": "dino_vitbase16_pretrain.pth (DINO ViT-B/16)",
    "background_consistency": "ViT-B-32.pt (OpenAI CLIP ViT-B/32)",
    "motion_smoothness": "amt-s.pth (AMT-S frame interpolation)",
    "dynamic_degree": "raft-things.pth (RAFT optical flow)",
    "aesthetic_quality": "ViT-L-14.pt (CLIP ViT-L/14) + sa_0_4_vit_l_14_linear.pth (LAION aesthetic head)",
    "imaging_quality": "musiq_spaq_ckpt-358bb6af.pth (MUSIQ trained on SPAQ)",
}


def backend(name: str) -> Callable:
    """Mark a dimension function with the backend it implements (read back as ``fn.backend``)."""

    def mark(fn):
        fn.backend = name
        return fn

    return mark


def load_vbench_backend(dimension: str, weights_dir: str | os.PathLike | None):
    """The real VBench network of ``dimension``: a clear :class:`MissingWeightsError` when absent.

    Running the real networks is not part of this library yet, so present weights raise
    ``NotImplementedError`` instead of being silently replaced by a proxy.
    """
    needed = VBENCH_WEIGHTS[dimension]
    path = None if weights_dir is None else Path(weights_dir) / needed.split(" ")[0]
    require_weights(path, f"VBench {dimension}", needed, "Get it from VBench's model download list.")
    raise NotImplementedError(f"VBench {dimension}: the real {needed} backend is not wired in; use the proxy")


# --------------------------------------------------------------------------- shared pieces


def _consistency(frames: list, sim: Callable[[np.ndarray, np.ndarray], float]) -> float:
    """VBench's consistency aggregation: ``mean_{t≥1} ½(max(0, s(f_0, f_t)) + max(0, s(f_{t−1}, f_t)))``."""
    scores = [0.5 * (max(0.0, sim(frames[0], frames[t])) + max(0.0, sim(frames[t - 1], frames[t])))
              for t in range(1, len(frames))]  # fmt: skip
    return float(np.mean(scores)) if scores else 1.0


def ssim(a_HW: np.ndarray, b_HW: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004; 11×11 Gaussian window, σ 1.5, C1 = (0.01·255)², C2 = (0.03·255)²).

    ``SSIM = (2 μa μb + C1)(2 σab + C2) / ((μa² + μb² + C1)(σa² + σb² + C2))`` per window, averaged.
    """
    a, b = a_HW.astype(np.float64), b_HW.astype(np.float64)
    blur = lambda x: cv2.GaussianBlur(x, (11, 11), 1.5)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def _thumb_correlation(a_HWC: np.ndarray, b_HWC: np.ndarray) -> float:
    """Pearson correlation of 16×16 colour thumbnails: global layout and colour, blind to fine detail."""
    ta, tb = (
        cv2.resize(x, (16, 16), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
        for x in (a_HWC, b_HWC)
    )
    ta, tb = ta - ta.mean(), tb - tb.mean()
    denom = np.sqrt((ta * ta).sum() * (tb * tb).sum())
    return float((ta * tb).sum() / denom) if denom > 0 else 1.0


def farneback_flow(prev_HW: np.ndarray, next_HW: np.ndarray) -> np.ndarray:
    """Dense optical flow ``[H, W, 2]`` (px) from ``prev`` to ``next`` with OpenCV's Farneback."""
    return cv2.calcOpticalFlowFarneback(
        prev_HW.astype(np.uint8), next_HW.astype(np.uint8), None, 0.5, 3, 15, 3, 5, 1.2, 0
    )


def _frame_stride(fps: float | None) -> int:
    """VBench samples ~8 fps for dynamic degree: every ``round(fps / 8)``-th frame."""
    return 1 if fps is None else max(1, round(fps / 8.0))


# --------------------------------------------------------------------------- dimensions


@backend(PROXY)
def subject_consistency(clips_BTHWC) -> float:
    """Subject consistency, VBench aggregation over frames with SSIM on luma instead of DINO cosine."""
    clips = as_clips_BTHWC(clips_BTHWC)
    return float(np.mean([_consistency(list(gray_frames_THW(c)), ssim) for c in clips]))


@backend(PROXY)
def i2v_subject_consistency(clips_BTHWC, images_BHWC) -> float:
    """Image-to-video subject consistency (VBench++'s "i2v subject"), with SSIM on luma instead of
    DINO cosine: the consistency aggregation over the reference image followed by the clip's frames,
    ``mean_t ½(max(0, s(img, f_t)) + max(0, s(f_{t−1}, f_t)))`` with ``f_{−1} = img``, so the first
    frame's term is ``s(img, f_0)``: its agreement with the reference."""
    clips = as_clips_BTHWC(clips_BTHWC).numpy()
    images = np.asarray(images_BHWC)
    if images.shape != (clips.shape[0], *clips.shape[2:]):
        raise ValueError(f"i2v consistency: images {images.shape} for clips {clips.shape}; one [H, W, 3] image per clip")
    return float(np.mean([_consistency(list(gray_frames_THW(np.concatenate([im[None], c]))), ssim)
                          for c, im in zip(clips, images, strict=True)]))


@backend(PROXY)
def background_consistency(clips_BTHWC) -> float:
    """Background consistency, VBench aggregation with colour-thumbnail correlation instead of CLIP cosine."""
    clips = as_clips_BTHWC(clips_BTHWC).numpy()
    return float(np.mean([_consistency(list(c), _thumb_correlation) for c in clips]))


@backend(VBENCH)
def temporal_flickering(clips_BTHWC) -> float:
    """VBench's temporal flickering: ``(255 − mean_t mean|f_{t+1} − f_t|) / 255`` per clip, averaged.

    VBench scores it on static-scene videos only; on moving clips it also counts motion as flicker.
    """
    x = as_clips_BTHWC(clips_BTHWC).float()
    if x.shape[1] < 2:
        return 1.0
    mae_B = (x[:, 1:] - x[:, :-1]).abs().mean(dim=(2, 3, 4)).mean(dim=1)
    return float(((255.0 - mae_B) / 255.0).mean())


def _interpolate_midframe(prev_HWC: np.ndarray, next_HWC: np.ndarray) -> np.ndarray:
    """Middle frame from its neighbours: each warped half-way along the Farneback flow, then averaged."""
    g = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in (prev_HWC, next_HWC)]
    flow = farneback_flow(*g)
    H, W = g[0].shape
    gx, gy = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32))
    # Flow at the target pixel stands in for flow through it (the usual small-motion approximation).
    a = cv2.remap(
        prev_HWC,
        gx - 0.5 * flow[..., 0],
        gy - 0.5 * flow[..., 1],
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    b = cv2.remap(
        next_HWC,
        gx + 0.5 * flow[..., 0],
        gy + 0.5 * flow[..., 1],
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return (a.astype(np.float32) + b.astype(np.float32)) / 2


@backend(PROXY)
def motion_smoothness(clips_BTHWC) -> float:
    """VBench's motion smoothness with flow-based interpolation instead of AMT.

    Drop every odd frame, re-create it from its neighbours, score ``(255 − mean|f̂_t − f_t|) / 255``.
    """
    scores = []
    for clip in as_clips_BTHWC(clips_BTHWC).numpy():
        errs = [np.abs(_interpolate_midframe(clip[t - 1], clip[t + 1]) - clip[t]).mean()
                for t in range(1, clip.shape[0] - 1, 2)]  # fmt: skip
        scores.append((255.0 - np.mean(errs)) / 255.0 if errs else 1.0)
    return float(np.mean(scores))


def flow_scores(clip_THWC: np.ndarray, fps: float | None = None) -> list[float]:
    """Per consecutive (sampled) frame pair: mean of the top 5 % optical-flow magnitudes (VBench's score)."""
    gray = gray_frames_THW(as_clips_BTHWC(clip_THWC)[0])[:: _frame_stride(fps)]
    out = []
    for a, b in zip(gray[:-1], gray[1:], strict=True):
        rad = np.linalg.norm(farneback_flow(a, b), axis=-1).ravel()
        k = max(1, int(rad.size * 0.05))
        out.append(float(np.sort(rad)[-k:].mean()))
    return out


def is_dynamic(clip_THWC, fps: float | None = None) -> bool:
    """VBench's rule: ≥ ``round(4·n/16)`` pairs (at least 1) with flow score > ``6·min(H, W)/256``."""
    clip = as_clips_BTHWC(clip_THWC)[0]
    scores = flow_scores(clip.numpy(), fps)
    thres = 6.0 * min(clip.shape[1], clip.shape[2]) / 256.0
    count_num = max(1, round(4 * (len(scores) + 1) / 16.0))
    return sum(s > thres for s in scores) >= count_num


@backend(PROXY)
def dynamic_degree(clips_BTHWC, fps: float | None = None) -> float:
    """Fraction of clips that move (VBench's dynamic degree, Farneback flow instead of RAFT)."""
    clips = as_clips_BTHWC(clips_BTHWC)
    return float(np.mean([is_dynamic(c, fps) for c in clips]))


def colourfulness(frame_HWC: np.ndarray) -> float:
    """Hasler & Süsstrunk (2003): ``√(σ_rg² + σ_yb²) + 0.3·√(μ_rg² + μ_yb²)``, rg = R−G, yb = (R+G)/2 − B."""
    r, g, b = (frame_HWC[..., i].astype(np.float64) for i in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


@backend(PROXY)
def aesthetic_quality(clips_BTHWC) -> float:
    """Stand-in for the LAION aesthetic score: ``½·min(1, C/100) + ½·min(1, 2·σ_luma/128)`` per frame.

    C is :func:`colourfulness` (≈100 is "extremely colourful"), σ_luma the RMS contrast; a heuristic
    that only ranks flat, grey clips below vivid ones.
    """
    vals = []
    for clip in as_clips_BTHWC(clips_BTHWC).numpy():
        luma = gray_frames_THW(clip)
        vals += [0.5 * min(1.0, colourfulness(f) / 100.0) + 0.5 * min(1.0, 2 * y.std() / 128.0)
                 for f, y in zip(clip, luma, strict=True)]  # fmt: skip
    return float(np.mean(vals))


def noise_sigma(gray_HW: np.ndarray) -> float:
    """Immerkær (1996) fast noise estimate: ``σ = √(π/2) / (6 (W−2)(H−2)) · Σ |I ∗ N|``, N the 3×3 Laplacian-difference kernel."""
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float64)
    resp = cv2.filter2D(gray_HW.astype(np.float64), -1, kernel)[1:-1, 1:-1]
    return float(np.sqrt(np.pi / 2) * np.abs(resp).sum() / (6.0 * resp.size))


@backend(PROXY)
def imaging_quality(clips_BTHWC) -> float:
    """Stand-in for MUSIQ: sharpness × noise penalty per frame, ``(1 − e^{−v/100})·e^{−σ/10}``.

    v is the variance of the luma Laplacian (blur lowers it), σ the :func:`noise_sigma` estimate
    (sensor noise raises v but is penalised here).
    """
    vals = []
    for gray in (gray_frames_THW(c) for c in as_clips_BTHWC(clips_BTHWC)):
        for g in gray:
            v = cv2.Laplacian(g.astype(np.float64), cv2.CV_64F).var()
            vals.append((1 - np.exp(-v / 100.0)) * np.exp(-noise_sigma(g) / 10.0))
    return float(np.mean(vals))


DIMENSIONS: dict[str, Callable] = {
    "subject_consistency": subject_consistency,
    "background_consistency": background_consistency,
    "motion_smoothness": motion_smoothness,
    "dynamic_degree": dynamic_degree,
    "temporal_flickering": temporal_flickering,
    "aesthetic_quality": aesthetic_quality,
    "imaging_quality": imaging_quality,
}


def vbench_report(
    clips_BTHWC, fps: float | None = None, dimensions=None, weights_dir=None
) -> dict[str, dict]:
    """``{dimension: {"value": float, "backend": "vbench" | "offline-proxy"}}`` over the clips.

    With ``weights_dir`` the real VBench networks are required for every dimension that has one (a
    missing checkpoint raises, naming it); without it, the labelled offline proxies are used.
    """
    clips = as_clips_BTHWC(clips_BTHWC)
    report = {}
    for name in dimensions or DIMENSIONS:
        fn = DIMENSIONS[name]
        if weights_dir is not None and fn.backend == PROXY:
            load_vbench_backend(name, weights_dir)
        value = fn(clips, fps=fps) if name == "dynamic_degree" else fn(clips)
        report[name] = {"value": value, "backend": fn.backend}
    return report
