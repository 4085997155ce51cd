"""Procedural talking-head clips with known generative factors.

``sample_factors`` draws a clip's attributes and per-frame motion (head sway and turn, blinks,
mouth opening) from a seeded generator; ``render_clip`` turns any such factors dict into uint8
frames. Because the factors are stored beside every clip, metrics can later check what a
generator did (did the mouth move, did the eyes blink, is the face where it should be).

Faces are drawn at 4x and downsampled, with dark eyes and brows under a lighter forehead and a
lighter nose bridge, so OpenCV's frontal-face Haar cascade finds them once they are about 48 px
wide.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

SKIN_TONES = {
    "pale": (241, 213, 190),
    "light": (230, 188, 152),
    "medium": (205, 150, 108),
    "olive": (180, 135, 90),
    "brown": (140, 95, 62),
    "dark": (98, 66, 46),
}
HAIR_COLORS = {
    "black": (25, 22, 22),
    "brown": (95, 60, 35),
    "blonde": (220, 190, 120),
    "red": (170, 70, 35),
    "gray": (150, 150, 150),
}
BACKGROUNDS = {
    "blue": (70, 110, 190),
    "green": (80, 150, 90),
    "gray": (128, 128, 128),
    "beige": (215, 200, 170),
    "purple": (120, 80, 150),
    "teal": (40, 130, 130),
}
# Face height / width of the head ellipse, and how square its corners are.
FACE_SHAPES = {"oval": 1.32, "round": 1.12, "long": 1.5, "square": 1.2}

DEFAULT_PORTRAIT_SIZES = ((72, 128),)  # (width, height), 9:16
DEFAULT_LANDSCAPE_SIZES = ((128, 72),)  # 16:9
DEFAULT_LENGTHS = (17, 25, 33)
DEFAULT_FPS = (8.0, 12.0, 24.0)

_SS = 4  # supersampling factor of the renderer


def _pick(rng: np.random.Generator, options):
    options = list(options)
    return options[int(rng.integers(len(options)))]


def sample_factors(
    rng: np.random.Generator,
    *,
    portrait_sizes=DEFAULT_PORTRAIT_SIZES,
    landscape_sizes=DEFAULT_LANDSCAPE_SIZES,
    lengths=DEFAULT_LENGTHS,
    fps_choices=DEFAULT_FPS,
    landscape_fraction: float = 0.3,
    orientation: str | None = None,
) -> dict:
    """All generative factors of one clip, as JSON-ready plain Python values."""
    orientation = orientation or ("landscape" if rng.random() < landscape_fraction else "portrait")
    if orientation not in ("portrait", "landscape"):
        raise ValueError(f"orientation {orientation!r}: choose portrait or landscape")
    width, height = _pick(rng, portrait_sizes if orientation == "portrait" else landscape_sizes)
    num_frames, fps = int(_pick(rng, lengths)), float(_pick(rng, fps_choices))
    face_shape = _pick(rng, FACE_SHAPES)
    talking = bool(rng.random() < 0.6)

    # The head fills a similar share of the frame's short side in both orientations.
    face_w = float(min(width, height) * rng.uniform(0.42, 0.52))
    face_h = face_w * FACE_SHAPES[face_shape]
    center_x0 = width / 2 + rng.uniform(-0.08, 0.08) * width
    center_y = height * (0.46 if orientation == "portrait" else 0.5)
    center_y = min(max(center_y, face_h * 0.62), height - face_h * 0.55)

    t_s = np.arange(num_frames) / fps
    sway_amp = float(rng.uniform(0.0, 0.06) * width)
    sway_hz = float(rng.uniform(0.2, 0.6))
    turn = _pick(rng, ("left", "right", "none"))
    turn_deg = 0.0 if turn == "none" else float(rng.uniform(10, 22)) * (-1 if turn == "left" else 1)
    phase = float(rng.uniform(0, 2 * math.pi))
    head_x = center_x0 + sway_amp * np.sin(2 * math.pi * sway_hz * t_s + phase)
    duration = max(t_s[-1], 1e-6)
    head_yaw = turn_deg * np.clip(t_s / duration, 0, 1)

    # Blinks every 1-3 s, lasting ~0.12 s (at least one frame).
    blink_frames: set[int] = set()
    t_next = rng.uniform(0.2, 1.5)
    while t_next < t_s[-1] + 1e-9:
        start = int(round(t_next * fps))
        for k in range(max(1, int(round(0.12 * fps)))):
            if start + k < num_frames:
                blink_frames.add(start + k)
        t_next += rng.uniform(1.0, 3.0)

    if talking:
        syllable_hz = rng.uniform(2.5, 4.5)
        mouth = 0.5 + 0.45 * np.sin(2 * math.pi * syllable_hz * t_s + rng.uniform(0, 6.3))
        mouth = np.clip(mouth + rng.normal(0, 0.08, num_frames), 0.0, 1.0)
    else:
        mouth = np.full(num_frames, 0.05)

    face_box = [
        [round(float(x - face_w / 2), 2), round(float(center_y - face_h / 2), 2), round(face_w, 2), round(face_h, 2)]
        for x in head_x
    ]
    factors = {
        "num_frames": num_frames,
        "fps": fps,
        "width": int(width),
        "height": int(height),
        "orientation": orientation,
        "skin_tone": _pick(rng, SKIN_TONES),
        "hair_color": _pick(rng, HAIR_COLORS),
        "background": _pick(rng, BACKGROUNDS),
        "face_shape": face_shape,
        "talking": talking,
        "head_turn": turn,
        "blink_frames": sorted(blink_frames),
        "mouth_open": [round(float(m), 4) for m in mouth],
        "head_x": [round(float(x), 2) for x in head_x],
        "head_y": round(float(center_y), 2),
        "head_yaw": [round(float(y), 3) for y in head_yaw],
        "face_width": round(face_w, 2),
        "face_box": face_box,
        "noise_seed": int(rng.integers(2**31)),
    }
    return factors


def caption_for(factors: dict) -> str:
    turn = factors.get("head_turn", "none")
    motion = "holding the head still" if turn == "none" else f"turning the head to the {turn}"
    speech = "talking" if factors["talking"] else "silent, mouth closed"
    return (
        f"A {factors['orientation']} video of a person with {factors['skin_tone']} skin, "
        f"{factors['hair_color']} hair and a {factors['face_shape']} face in front of a "
        f"{factors['background']} background, {speech}, {motion}, blinking."
    )


def _pt(x: float, y: float) -> tuple[int, int]:
    return int(round(x * _SS)), int(round(y * _SS))


def _ellipse(img, cx, cy, ax, ay, color, angle=0.0, thickness=-1):
    cv2.ellipse(img, _pt(cx, cy), (max(1, int(ax * _SS)), max(1, int(ay * _SS))), angle, 0, 360,
                color, thickness if thickness < 0 else max(1, int(thickness * _SS)), cv2.LINE_AA)


def _shade(color, factor):
    return tuple(int(min(255, max(0, c * factor))) for c in color)


def render_frame(factors: dict, index: int) -> np.ndarray:
    """One uint8 RGB frame ``[H, W, 3]`` of the clip described by ``factors``."""
    width, height = int(factors["width"]), int(factors["height"])
    skin = SKIN_TONES[factors["skin_tone"]]
    hair = HAIR_COLORS[factors["hair_color"]]
    bg = BACKGROUNDS[factors["background"]]
    shape_ratio = FACE_SHAPES[factors["face_shape"]]
    cx = float(factors["head_x"][index])
    cy = float(factors["head_y"])
    fw = float(factors["face_width"])
    fh = fw * shape_ratio
    yaw = math.radians(float(factors["head_yaw"][index]))
    mouth_open = float(factors["mouth_open"][index])
    eyes_closed = index in set(factors["blink_frames"])

    img = np.empty((height * _SS, width * _SS, 3), np.uint8)
    # Background: a vertical light falloff, so it is not a flat colour.
    ramp = np.linspace(1.12, 0.82, height * _SS)[:, None, None]
    img[:] = np.clip(np.array(bg, np.float32)[None, None] * ramp, 0, 255).astype(np.uint8)

    # Shoulders and neck.
    shirt = _shade(bg, 0.45)
    _ellipse(img, cx, cy + fh * 1.25, fw * 1.25, fh * 0.55, shirt)
    cv2.rectangle(img, _pt(cx - fw * 0.2, cy + fh * 0.3), _pt(cx + fw * 0.2, cy + fh * 0.8), _shade(skin, 0.8), -1)

    # Hair behind the head, then the face.
    _ellipse(img, cx, cy - fh * 0.1, fw * 0.6, fh * 0.58, hair)
    if factors["face_shape"] == "square":
        _ellipse(img, cx, cy, fw * 0.5, fh * 0.5, skin)
        cv2.rectangle(img, _pt(cx - fw * 0.46, cy - fh * 0.1), _pt(cx + fw * 0.46, cy + fh * 0.32), skin, -1)
    else:
        _ellipse(img, cx, cy, fw * 0.5, fh * 0.5, skin)
    # Key light on forehead and cheeks: the cascade wants them brighter than the eye band,
    # which dark skin alone does not give next to bright eye whites.
    lit = _shade(skin, 1.0 + 0.6 * (1 - sum(skin) / 700))
    _ellipse(img, cx, cy - fh * 0.2, fw * 0.36, fh * 0.12, lit)
    for side in (-1, 1):
        _ellipse(img, cx + side * fw * 0.2, cy + fh * 0.1, fw * 0.13, fh * 0.08, lit)
    # Hair on the forehead, leaving the brows clear.
    cv2.ellipse(img, _pt(cx, cy - fh * 0.3), (int(fw * 0.52 * _SS), int(fh * 0.24 * _SS)), 0, 180, 360, hair, -1,
                cv2.LINE_AA)

    # Yaw moves the features sideways and narrows the far side.
    shift = math.sin(yaw) * fw * 0.22
    near, far = (1.0, math.cos(yaw)) if yaw >= 0 else (math.cos(yaw), 1.0)
    eye_dx, eye_y = fw * 0.2, cy - fh * 0.06
    eye_w, eye_h = fw * 0.11, fh * 0.055
    iris = (60, 45, 35)
    for side, squash in ((-1, near), (1, far)):
        ex = cx + shift + side * eye_dx * squash
        # Brows and eye sockets are the dark band the cascade keys on.
        cv2.line(img, _pt(ex - eye_w * 1.1 * squash, eye_y - eye_h * 2.4), _pt(ex + eye_w * 1.1 * squash, eye_y - eye_h * 2.7),
                 _shade(hair, 0.6) if sum(hair) < 400 else (70, 50, 40), max(1, int(fh * 0.035 * _SS)), cv2.LINE_AA)
        _ellipse(img, ex, eye_y, eye_w * 1.35 * squash, eye_h * 1.7, _shade(skin, 0.72))
        if eyes_closed:
            cv2.line(img, _pt(ex - eye_w * squash, eye_y), _pt(ex + eye_w * squash, eye_y), (40, 30, 30),
                     max(1, int(fh * 0.02 * _SS)), cv2.LINE_AA)
        else:
            _ellipse(img, ex, eye_y, eye_w * 0.85 * squash, eye_h, _shade((235, 232, 225), 0.55 + 0.4 * sum(skin) / 700))
            _ellipse(img, ex + shift * 0.15, eye_y, eye_h * 0.95, eye_h * 0.95, iris)
            _ellipse(img, ex + shift * 0.15, eye_y, eye_h * 0.45, eye_h * 0.45, (10, 10, 10))

    # Nose: a lit bridge with a shadow on one side and the nostrils below.
    nx = cx + shift * 1.2
    cv2.line(img, _pt(nx + fw * 0.03, eye_y + fh * 0.02), _pt(nx + fw * 0.05, cy + fh * 0.14), _shade(skin, 0.78),
             max(1, int(fw * 0.025 * _SS)), cv2.LINE_AA)
    _ellipse(img, nx, cy + fh * 0.16, fw * 0.07, fh * 0.025, _shade(skin, 0.7))

    # Mouth: dark opening whose height follows mouth_open, inside lips.
    mx, my = cx + shift, cy + fh * 0.3
    lip = _shade(skin, 0.7)
    lip = (min(255, lip[0] + 40), lip[1], lip[2])
    _ellipse(img, mx, my, fw * 0.17, fh * (0.025 + 0.07 * mouth_open), lip)
    if mouth_open > 0.12:
        _ellipse(img, mx, my, fw * 0.13, fh * 0.06 * mouth_open, (60, 20, 25))

    small = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)
    # A little sensor noise, fixed by the clip's seed and the frame index.
    noise = np.random.default_rng([int(factors.get("noise_seed", 0)), index]).normal(0, 2.0, small.shape)
    return np.clip(small.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def render_clip(factors: dict) -> np.ndarray:
    """uint8 RGB frames ``[T, H, W, 3]`` of the clip described by ``factors``."""
    return np.stack([render_frame(factors, i) for i in range(int(factors["num_frames"]))])


def haar_face_detector():
    return cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")


def detect_faces(frame_HWC: np.ndarray, detector=None) -> list[tuple[int, int, int, int]]:
    """Haar frontal-face boxes ``(x, y, w, h)`` in an RGB frame."""
    detector = detector or haar_face_detector()
    gray = cv2.cvtColor(frame_HWC, cv2.COLOR_RGB2GRAY)
    boxes = detector.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=3, minSize=(24, 24))
    return [tuple(int(v) for v in b) for b in boxes]


def clip_record(clip_id: str, factors: dict) -> dict:
    """One line of ``captions.jsonl`` (paths relative to the dataset root)."""
    return {
        "clip_id": clip_id,
        "video": f"clips/{clip_id}.mp4",
        "caption": caption_for(factors),
        "reference": f"refs/{clip_id}.png",
        "factors": factors,
    }


def write_dataset(out_uri: str, num_clips: int, *, seed: int = 0, options=None, start: int = 0,
                  progress=None, codec: str | None = None, **factor_kwargs) -> list[dict]:
    """Render ``num_clips`` clips to ``OUT/clips/<id>.mp4``, ``OUT/refs/<id>.png`` and
    ``OUT/captions.jsonl``. Clip ``i`` depends only on ``(seed, i)``, so a larger set extends
    a smaller one, and with the default codec the files are byte-identical on every run."""
    import json

    from w2svd.data import storage
    from w2svd.data.video import REPRODUCIBLE_CODEC, encode_png, encode_video

    codec = codec or REPRODUCIBLE_CODEC

    if num_clips < 1:
        raise ValueError(f"num_clips = {num_clips} must be >= 1")
    records = []
    for i in range(start, start + num_clips):
        clip_id = f"clip-{i:05d}"
        factors = sample_factors(np.random.default_rng([seed, i]), **factor_kwargs)
        frames = render_clip(factors)
        record = clip_record(clip_id, factors)
        storage.write_bytes(storage.join(out_uri, record["video"]), encode_video(frames, factors["fps"], codec=codec), options)
        storage.write_bytes(storage.join(out_uri, record["reference"]), encode_png(frames[0]), options)
        records.append(record)
        if progress:
            progress(len(records), num_clips)
    lines = "".join(json.dumps(r) + "\n" for r in records)
    storage.write_bytes(storage.join(out_uri, "captions.jsonl"), lines.encode(), options)
    return records
