"""The latent shard contract (DESIGN §4): Parquet rows of one clip each, tensors as raw bytes.

Tensors are stored as their raw little-endian bytes plus shape and dtype, so any dtype (bf16
included, which numpy lacks) round-trips exactly, and a batch of same-shaped rows decodes with
one ``frombuffer`` over the joined bytes instead of one per row.

Output layout of a pre-encode run::

    OUT/shards/shard-<hash>.parquet     encoded clips (SHARD_SCHEMA)
    OUT/quarantine/part-<hash>.jsonl    rejected inputs of the same batch
    OUT/_manifest.json                  shards, done clip ids, quarantined inputs
    OUT/_quarantine.jsonl               every quarantined input: source_uri, reason, detail
    OUT/_summary.json                   total, encoded, quarantined, by_reason
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:  # torch is imported where tensors are made: pre-encode's decode and write
    import torch  # tasks use this module, and a torch import costs each new worker ~1.5 s

SHARDS_DIR = "shards"
QUARANTINE_DIR = "quarantine"
MANIFEST = "_manifest.json"
QUARANTINE_FILE = "_quarantine.jsonl"
SUMMARY = "_summary.json"

# Why an input was not encoded. Keys are the ``reason`` values; values say what they mean.
QUARANTINE_REASONS = {
    "zero_bytes": "the file is empty",
    "missing_caption": "no caption for the clip (captions file has no entry, or it is empty)",
    "missing_file": "the captions file names a video that is not there",
    "over_size_limit": "larger than data.max_bytes or longer than data.max_seconds",
    "not_a_video": "not a video container, or a container without a video stream",
    "unreadable": "a video container that does not parse or decode",
    "truncated": "the stream ends before the frames its header promises",
    "too_short": "fewer frames than the shortest bucket needs",
    "too_small": "a side shorter than data.min_side",
    "bad_reference": "the reference image named in the captions does not decode",
}

# The tensor dtypes a shard can hold, by their ``torch.<name>``.
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "uint8", "bool")

_list_int = pa.list_(pa.int64())
SHARD_SCHEMA = pa.schema([
    ("clip_id", pa.string()),
    ("source_uri", pa.string()),
    ("caption", pa.string()),
    ("bucket", pa.string()),
    ("frames", pa.int32()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("latent", pa.binary()),
    ("latent_shape", _list_int),
    ("latent_dtype", pa.string()),
    ("text", pa.binary()),
    ("text_shape", _list_int),
    ("text_mask", pa.binary()),
    ("pooled", pa.binary()),
    ("pooled_shape", _list_int),
    ("image_latent", pa.binary()),
    ("image_latent_shape", _list_int),
    ("vae_id", pa.string()),
    ("text_encoder_id", pa.string()),
    ("content_hash", pa.string()),
    ("factors", pa.string()),
])


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_to_bytes(t: torch.Tensor) -> tuple[bytes, list[int], str]:
    import torch

    t = t.detach().cpu().contiguous()
    name = dtype_name(t.dtype)
    if name not in DTYPES:
        raise ValueError(f"cannot store dtype {name}; supported: {sorted(DTYPES)}")
    return t.view(-1).view(torch.uint8).numpy().tobytes(), list(t.shape), name


def tensor_from_bytes(data: bytes, shape, dtype: str) -> torch.Tensor:
    return bytes_to_batch([data], shape, dtype)[0]


def bytes_to_batch(chunks, shape, dtype: str) -> torch.Tensor:
    """Rows of raw bytes with one shared ``shape`` → ``[B, *shape]`` with a single decode."""
    chunks = list(chunks)
    return joined_bytes_to_batch(b"".join(chunks), len(chunks), shape, dtype)


def joined_bytes_to_batch(joined, rows: int, shape, dtype: str) -> torch.Tensor:
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"unknown tensor dtype {dtype!r}; supported: {sorted(DTYPES)}")
    torch_dtype = getattr(torch, dtype)
    shape = [int(s) for s in shape]
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    expected = rows * int(np.prod(shape)) * itemsize
    if len(joined) != expected:
        raise ValueError(f"{rows} rows of {dtype}{shape} need {expected} bytes, got {len(joined)}")
    # One copy into memory torch owns (Arrow buffers are read-only).
    flat = torch.from_numpy(np.frombuffer(joined, np.uint8).copy()) if expected else torch.empty(0, dtype=torch.uint8)
    return flat.view(torch_dtype).reshape(rows, *shape)


def encoded_row(*, clip_id: str, source_uri: str, caption: str, bucket: str, frames: int, height: int,
                width: int, latent: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, pooled: torch.Tensor,
                vae_id: str, text_encoder_id: str, content_hash: str, image_latent: torch.Tensor | None = None,
                factors: str | None = None) -> dict:
    """One shard row (``SHARD_SCHEMA``) from the tensors of one clip. Text, pooled and image
    latents are stored in the latent's dtype; the mask as bool."""
    row = {"clip_id": clip_id, "source_uri": source_uri, "caption": caption, "bucket": bucket, "frames": frames,
           "height": height, "width": width, "vae_id": vae_id, "text_encoder_id": text_encoder_id,
           "content_hash": content_hash, "factors": factors if factors is not None else "{}",
           "image_latent": None, "image_latent_shape": None}
    row["latent"], row["latent_shape"], row["latent_dtype"] = tensor_to_bytes(latent)
    row["text"], row["text_shape"], _ = tensor_to_bytes(text.to(latent.dtype))
    row["text_mask"] = tensor_to_bytes(text_mask.bool())[0]
    row["pooled"], row["pooled_shape"], _ = tensor_to_bytes(pooled.to(latent.dtype))
    if image_latent is not None:
        row["image_latent"], row["image_latent_shape"], _ = tensor_to_bytes(image_latent.to(latent.dtype))
    return row


def shard_bytes(rows: list[dict]) -> bytes:
    """Rows → the bytes of one Parquet shard (columns of ``SHARD_SCHEMA`` only)."""
    import io

    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{name: r.get(name) for name in SHARD_SCHEMA.names} for r in rows],
                                 schema=SHARD_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def content_hash(video_bytes: bytes, caption: str, reference_bytes: bytes | None = None) -> str:
    h = hashlib.sha256(video_bytes)
    h.update(b"\0caption\0" + caption.encode())
    if reference_bytes:
        h.update(b"\0reference\0" + reference_bytes)
    return h.hexdigest()


def batch_name(clip_ids) -> str:
    """A shard's name from the clips it holds: a retried write overwrites, never duplicates."""
    return hashlib.sha1("\n".join(sorted(clip_ids)).encode()).hexdigest()[:16]


@dataclass
class LatentBatch:
    """Training-side view of a batch of shard rows (one bucket, so shapes agree)."""

    clip_ids: list[str]
    bucket: str
    latents: torch.Tensor  # [B, C, T, H, W]
    text: torch.Tensor  # [B, L, D]
    text_mask: torch.Tensor  # [B, L]
    pooled: torch.Tensor  # [B, P]
    image: torch.Tensor | None  # [B, C, 1, h, w] reference-frame latent, or None

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def _joined(batch, name) -> tuple[bytes | memoryview, int]:
    """A binary column's rows as one buffer: zero-copy for Arrow columns without nulls."""
    value = batch[name]
    if isinstance(value, (pa.Array, pa.ChunkedArray)):
        arr = value.combine_chunks() if isinstance(value, pa.ChunkedArray) else value
        if arr.null_count == 0 and pa.types.is_binary(arr.type) and len(arr):
            offsets = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset:arr.offset + len(arr) + 1]
            return memoryview(arr.buffers()[2])[offsets[0]:offsets[-1]], len(arr)
    chunks = list(value.to_pylist() if hasattr(value, "to_pylist") else value)
    return b"".join(chunks), len(chunks)


def _column(batch, name):
    value = batch[name]
    return value.to_pylist() if hasattr(value, "to_pylist") else list(value)


def collate_latent_batch(batch) -> LatentBatch:
    """Columns of shard rows (dict of lists/arrays, a pyarrow Table, or pandas frame) → tensors.

    All rows must come from one bucket (group by bucket first): the tensors are stacked.
    """
    if isinstance(batch, pa.Table):
        batch = {name: batch.column(name) for name in batch.column_names}
    elif hasattr(batch, "to_dict") and hasattr(batch, "columns"):
        batch = {name: batch[name].tolist() for name in batch.columns}
    buckets = sorted(set(_column(batch, "bucket")))
    if len(buckets) != 1:
        raise ValueError(f"a batch must hold one bucket to stack its tensors, got {buckets}")

    dtypes = set(_column(batch, "latent_dtype"))
    if len(dtypes) != 1:
        raise ValueError(f"rows disagree on latent_dtype: {sorted(dtypes)}")
    dtype = dtypes.pop()

    def stacked(data_col: str, shapes: list, data_dtype: str):
        if any(s is None for s in shapes):
            if all(s is None for s in shapes):
                return None
            raise ValueError(f"column {data_col} is missing in some rows of bucket {buckets[0]}")
        shapes_set = {tuple(int(x) for x in s) for s in shapes}
        if len(shapes_set) != 1:
            raise ValueError(f"rows of bucket {buckets[0]} disagree on the shape of {data_col}: {sorted(shapes_set)}")
        joined, rows = _joined(batch, data_col)
        return joined_bytes_to_batch(joined, rows, shapes_set.pop(), data_dtype)

    text_shapes = _column(batch, "text_shape")
    latents = stacked("latent", _column(batch, "latent_shape"), dtype)
    text = stacked("text", text_shapes, dtype)
    mask = stacked("text_mask", [list(s)[:1] for s in text_shapes], "bool")
    return LatentBatch(
        clip_ids=[str(c) for c in _column(batch, "clip_id")],
        bucket=buckets[0],
        latents=latents,
        text=text,
        text_mask=mask,
        pooled=stacked("pooled", _column(batch, "pooled_shape"), dtype),
        image=stacked("image_latent", _column(batch, "image_latent_shape"), dtype),
    )
