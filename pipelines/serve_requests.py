"""What a video request may hold, checked field by field, for the Serve API and batch generation.

    model = ModelLimits.from_card(card)            # what the loaded generator accepts
    body = parse_json_body(raw, content_type, max_body_bytes)        # API only
    request = parse_video_request(body, model, limits, image=decode_base64_image)

Fields (the API's JSON body, a prompt table's columns): ``prompt`` (required), ``image`` (a
reference image for an image-to-video model: base64 in the API, a URI in a table), ``steps``
(one of the model's step counts), ``seed`` (integer >= 0), ``frames``, ``height``, ``width``
(together one of the model's sizes; missing ones are filled from the first size that fits the
given ones). Every problem is a ``RequestError`` with the HTTP status and the field it is about,
so a bad request is always a 4xx that names the field, never a 5xx.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

FIELDS = ("prompt", "image", "steps", "seed", "frames", "height", "width")
SIZE_FIELDS = ("frames", "height", "width")
MAX_SEED = 2**63 - 1


class RequestError(ValueError):
    """A request the service refuses: ``status`` (4xx, or 503 when busy), the ``field`` it is about."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field

    def to_json(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "service_unavailable"
        return {"error": {"message": self.message, "field": self.field, "type": kind, "status": self.status}}


@dataclass(frozen=True)
class ModelLimits:
    """What the loaded generator accepts: step counts, (frames, height, width) sizes, image mode."""

    steps: tuple[int, ...]
    sizes: tuple[tuple[int, int, int], ...]
    image_to_video: bool

    @classmethod
    def from_card(cls, card: dict) -> ModelLimits:
        return cls(tuple(card["steps"]), tuple((s["frames"], s["height"], s["width"]) for s in card["sizes"]),
                   bool(card["image_to_video"]))


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 2000
    max_image_bytes: int = 10_000_000
    max_image_side: int = 4096

    @classmethod
    def from_config(cls, serve_cfg) -> Limits:
        return cls(serve_cfg.max_prompt_chars, serve_cfg.max_image_bytes, serve_cfg.max_image_side)


@dataclass(eq=False)
class VideoRequest:
    prompt: str
    seed: int
    steps: int
    frames: int
    height: int
    width: int
    image: np.ndarray | None = None
    given: dict = dataclasses.field(default_factory=dict)  # the fields the caller set (not the image), the seed always

    @property
    def shape_key(self) -> tuple[int, int, int, int]:
        """Requests batch together only when this is equal: latent shape and sampler grid."""
        return self.steps, self.frames, self.height, self.width

    def describe(self) -> dict:
        return {"prompt": self.prompt, "seed": self.seed, "steps": self.steps, "frames": self.frames,
                "height": self.height, "width": self.width, "image": self.image is not None}


def parse_json_body(raw: bytes, content_type: str | None, max_body_bytes: int) -> dict:
    """The API's request body → a dict (415 not JSON, 413 too large, 400 unparsable, 422 not an object)."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media != "application/json":
        raise RequestError(415, f"Content-Type must be application/json, got {content_type or 'none'!r}", "body")
    if len(raw) > max_body_bytes:
        raise RequestError(413, f"body is {len(raw)} bytes; the limit is {max_body_bytes}", "body")
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"body is not valid JSON: {err}", "body") from None
    if not isinstance(body, dict):
        raise RequestError(422, f"body must be a JSON object, got {type(body).__name__}", "body")
    return body


def _integer(body: dict, field: str, low: int, high: int) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(422, f"{field} must be an integer, got {json.dumps(value)[:40]}", field)
    if not low <= value <= high:
        raise RequestError(422, f"{field} = {value} is out of range [{low}, {high}]", field)
    return value


def _size(body: dict, model: ModelLimits) -> tuple[int, int, int]:
    given = {f: _integer(body, f, 1, 1 << 20) for f in SIZE_FIELDS}
    fitting = [s for s in model.sizes if all(v is None or s[i] == v for i, v in enumerate(given.values()))]
    if fitting:
        return fitting[0]
    allowed = ", ".join(f"{f} frames {h}x{w}" for f, h, w in model.sizes)
    for i, field in enumerate(SIZE_FIELDS):
        value = given[field]
        if value is not None and value not in {s[i] for s in model.sizes}:
            choices = sorted({s[i] for s in model.sizes})
            raise RequestError(422, f"{field} = {value} is not served by this model; choose one of {choices} "
                                    f"(sizes: {allowed})", field)
    field = [f for f in SIZE_FIELDS if given[f] is not None][-1]
    raise RequestError(422, f"{field}: frames/height/width = {tuple(given.values())} is not one of this model's "
                            f"sizes ({allowed})", field)


def decode_image_bytes(data: bytes, limits: Limits) -> np.ndarray:
    """Image file bytes → uint8 RGB ``[H, W, 3]``, or a ``RequestError`` on field ``image``."""
    from w2svd.data.video import BadInput, decode_image

    if len(data) > limits.max_image_bytes:
        raise RequestError(413, f"image is {len(data)} bytes; the limit is {limits.max_image_bytes}", "image")
    try:
        image = decode_image(data)
    except BadInput as err:
        raise RequestError(422, f"image does not decode as a PNG/JPEG/WebP picture ({err.detail})", "image") from None
    if max(image.shape[:2]) > limits.max_image_side:
        raise RequestError(413, f"image is {image.shape[1]}x{image.shape[0]} pixels; the limit is "
                                f"{limits.max_image_side} per side", "image")
    return image


def decode_base64_image(value, limits: Limits) -> np.ndarray:
    """The API's ``image``: base64 (optionally a ``data:image/...;base64,`` URL) of an image file."""
    if not isinstance(value, str):
        raise RequestError(422, f"image must be a base64 string, got {type(value).__name__}", "image")
    text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    if len(text) > limits.max_image_bytes * 4 // 3 + 4:
        raise RequestError(413, f"image is larger than the limit of {limits.max_image_bytes} bytes", "image")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, "image is not valid base64", "image") from None
    return decode_image_bytes(data, limits)


def parse_video_request(body: dict, model: ModelLimits, limits: Limits,
                        image: Callable[[object, Limits], np.ndarray] = decode_base64_image,
                        default_seed: Callable[[], int] | None = None) -> VideoRequest:
    """Check ``body`` against ``FIELDS``, the model and the limits; ``image`` turns the image
    field's value into pixels (base64 in the API, a URI in batch generation)."""
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RequestError(422, f"unknown field(s) {unknown}; allowed: {list(FIELDS)}", unknown[0])
    prompt = body.get("prompt")
    if prompt is None:
        raise RequestError(422, "prompt is required", "prompt")
    if not isinstance(prompt, str):
        raise RequestError(422, f"prompt must be a string, got {type(prompt).__name__}", "prompt")
    if not prompt.strip():
        raise RequestError(422, "prompt is empty", "prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError(422, f"prompt has {len(prompt)} characters; the limit is {limits.max_prompt_chars}",
                           "prompt")
    # The image is checked before the model's mode, so a broken or oversized one is reported as
    # such whichever model is loaded.
    pixels = None if body.get("image") is None else image(body["image"], limits)
    if pixels is not None and not model.image_to_video:
        raise RequestError(422, "image: this model is text-to-video and takes no reference image", "image")
    if pixels is None and model.image_to_video:
        raise RequestError(422, "image is required: this model is image-to-video", "image")
    steps = _integer(body, "steps", 1, 1000)
    if steps is not None and steps not in model.steps:
        raise RequestError(422, f"steps = {steps} is not served by this model; choose one of {list(model.steps)}",
                           "steps")
    seed = _integer(body, "seed", 0, MAX_SEED)
    if seed is None:
        seed = default_seed() if default_seed else 0
    frames, height, width = _size(body, model)
    given = {k: v for k, v in body.items() if k != "image" and v is not None}
    return VideoRequest(prompt, seed, steps or model.steps[0], frames, height, width, pixels, {**given, "seed": seed})


def refit(request: VideoRequest, model: ModelLimits) -> VideoRequest:
    """``request`` for another model (the served one moved): what the caller left out takes that
    model's defaults; a given value it does not take is a ``RequestError``. The seed stays."""
    body = {**request.given, "image": request.image}
    return parse_video_request(body, model, Limits(max_prompt_chars=1 << 30), image=lambda pixels, _: pixels)


def group_by_shape(requests: list[VideoRequest]) -> list[list[int]]:
    """Indices of ``requests`` grouped by ``shape_key``, in order of first appearance: what one
    sampler call may hold (a batch never mixes sizes or step counts)."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.shape_key, []).append(i)
    return list(groups.values())
