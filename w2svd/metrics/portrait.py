"""Portrait checks: is there a face, does it stay put, and does the clip do what its caption says.

Faces are found with OpenCV's frontal-face Haar cascade (shipped inside ``opencv-python-headless``
4.x; the detector itself is :func:`w2svd.data.synth.detect_faces`, shared with the data side).

:func:`factor_agreement` is for synthetic portraits (:mod:`w2svd.data.synth`), whose captions come
from known generative factors: it measures blinks, talking and colour attributes from the pixels and
compares them with the factors. Regions (eyes, mouth, hair, cheeks) are placed on the face box in the
synthetic renderer's layout, so these checks are specific to that data.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from w2svd.metrics.clips import as_clips_BTHWC

# A Haar box around a synthetic face is ~1.5× the face ellipse's width, centred on it (measured on
# w2svd.data.synth renders): the map from a detected box to the renderer's face_box [x, y, w, h].
_HAAR_TO_FACE = (1 / 6, 0.026, 1 / 1.5, 0.862)

# Regions in face-box coordinates (u0, u1, v0, v1) of the synthetic renderer's layout.
REGIONS = {
    "eyes": (0.22, 0.78, 0.38, 0.50),
    "mouth": (0.25, 0.75, 0.68, 0.95),
    "hair": (0.35, 0.65, -0.12, 0.15),
    "skin": (0.15, 0.85, 0.45, 0.70),
}
BLINK_CONTRAST_RATIO = 0.9  # eye-band contrast below 0.9× the clip's median: eyes closed
TALKING_MOUTH_STD = 3.0  # robust temporal std (luma levels) of the mouth opening above this: talking


@lru_cache(maxsize=1)
def _detector():
    from w2svd.data.synth import haar_face_detector

    return haar_face_detector()


def face_boxes(clip_THWC) -> list[tuple[int, int, int, int] | None]:
    """Per frame, the largest Haar face box ``(x, y, w, h)`` in pixels, or ``None``."""
    from w2svd.data.synth import detect_faces

    out = []
    for frame in np.asarray(as_clips_BTHWC(clip_THWC)[0]):
        boxes = detect_faces(np.ascontiguousarray(frame), _detector())
        out.append(max(boxes, key=lambda b: b[2] * b[3]) if boxes else None)
    return out


def face_detection_rate(clips_BTHWC) -> float:
    """Fraction of all frames of all clips in which at least one face is found."""
    found = [b is not None for clip in as_clips_BTHWC(clips_BTHWC) for b in face_boxes(clip)]
    return float(np.mean(found)) if found else 0.0


def face_stability(clips_BTHWC) -> dict[str, float]:
    """Jitter of the detected face over time, averaged over clips with ≥ 2 detections (lower is steadier).

    ``center_std = √(std_t(cx/W)² + std_t(cy/H)²)``, ``size_std = std_t(√(w·h) / min(H, W))``; NaN when
    no clip has two detected frames. ``clips_used`` counts the clips that entered the average.
    """
    clips = as_clips_BTHWC(clips_BTHWC)
    H, W = clips.shape[2], clips.shape[3]
    center, size = [], []
    for clip in clips:
        boxes = np.array([b for b in face_boxes(clip) if b is not None], np.float64).reshape(-1, 4)
        if len(boxes) < 2:
            continue
        cx, cy = (boxes[:, 0] + boxes[:, 2] / 2) / W, (boxes[:, 1] + boxes[:, 3] / 2) / H
        center.append(float(np.hypot(cx.std(), cy.std())))
        size.append(float((np.sqrt(boxes[:, 2] * boxes[:, 3]) / min(H, W)).std()))
    nan = float("nan")
    return {
        "center_std": float(np.mean(center)) if center else nan,
        "size_std": float(np.mean(size)) if size else nan,
        "clips_used": len(center),
    }


def _face_track(clip_THWC) -> np.ndarray | None:
    """Per-frame face boxes in the renderer's face_box frame: detected, gaps filled from the nearest
    detection, median-smoothed over 5 frames (Haar boxes jitter by a few pixels)."""
    dets = face_boxes(clip_THWC)
    idx = [i for i, b in enumerate(dets) if b is not None]
    if not idx:
        return None
    fu, fv, fw, fh = _HAAR_TO_FACE
    boxes = []
    for i in range(len(dets)):
        x, y, w, h = dets[min(idx, key=lambda j: abs(j - i))]
        boxes.append([x + fu * w, y + fv * h, fw * w, fh * h])
    boxes = np.array(boxes)
    return np.array([np.median(boxes[max(0, i - 2) : i + 3], axis=0) for i in range(len(boxes))])


def _patch(frame, box, region, size: tuple[int, int] | None = (24, 12)) -> np.ndarray:
    """The region (face-box coordinates) of one frame, resized to ``size`` (``None``: raw pixels)."""
    u0, u1, v0, v1 = REGIONS[region]
    x, y, w, h = box
    H, W = frame.shape[:2]
    x0, x1 = int(np.clip(round(x + u0 * w), 0, W - 1)), int(np.clip(round(x + u1 * w), 1, W))
    y0, y1 = int(np.clip(round(y + v0 * h), 0, H - 1)), int(np.clip(round(y + v1 * h), 1, H))
    crop = frame[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)]
    return crop if size is None else cv2.resize(crop, size, interpolation=cv2.INTER_AREA)


def detect_blinks(gray_THW: np.ndarray, boxes_T4: np.ndarray) -> list[int]:
    """Frames whose eye-band contrast (std of the patch) dips below ``BLINK_CONTRAST_RATIO`` × the clip median:
    open eyes show white sclera and a dark iris, closed ones only a lid line."""
    contrast = np.array([_patch(g, b, "eyes").std() for g, b in zip(gray_THW, boxes_T4, strict=True)])
    return [int(t) for t in np.flatnonzero(contrast < BLINK_CONTRAST_RATIO * np.median(contrast))]


def mouth_motion(gray_THW: np.ndarray, boxes_T4: np.ndarray) -> float:
    """Temporal spread of the mouth opening: ``o_t = median(patch_t) − p5(patch_t)`` (how dark the darkest
    part of the mouth patch is), scored as the robust std ``1.4826·MAD_t(o_t)`` in luma levels.

    A statistic of the patch, not its pixels, so head sway and box jitter that move the mouth inside
    the patch barely change it; the MAD ignores the odd frame where the face track jumps."""
    o_T = np.array(
        [
            np.median(p) - np.percentile(p, 5)
            for p in (_patch(g, b, "mouth") for g, b in zip(gray_THW, boxes_T4, strict=True))
        ]
    )
    return float(1.4826 * np.median(np.abs(o_T - np.median(o_T))))


def dominant_palette_entry(
    pixels_N3: np.ndarray, palette: dict[str, tuple[int, int, int]], tol: float = np.inf
) -> str | None:
    """The palette name most pixels vote for; a pixel votes for its nearest entry if within ``tol`` (RGB L2).

    A finite ``tol`` keeps shaded or lit pixels (which can sit next to a neighbouring palette entry)
    from voting; ``None`` when no pixel is within ``tol`` of any entry."""
    names = list(palette)
    colours = np.array([palette[n] for n in names], np.float64)
    dist_NK = np.linalg.norm(pixels_N3[:, None, :].astype(np.float64) - colours[None], axis=-1)
    nearest_N = dist_NK.argmin(1)[dist_NK.min(1) <= tol]
    return names[int(np.bincount(nearest_N, minlength=len(names)).argmax())] if nearest_N.size else None


def _timing_f1(found: list[int], true: list[int], tol: int = 1) -> float:
    """F1 of blink frames, a frame counting as matched within ``tol`` frames; 1 when both are empty."""
    if not found and not true:
        return 1.0
    if not found or not true:
        return 0.0
    precision = np.mean([min(abs(f - t) for t in true) <= tol for f in found])
    recall = np.mean([min(abs(t - f) for f in found) <= tol for t in true])
    return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0


def clip_mouth_motion(clip_THWC) -> float | None:
    """:func:`mouth_motion` of one clip along its face track (``None``: no face detected in any frame)."""
    clip = np.asarray(as_clips_BTHWC(clip_THWC)[0])
    boxes = _face_track(clip)
    if boxes is None:
        return None
    return mouth_motion(_gray_THW(clip), boxes)


def _gray_THW(clip_THWC: np.ndarray) -> np.ndarray:
    return np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in clip_THWC]).astype(np.float32)


def clip_factor_agreement(clip_THWC, factors: dict) -> dict[str, float]:
    """Per-factor agreement (0 or 1, blink timing an F1) of one clip with its known factors."""
    from w2svd.data.synth import BACKGROUNDS, HAIR_COLORS, SKIN_TONES

    clip = np.asarray(as_clips_BTHWC(clip_THWC)[0])
    boxes = _face_track(clip)
    if boxes is None:  # no face at all: nothing the caption says about the face can be confirmed
        out = dict.fromkeys(("blink", "blink_timing", "talking", "skin_tone", "hair_color"), 0.0)
    else:
        gray = _gray_THW(clip)
        blinks, true_blinks = detect_blinks(gray, boxes), list(factors["blink_frames"])
        talking = mouth_motion(gray, boxes) > TALKING_MOUTH_STD
        mid = len(clip) // 2
        out = {
            "blink": float(bool(blinks) == bool(true_blinks)),
            "blink_timing": _timing_f1(blinks, true_blinks),
            "talking": float(talking == bool(factors["talking"])),
            # Skin: only pixels within sensor noise of a tone vote (the renderer's lit cheeks of one
            # tone come close to the next lighter tone).
            "skin_tone": float(
                dominant_palette_entry(
                    _patch(clip[mid], boxes[mid], "skin", None).reshape(-1, 3), SKIN_TONES, 12.0
                )
                == factors["skin_tone"]
            ),
            "hair_color": float(
                dominant_palette_entry(
                    _patch(clip[mid], boxes[mid], "hair", None).reshape(-1, 3), HAIR_COLORS
                )
                == factors["hair_color"]
            ),
        }
    H, W = clip.shape[1:3]
    # Background: the outer 6 % columns between 10 % and 45 % of the height, clear of hair and shoulders.
    rows, cols = slice(int(0.10 * H), int(0.45 * H)), max(1, int(0.06 * W))
    border = np.concatenate([clip[:, rows, :cols], clip[:, rows, -cols:]], axis=2).reshape(-1, 3)
    out["background"] = float(dominant_palette_entry(border, BACKGROUNDS) == factors["background"])
    return out


def factor_agreement(clips_BTHWC, factors: list[dict]) -> dict[str, float]:
    """Agreement of synthetic clips with their captions' known factors, per factor, in [0, 1].

    Keys: ``blink`` (a blink is seen iff the factors have one), ``blink_timing`` (F1 of the blink
    frames, ±1 frame: only meaningful when the factors are the clip's own, e.g. real synthetic clips),
    ``talking`` (:func:`mouth_motion` above ``TALKING_MOUTH_STD`` iff talking), ``skin_tone``,
    ``hair_color``, ``background`` (the dominant colour of the region is the caption's palette entry).
    ``clips_BTHWC`` may also be a list of clips ``[T, H, W, 3]`` of different sizes.
    """
    if len(clips_BTHWC) != len(factors):
        raise ValueError(f"{len(clips_BTHWC)} clips but {len(factors)} factor dicts")
    per_clip = [clip_factor_agreement(c, f) for c, f in zip(clips_BTHWC, factors, strict=True)]
    return {k: float(np.mean([p[k] for p in per_clip])) for k in per_clip[0]}
