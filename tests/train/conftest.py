"""Fixtures of the training tests: latent shards in the pre-encode layout, an MLflow store."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from w2svd.config import load_config
from w2svd.data import shards, storage


def write_latent_shards(uri: str, clips_per_bucket: int = 8, rows_per_shard: int = 4, seed: int = 0) -> str:
    """Synthetic latent shards (SHARD_SCHEMA) for every bucket of the debug config under ``uri``.

    Latents are smooth per-clip patterns plus noise (not white noise), so a flow-matching model
    has structure to learn; text/pooled embeddings are fixed per clip.
    """
    cfg = load_config("debug")
    arch, g = cfg.model.arch, torch.Generator().manual_seed(seed)
    rows = []
    for bucket in cfg.data.buckets:
        t, h, w = (bucket.frames - 1) // 4 + 1, bucket.height // 8, bucket.width // 8
        for i in range(clips_per_bucket):
            base = torch.randn(arch.in_channels, 1, 1, 1, generator=g)
            ramp = torch.linspace(-1, 1, h).view(1, 1, h, 1) * torch.randn(arch.in_channels, 1, 1, 1, generator=g)
            latent = (base + ramp + 0.3 * torch.randn(arch.in_channels, t, h, w, generator=g)).expand(-1, t, h, w)
            text = torch.randn(cfg.model.text_max_length, arch.text_embed_dim, generator=g)
            mask = torch.ones(cfg.model.text_max_length, dtype=torch.bool)
            pooled = torch.randn(arch.pooled_projection_dim, generator=g)
            lb, ls, ld = shards.tensor_to_bytes(latent.contiguous())
            tb, ts, _ = shards.tensor_to_bytes(text)
            mb, _, _ = shards.tensor_to_bytes(mask)
            pb, ps, _ = shards.tensor_to_bytes(pooled)
            rows.append({"clip_id": f"{bucket.name}-{i:03d}", "source_uri": f"synthetic://{bucket.name}/{i}",
                         "caption": f"a person talking, clip {i}", "bucket": bucket.name, "frames": bucket.frames,
                         "height": bucket.height, "width": bucket.width, "latent": lb, "latent_shape": ls,
                         "latent_dtype": ld, "text": tb, "text_shape": ts, "text_mask": mb, "pooled": pb,
                         "pooled_shape": ps, "image_latent": None, "image_latent_shape": None,
                         "vae_id": "tiny-random", "text_encoder_id": "tiny-random",
                         "content_hash": f"{bucket.name}{i}", "factors": "{}"})
    for start in range(0, len(rows), rows_per_shard):
        table = pa.Table.from_pylist(rows[start:start + rows_per_shard], schema=shards.SHARD_SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        storage.write_bytes(storage.join(uri, shards.SHARDS_DIR, f"shard-{start // rows_per_shard:04d}.parquet"),
                            sink.getvalue().to_pybytes())
    return uri


@pytest.fixture(scope="session")
def latents_dir(tmp_path_factory) -> str:
    return write_latent_shards(str(tmp_path_factory.mktemp("latents")))


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
