"""Latent shards → Ray Dataset, and batches of tensors for training.

    ds = read_latent_shards("s3://bucket/latents", buckets=["portrait"])
    for batch in iter_latent_batches(ds, batch_size=4):     # or a DataIterator from Ray Train
        batch.latents  # [B, C, T, H, W]; batch.text [B, L, D]; batch.text_mask [B, L];
        batch.pooled   # [B, P]; batch.image [B, C, 1, h, w] or None; batch.clip_ids

Rows stay as bytes in the Dataset (cheap to shuffle and move); tensors are decoded once per
batch, all rows of a column at once, and a batch never mixes buckets so its tensors stack.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import ray

from w2svd.data import shards, storage
from w2svd.data.shards import LatentBatch, collate_latent_batch

__all__ = ["read_latent_shards", "training_dataset", "iter_latent_batches", "collate_latent_batch", "shard_files", "LatentBatch"]


def shard_files(uri: str, options: storage.StorageOptions | None = None) -> list[str]:
    """URIs of the shard files of a pre-encode output."""
    files = [f.uri for f in storage.list_files(storage.join(uri, shards.SHARDS_DIR), options)
             if f.uri.endswith(".parquet")]
    if not files:
        raise FileNotFoundError(f"no latent shards under {storage.join(uri, shards.SHARDS_DIR)}; "
                                "run `w2svd preencode --output` there first")
    return files


def _keep_buckets(batch: pa.Table, buckets: list[str]) -> pa.Table:
    return batch.filter(pc.is_in(batch["bucket"], value_set=pa.array(buckets, pa.string())))


def read_latent_shards(uri: str, buckets: list[str] | None = None, *, options: storage.StorageOptions | None = None,
                       columns: list[str] | None = None, **read_kwargs) -> ray.data.Dataset:
    """A Dataset of shard rows (``SHARD_SCHEMA``) under ``uri``, optionally only ``buckets``."""
    options = options or storage.StorageOptions.from_env()
    fs, _ = storage.filesystem(uri, options)
    paths = [storage.filesystem(f, options)[1] for f in shard_files(uri, options)]
    if columns is not None and buckets and "bucket" not in columns:
        columns = [*columns, "bucket"]
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=columns, **read_kwargs)
    if buckets:
        ds = ds.map_batches(_keep_buckets, fn_kwargs={"buckets": list(buckets)}, batch_format="pyarrow",
                            batch_size=None, zero_copy_batch=True)
    return ds


def training_dataset(uri: str, buckets: list[str] | None, *, materialize: bool,
                     options: storage.StorageOptions | None = None) -> ray.data.Dataset:
    """The training jobs' Dataset of the shards under ``uri``: files in a fixed order (resume replays
    the stream by position, and a Dataset keeps the DataContext of its creation, so the order is
    fixed before reading), read once into the object store when ``materialize`` (small data: every
    later pass then costs nothing)."""
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = read_latent_shards(uri, buckets, options=options)
    return ds.materialize() if materialize else ds


def iter_latent_batches(ds, batch_size: int, *, drop_last: bool = False, prefetch_batches: int = 1,
                        local_shuffle_buffer_size: int | None = None) -> Iterator[LatentBatch]:
    """Batches of ``batch_size`` rows of one bucket each, as tensors.

    ``ds`` is a Dataset or a DataIterator (``ray.train.get_dataset_shard``). Rows are buffered
    per bucket until a bucket has a full batch; leftovers come last unless ``drop_last``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size} must be >= 1")
    pending: dict[str, list[pa.Table]] = {}
    counts: dict[str, int] = {}
    for block in ds.iter_batches(batch_size=batch_size, batch_format="pyarrow", prefetch_batches=prefetch_batches,
                                 local_shuffle_buffer_size=local_shuffle_buffer_size):
        for name in pc.unique(block["bucket"]).to_pylist():
            part = _keep_buckets(block, [name])
            pending.setdefault(name, []).append(part)
            counts[name] = counts.get(name, 0) + part.num_rows
            while counts[name] >= batch_size:
                table = pa.concat_tables(pending[name])
                yield collate_latent_batch(table.slice(0, batch_size))
                rest = table.slice(batch_size)
                pending[name], counts[name] = ([rest] if rest.num_rows else []), rest.num_rows
    if not drop_last:
        for name in sorted(pending):
            if counts[name]:
                yield collate_latent_batch(pa.concat_tables(pending[name]))
