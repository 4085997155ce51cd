"""Synthetic latent shards in the pre-encode layout: the tests' and benchmarks' stand-in for a
pre-encode output, at any model size and without a VAE.

Latents are smooth per-clip patterns plus noise (not white noise), so a flow-matching model has
structure to learn; text and pooled embeddings are fixed per clip.
"""

from __future__ import annotations

import torch

from w2svd.config import Config
from w2svd.data import shards, storage
from w2svd.data.buckets import latent_size


def write_synthetic_latents(uri: str, cfg: Config, clips_per_bucket: int = 8, rows_per_shard: int = 4,
                            seed: int = 0, options: storage.StorageOptions | None = None) -> str:
    """Shards (``SHARD_SCHEMA``) for every bucket of ``cfg`` under ``uri``; returns ``uri``."""
    arch, g = cfg.model.arch, torch.Generator().manual_seed(seed)
    rows = []
    for bucket in cfg.data.buckets:
        t, h, w = latent_size(bucket.frames, bucket.height, bucket.width)
        for i in range(clips_per_bucket):
            base = torch.randn(arch.in_channels, 1, 1, 1, generator=g)
            ramp = torch.linspace(-1, 1, h).view(1, 1, h, 1) * torch.randn(arch.in_channels, 1, 1, 1, generator=g)
            latent = (base + ramp + 0.3 * torch.randn(arch.in_channels, t, h, w, generator=g)).expand(-1, t, h, w)
            text = torch.randn(cfg.model.text_max_length, arch.text_embed_dim, generator=g)
            pooled = torch.randn(arch.pooled_projection_dim, generator=g)
            rows.append(shards.encoded_row(
                clip_id=f"{bucket.name}-{i:03d}", source_uri=f"synthetic://{bucket.name}/{i}",
                caption=f"a person talking, clip {i}", bucket=bucket.name, frames=bucket.frames,
                height=bucket.height, width=bucket.width, latent=latent.contiguous(), text=text,
                text_mask=torch.ones(cfg.model.text_max_length, dtype=torch.bool), pooled=pooled,
                vae_id="tiny-random", text_encoder_id="tiny-random", content_hash=f"{bucket.name}{i}"))
    for start in range(0, len(rows), rows_per_shard):
        storage.write_bytes(storage.join(uri, shards.SHARDS_DIR, f"shard-{start // rows_per_shard:04d}.parquet"),
                            shards.shard_bytes(rows[start:start + rows_per_shard]), options)
    return uri
