"""The raw clips of a pre-encode input: listing, checks without reading, decoding to a bucket.

    inputs = list_inputs("s3://bucket/raw", cfg, options)     # one record per input file
    reason = precheck(record, cfg)                           # quarantine without reading, or None
    row = decode_clip(record, cfg, options)                  # frames of the bucket, or a reason
    rows = encode_clips(decoded_rows, LatentEncoder(cfg))    # shard rows (latents, text embeddings)

An input is every file under the input URI (except the captions file, reference images and
``_``/``.``-prefixed paths) and every captions entry whose video is missing. ``decode_clip``
never raises for a bad input: it returns the row with ``status = "quarantined"`` and the reason.
"""

from __future__ import annotations

import json
import time
from pathlib import PurePosixPath

import numpy as np

from w2svd.config import Config
from w2svd.data import shards, storage
from w2svd.data.buckets import (
    Bucket,
    Rejected,
    choose_bucket,
    frame_stride,
    resize_and_crop,
    sample_frame_indices,
    to_model_input,
)
from w2svd.data.video import BadInput, count_decodable_frames, decode_image, decode_video, probe_video

_IGNORED_DIRS = ("refs",)


def _read_captions(input_uri: str, cfg: Config, options) -> dict[str, dict]:
    """captions.jsonl → {video path relative to the input: entry}."""
    uri = storage.join(input_uri, cfg.data.caption_file)
    if not storage.exists(uri, options):
        return {}
    entries: dict[str, dict] = {}
    seen_ids: set[str] = set()
    for number, line in enumerate(storage.read_bytes(uri, options).decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{uri} line {number} is not JSON: {err}") from None
        if not isinstance(entry, dict) or not entry.get("video"):
            raise ValueError(f"{uri} line {number} has no 'video' path")
        clip_id = str(entry.get("clip_id") or _clip_id_for(entry["video"]))
        if clip_id in seen_ids:
            raise ValueError(f"{uri} line {number}: clip_id {clip_id!r} appears twice")
        seen_ids.add(clip_id)
        entries[str(PurePosixPath(entry["video"]))] = {**entry, "clip_id": clip_id}
    return entries


def _clip_id_for(relpath: str) -> str:
    return relpath.replace("/", "__")


def _input_record(clip_id: str, source_uri: str, size: int, entry: dict | None, input_uri: str) -> dict:
    entry = entry or {}
    factors = entry.get("factors")
    reference = entry.get("reference")
    return {
        "clip_id": clip_id,
        "source_uri": source_uri,
        "size": int(size),
        "caption": str(entry.get("caption") or ""),
        "reference_uri": storage.join(input_uri, reference) if reference else None,
        "factors": json.dumps(factors) if factors is not None else None,
    }


def list_inputs(input_uri: str, cfg: Config, options) -> list[dict]:
    """Every input: each file under ``input_uri`` (except the captions file, reference images
    and ``_``/``.``-prefixed paths) and each captions entry whose video is missing."""
    entries = _read_captions(input_uri, cfg, options)
    references = {str(PurePosixPath(e["reference"])) for e in entries.values() if e.get("reference")}
    root = input_uri.rstrip("/")
    records, seen = [], set()
    for f in storage.list_files(root, options):
        rel = storage.relative(f.uri, root)
        parts = PurePosixPath(rel).parts
        if rel == cfg.data.caption_file or rel in references or parts[0] in _IGNORED_DIRS:
            continue
        if any(p.startswith((".", "_")) for p in parts):
            continue
        entry = entries.get(rel)
        seen.add(rel)
        records.append(_input_record(entry["clip_id"] if entry else _clip_id_for(rel), f.uri, f.size, entry, root))
    for rel, entry in entries.items():
        if rel not in seen:
            records.append({**_input_record(entry["clip_id"], storage.join(root, rel), -1, entry, root)})
    if not records:
        raise FileNotFoundError(f"nothing to pre-encode: {input_uri} holds no clips and no {cfg.data.caption_file}")
    return records


def precheck(record: dict, cfg: Config) -> tuple[str, str] | None:
    """A quarantine reason found without reading the file, or None."""
    if record["size"] < 0:
        return "missing_file", "named in the captions file but not present"
    if record["size"] == 0:
        return "zero_bytes", "the file is empty"
    if record["size"] > cfg.data.max_bytes:
        return "over_size_limit", f"{record['size']} bytes > data.max_bytes = {cfg.data.max_bytes}"
    if not record["caption"].strip():
        return "missing_caption", "no caption entry for this file"
    return None


def quarantine_record(row: dict, reason: str, detail: str) -> dict:
    return {"clip_id": row["clip_id"], "source_uri": row["source_uri"], "reason": reason, "detail": detail}


def decode_clip(row: dict, cfg: Config, options: storage.StorageOptions, threads: int = 0) -> dict:
    """Read, decode, bucket, sample frames and resize one input; bad inputs come back quarantined.
    ``threads``: FFmpeg decoding threads (0: FFmpeg's default, one per core)."""
    start = time.perf_counter()
    out = {**row, "status": "ok", "reason": None, "detail": None, "bucket": None, "pixels": None,
           "pixels_shape": None, "reference_pixels": None, "content_hash": None}
    try:
        out.update(_decode(row, cfg, options, threads))
    except (BadInput, Rejected) as err:
        out.update(status="quarantined", reason=err.reason, detail=err.detail)
    out["decode_s"] = time.perf_counter() - start
    return out


def _decode(row: dict, cfg: Config, options, threads: int) -> dict:
    d = cfg.data
    try:
        data = storage.read_bytes(row["source_uri"], options)
    except FileNotFoundError:
        raise BadInput("missing_file", "the file disappeared after listing") from None
    except OSError as err:
        raise BadInput("unreadable", f"cannot read the file ({err})") from None
    info = probe_video(data)
    if info.duration_s > d.max_seconds:
        raise Rejected("over_size_limit", f"{info.duration_s:.1f}s > data.max_seconds = {d.max_seconds}")
    num_frames = info.num_frames or count_decodable_frames(data)
    if num_frames < d.min_frames:
        raise Rejected("too_short", f"{num_frames} frames < data.min_frames = {d.min_frames}")
    bucket = choose_bucket(info.height, info.width, num_frames, [Bucket.from_config(b) for b in d.buckets],
                           min_side=d.min_side)
    indices = sample_frame_indices(num_frames, bucket.frames, frame_stride(info.fps, d.fps))
    frames, _ = decode_video(data, indices, threads=threads)
    frames = resize_and_crop(frames, bucket.height, bucket.width)

    reference_bytes = None
    reference = None
    if d.encode_reference:
        if row.get("reference_uri"):
            try:
                reference_bytes = storage.read_bytes(row["reference_uri"], options)
            except OSError as err:
                raise BadInput("bad_reference", f"cannot read {row['reference_uri']} ({err})") from None
            reference = resize_and_crop(decode_image(reference_bytes)[None], bucket.height, bucket.width)[0]
        else:
            reference = frames[0]
    return {
        "bucket": bucket.name,
        "frames": bucket.frames,
        "height": bucket.height,
        "width": bucket.width,
        "pixels": frames.tobytes(),
        "pixels_shape": list(frames.shape),
        "reference_pixels": None if reference is None else reference.tobytes(),
        "content_hash": shards.content_hash(data, row["caption"], reference_bytes),
    }


# The fields of a decoded row that go into its shard row unchanged.
ROW_FIELDS = ("clip_id", "source_uri", "caption", "bucket", "frames", "height", "width", "content_hash", "factors")


def encode_clips(rows: list[dict], encoder, encode_reference: bool = True) -> list[dict]:
    """Decoded rows (``decode_clip``) → shard rows, in order. The clips of each bucket go
    through the VAE (and the text encoders) in one call; quarantined rows pass through. Pixels
    are dropped, and every row gets ``encode_s``, its share of the encoder's time.

    ``encoder`` is a ``w2svd.models.encoders.LatentEncoder`` (built once per process: loading
    the models is the expensive part)."""
    import torch

    start = time.perf_counter()
    ok = [r for r in rows if r["status"] == "ok"]
    by_bucket: dict[str, list[dict]] = {}
    for r in ok:
        by_bucket.setdefault(r["bucket"], []).append(r)
    out = {id(r): dict(r) for r in rows}
    for group in by_bucket.values():
        frames_BCTHW = torch.stack([to_model_input(_pixels(r["pixels"], r["pixels_shape"])) for r in group])
        latents = encoder.encode_video(frames_BCTHW)
        text, mask, pooled = encoder.encode_text([r["caption"] for r in group])
        images = None
        if encode_reference:
            h, w = group[0]["height"], group[0]["width"]
            images = encoder.encode_video(torch.stack([to_model_input(_pixels(r["reference_pixels"], [1, h, w, 3]))
                                                       for r in group]))
        for i, r in enumerate(group):
            out[id(r)].update(shards.encoded_row(
                **{k: r.get(k) for k in ROW_FIELDS}, latent=latents[i], text=text[i], text_mask=mask[i],
                pooled=pooled[i], image_latent=None if images is None else images[i],
                vae_id=encoder.vae_id, text_encoder_id=encoder.text_encoder_id))
    per_clip = (time.perf_counter() - start) / max(1, len(ok))
    result = []
    for r in rows:
        row = out[id(r)]
        row.pop("pixels", None)
        row.pop("reference_pixels", None)
        row["encode_s"] = per_clip if r["status"] == "ok" else 0.0
        result.append(row)
    return result


def _pixels(data: bytes, shape) -> np.ndarray:
    return np.frombuffer(data, np.uint8).reshape(shape)


def encode_batch_rows(cfg: Config) -> int:
    """Clips per encoder call: as many clips of the largest bucket as ``data.encode_batch_pixels``
    (frames × height × width) holds, between 1 and ``data.encode_batch_size``; the batch size
    alone when the pixel budget is 0. Sizing by pixels keeps one call's memory and time about
    the same whatever the bucket."""
    d = cfg.data
    if not d.encode_batch_pixels:
        return d.encode_batch_size
    largest = max(b.frames * b.height * b.width for b in d.buckets)
    return max(1, min(d.encode_batch_size, d.encode_batch_pixels // largest))
