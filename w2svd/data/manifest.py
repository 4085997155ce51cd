"""What a pre-encode output holds, read from its files: shards, quarantine parts, the manifest.

What is done is read back from the output's shard and quarantine files themselves, which are
written whole (temp + rename, or a single S3 PUT) and named after the clips they hold, so a
rerun after a kill skips finished clips and never writes a clip twice. ``_manifest.json`` and
``_summary.json`` are views of those files for people and later stages.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from w2svd.config import Config, to_dict
from w2svd.data import shards, storage


@dataclass
class OutputState:
    """What the output already holds, read from the shard and quarantine files themselves."""

    shards: dict[str, list[str]] = field(default_factory=dict)  # shard uri → source uris
    encoded: dict[str, str] = field(default_factory=dict)  # source uri → clip id
    quarantined: dict[str, dict] = field(default_factory=dict)  # source uri → record
    duplicates: list[str] = field(default_factory=list)
    vae_ids: set[str] = field(default_factory=set)
    text_encoder_ids: set[str] = field(default_factory=set)

    @property
    def done(self) -> set[str]:
        return set(self.encoded) | set(self.quarantined)


def read_output_state(output_uri: str, options) -> OutputState:
    state = OutputState()
    for f in storage.list_files(storage.join(output_uri, shards.SHARDS_DIR), options):
        if not f.uri.endswith(".parquet"):
            continue  # a temp file of an interrupted write
        fs, path = storage.filesystem(f.uri, options)
        table = pq.read_table(path, filesystem=fs, columns=["clip_id", "source_uri", "vae_id", "text_encoder_id"])
        sources = table.column("source_uri").to_pylist()
        state.shards[f.uri] = sources
        state.vae_ids.update(table.column("vae_id").to_pylist())
        state.text_encoder_ids.update(table.column("text_encoder_id").to_pylist())
        for clip_id, source in zip(table.column("clip_id").to_pylist(), sources):
            if source in state.encoded:
                state.duplicates.append(source)
            state.encoded[source] = clip_id
    for f in storage.list_files(storage.join(output_uri, shards.QUARANTINE_DIR), options):
        if not f.uri.endswith(".jsonl"):
            continue
        for line in storage.read_bytes(f.uri, options).decode().splitlines():
            if line.strip():
                record = json.loads(line)
                state.quarantined[record["source_uri"]] = record
    return state


def write_quarantine_part(output_uri: str, records: list[dict], options) -> None:
    if not records:
        return
    name = shards.batch_name([r["source_uri"] for r in records])
    lines = "".join(json.dumps(r) + "\n" for r in records)
    storage.write_bytes(storage.join(output_uri, shards.QUARANTINE_DIR, f"part-{name}.jsonl"), lines.encode(), options)


def write_batch(rows: list[dict], output_uri: str, options) -> dict:
    """A batch of encoded and quarantined rows → one shard and one quarantine part, each written
    whole and named after the clips it holds (a retried write replaces, never duplicates).
    Returns the shard's URI ("" when nothing was encoded), the encoded sources and the
    quarantine records."""
    from w2svd.data.clips import quarantine_record

    encoded = [r for r in rows if r["status"] == "ok"]
    rejected = [quarantine_record(r, r["reason"], r["detail"]) for r in rows if r["status"] != "ok"]
    shard_uri = ""
    if encoded:
        if not all(r.get("latent") is not None and r.get("vae_id") for r in encoded):
            raise RuntimeError("an encoded row without latents reached the shard writer")
        shard_uri = storage.join(output_uri, shards.SHARDS_DIR,
                                 f"shard-{shards.batch_name([r['source_uri'] for r in encoded])}.parquet")
        storage.write_bytes(shard_uri, shards.shard_bytes(encoded), options)
    write_quarantine_part(output_uri, rejected, options)
    return {"shard": shard_uri, "encoded": [r["source_uri"] for r in encoded], "quarantined": rejected}


def check_same_encoders(state: OutputState, cfg: Config, output_uri: str) -> None:
    if not state.vae_ids:
        return
    from w2svd.models.encoders import encoder_ids

    vae_id, text_id = encoder_ids(cfg)
    if state.vae_ids != {vae_id} or state.text_encoder_ids != {text_id}:
        raise ValueError(
            f"{output_uri} already holds shards from other encoders (vae {sorted(state.vae_ids)}, text "
            f"{sorted(state.text_encoder_ids)}); this config uses vae {vae_id!r}, text {text_id!r}. "
            "Use a new output URI."
        )


def summarize(inputs: list[dict], state: OutputState, stage_s: Counter, wall_s: float,
              encoded_now: int, quarantined_now: int, decoded_now: int,
              first: tuple[float, int] | None = None) -> dict:
    """``first``: (seconds, clips) when the run's first batch was written. Everything before it
    is start-up (listing, scheduling, starting actors, loading models, filling the pipeline);
    the clips after it over the time after it are the steady-state rate."""
    sources = [r["source_uri"] for r in inputs]
    encoded = [s for s in sources if s in state.encoded]
    quarantined = [state.quarantined[s] for s in sources if s in state.quarantined and s not in state.encoded]
    missing = [s for s in sources if s not in state.encoded and s not in state.quarantined]
    if missing:
        raise RuntimeError(f"{len(missing)} inputs ended neither encoded nor quarantined, e.g. {missing[:3]}")
    if state.duplicates:
        raise RuntimeError(f"clips written twice: {state.duplicates[:5]}")
    by_reason = dict(sorted(Counter(q["reason"] for q in quarantined).items()))
    per_stage = {
        name.removesuffix("_s"): {"busy_s": round(stage_s[name], 3),
                                  "clips_per_busy_s": round(decoded_now / stage_s[name], 3) if stage_s[name] else None}
        for name in ("decode_s", "encode_s", "write_s")
    }
    return {
        "total": len(sources),
        "encoded": len(encoded),
        "quarantined": len(quarantined),
        "by_reason": by_reason,
        "this_run": {"encoded": encoded_now, "quarantined": quarantined_now, "wall_s": round(wall_s, 3),
                     "clips_per_s": round((encoded_now + quarantined_now) / wall_s, 3) if wall_s else None,
                     "startup_s": round(first[0], 3) if first else None,
                     "steady_clips_per_s": _steady_rate(first, encoded_now + quarantined_now, wall_s),
                     "stages": per_stage},
        "shards": len(state.shards),
    }


def _steady_rate(first: tuple[float, int] | None, clips: int, wall_s: float) -> float | None:
    """Clips after the first batch per second after it: ``(n − n₁) / (T − t₁)``."""
    if not first or wall_s <= first[0] or clips <= first[1]:
        return None
    return round((clips - first[1]) / (wall_s - first[0]), 3)


def write_manifest(output_uri: str, state: OutputState, inputs: list[dict], cfg: Config, options,
                   final: bool) -> None:
    manifest = {
        "complete": final and all(r["source_uri"] in state.done for r in inputs),
        "shards": [{"uri": uri, "rows": len(sources)} for uri, sources in sorted(state.shards.items())],
        "encoded": dict(sorted(state.encoded.items())),
        "quarantined": sorted(state.quarantined),
        "vae_id": sorted(state.vae_ids),
        "text_encoder_id": sorted(state.text_encoder_ids),
        "buckets": [to_dict(b) for b in cfg.data.buckets],
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    storage.write_bytes(storage.join(output_uri, shards.MANIFEST), json.dumps(manifest, indent=1).encode(), options)
