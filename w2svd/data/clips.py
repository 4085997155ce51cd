"""The raw clips of a pre-encode input: listing, checks without reading, decoding to a bucket.

    inputs = list_inputs("s3://bucket/raw", cfg, options)     # one record per input file
    reason = precheck(record, cfg)                           # quarantine without reading, or None
    row = decode_clip(record, cfg, options)                  # frames of the bucket, or a reason

An input is every file under the input URI (except the captions file, reference images and
``_``/``.``-prefixed paths) and every captions entry whose video is missing. ``decode_clip``
never raises for a bad input: it returns the row with ``status = "quarantined"`` and the reason.
"""

from __future__ import annotations

import json
import time
from pathlib import PurePosixPath

from w2svd.config import Config
from w2svd.data import shards, storage
from w2svd.data.buckets import (
    Bucket,
    Rejected,
    choose_bucket,
    frame_stride,
    resize_and_crop,
    sample_frame_indices,
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


def decode_clip(row: dict, cfg: Config, options: storage.StorageOptions) -> dict:
    """Read, decode, bucket, sample frames and resize one input; bad inputs come back quarantined."""
    start = time.perf_counter()
    out = {**row, "status": "ok", "reason": None, "detail": None, "bucket": None, "pixels": None,
           "pixels_shape": None, "reference_pixels": None, "content_hash": None}
    try:
        out.update(_decode(row, cfg, options))
    except (BadInput, Rejected) as err:
        out.update(status="quarantined", reason=err.reason, detail=err.detail)
    out["decode_s"] = time.perf_counter() - start
    return out


def _decode(row: dict, cfg: Config, options) -> dict:
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
    frames, _ = decode_video(data, indices)
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
