"""Pre-encode: raw portrait clips in object storage → latent Parquet shards, as a Ray Data stream.

    w2svd preencode --input s3://bucket/raw --output s3://bucket/latents --config debug
    python -m pipelines.preencode --input ./raw --output ./latents data.shard_rows=16

    list (driver) → read + decode + bucket + resize (CPU tasks)
                  → VAE + text encoders (actor pool; GPUs when the cluster has them)
                  → write one shard per ``data.shard_rows`` clips (tasks) → driver: manifest

Every input ends as exactly one of encoded or quarantined (with a reason). What is done is read
back from the output's shard and quarantine files, which are written whole (temp + rename, or a
single S3 PUT) and named after the clips they hold, so a rerun after a kill skips finished clips
and never writes a clip twice. Exit status 0 means the run completed, quarantined inputs
included; 1 means the run itself failed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from w2svd.config import Config, from_dict, load_config, to_dict
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

# Fault injection for resume tests (single machine): the shard writer SIGKILLs the driver once
# the output holds this many shards, so the kill lands mid-stream however far the executor has
# run ahead of the driver.
KILL_ENV = "W2SVD_PREENCODE_KILL_AFTER_SHARDS"

_IGNORED_DIRS = ("refs",)


# ---------------------------------------------------------------------------------------------
# Listing: which inputs exist, which are already done, which can be rejected without reading.


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


def _quarantine_record(row: dict, reason: str, detail: str) -> dict:
    return {"clip_id": row["clip_id"], "source_uri": row["source_uri"], "reason": reason, "detail": detail}


# ---------------------------------------------------------------------------------------------
# Stage 1 (CPU tasks): read, decode, bucket, sample frames, resize and crop.


def decode_clip(row: dict, *, cfg_dict: dict, options: storage.StorageOptions) -> dict:
    cfg = from_dict(Config, cfg_dict)
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


# ---------------------------------------------------------------------------------------------
# Stage 2 (actor pool): VAE and text encoders, loaded once per actor.


class EncodeClips:
    def __init__(self, cfg_dict: dict, options: storage.StorageOptions):
        import torch

        from w2svd.models.encoders import LatentEncoder

        self.torch = torch
        cfg = from_dict(Config, cfg_dict)
        self.encoder = LatentEncoder(cfg, options)
        self.encode_reference = cfg.data.encode_reference

    def __call__(self, batch: pa.Table) -> pa.Table:
        import numpy as np

        start = time.perf_counter()
        rows = batch.to_pylist()
        ok = [r for r in rows if r["status"] == "ok"]
        by_bucket: dict[str, list[dict]] = {}
        for r in ok:
            by_bucket.setdefault(r["bucket"], []).append(r)
        for group in by_bucket.values():
            frames_BCTHW = self.torch.stack([
                to_model_input(np.frombuffer(r["pixels"], np.uint8).reshape(r["pixels_shape"])) for r in group
            ])
            latents = self.encoder.encode_video(frames_BCTHW)
            text, mask, pooled = self.encoder.encode_text([r["caption"] for r in group])
            images = None
            if self.encode_reference:
                h, w = group[0]["height"], group[0]["width"]
                refs_BCTHW = self.torch.stack([
                    to_model_input(np.frombuffer(r["reference_pixels"], np.uint8).reshape(1, h, w, 3)) for r in group
                ])
                images = self.encoder.encode_video(refs_BCTHW)
            for i, r in enumerate(group):
                r["latent"], r["latent_shape"], r["latent_dtype"] = shards.tensor_to_bytes(latents[i])
                r["text"], r["text_shape"], _ = shards.tensor_to_bytes(text[i].to(latents.dtype))
                r["text_mask"] = shards.tensor_to_bytes(mask[i].bool())[0]
                r["pooled"], r["pooled_shape"], _ = shards.tensor_to_bytes(pooled[i].to(latents.dtype))
                if images is not None:
                    r["image_latent"], r["image_latent_shape"], _ = shards.tensor_to_bytes(images[i].to(latents.dtype))
                r["vae_id"], r["text_encoder_id"] = self.encoder.vae_id, self.encoder.text_encoder_id
        elapsed = time.perf_counter() - start
        for r in rows:
            r.pop("pixels", None)
            r.pop("reference_pixels", None)
            r["encode_s"] = elapsed / max(1, len(ok)) if r["status"] == "ok" else 0.0
        # from_pylist takes its columns from the FIRST row: a batch that starts with a
        # quarantined row would silently drop every encoded column of the others.
        columns = list(dict.fromkeys([*rows[0], *shards.SHARD_SCHEMA.names, "encode_s"])) if rows else []
        return pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows])


# ---------------------------------------------------------------------------------------------
# Stage 3 (tasks): one shard (and one quarantine part) per batch, written whole.


def write_shard(batch: pa.Table, *, output_uri: str, options: storage.StorageOptions,
                kill_driver: tuple[int, int] | None = None) -> pa.Table:
    start = time.perf_counter()
    rows = batch.to_pylist()
    encoded = [r for r in rows if r["status"] == "ok"]
    rejected = [_quarantine_record(r, r["reason"], r["detail"]) for r in rows if r["status"] != "ok"]
    shard_uri = ""
    if encoded:
        assert all(r.get("latent") is not None and r.get("vae_id") for r in encoded), "encoded row without latents"
        table = pa.Table.from_pylist([{name: r.get(name) for name in shards.SHARD_SCHEMA.names} for r in encoded],
                                     schema=shards.SHARD_SCHEMA)
        sink = io.BytesIO()
        pq.write_table(table, sink)
        shard_uri = storage.join(output_uri, shards.SHARDS_DIR,
                                 f"shard-{shards.batch_name([r['source_uri'] for r in encoded])}.parquet")
        storage.write_bytes(shard_uri, sink.getvalue(), options)
    write_quarantine_part(output_uri, rejected, options)
    if kill_driver:
        driver_pid, after = kill_driver
        written = [f for f in storage.list_files(storage.join(output_uri, shards.SHARDS_DIR), options)
                   if f.uri.endswith(".parquet")]
        if len(written) >= after:
            os.kill(driver_pid, signal.SIGKILL)
    return pa.Table.from_pylist([{
        "shard": shard_uri,
        "encoded": json.dumps([r["source_uri"] for r in encoded]),
        "quarantined": json.dumps(rejected),
        "decode_s": float(sum(r["decode_s"] for r in rows)),
        "encode_s": float(sum(r["encode_s"] for r in rows)),
        "write_s": time.perf_counter() - start,
    }])


# ---------------------------------------------------------------------------------------------
# Driver


@dataclass
class RunResult:
    summary: dict
    exit_code: int


def run(input_uri: str, output_uri: str, cfg: Config, *, options: storage.StorageOptions | None = None,
        log=print) -> RunResult:
    options = options or storage.StorageOptions.from_env(cfg.data.s3_endpoint)
    wall_start = time.perf_counter()
    inputs = list_inputs(input_uri, cfg, options)
    state = read_output_state(output_uri, options)
    _check_same_encoders(state, cfg, output_uri)
    done = state.done
    todo = [r for r in inputs if r["source_uri"] not in done]
    log(f"[preencode] {len(inputs)} inputs under {input_uri}; {len(inputs) - len(todo)} already done in "
        f"{output_uri}; {len(todo)} to process")

    early = [(r, precheck(r, cfg)) for r in todo]
    rejected_now = [_quarantine_record(r, *why) for r, why in early if why]
    write_quarantine_part(output_uri, rejected_now, options)
    pending = [r for r, why in early if not why]

    stage_s = Counter()
    shards_this_run, encoded_now = 0, 0
    if pending:
        ds = build_dataset(pending, output_uri, cfg, options)
        last_manifest = 0.0
        for result in ds.iter_rows():
            stage_s.update({k: result[k] for k in ("decode_s", "encode_s", "write_s")})
            new_encoded = json.loads(result["encoded"])
            encoded_now += len(new_encoded)
            rejected_now += json.loads(result["quarantined"])
            shards_this_run += bool(result["shard"])
            finished = encoded_now + len(rejected_now)
            rate = finished / max(1e-9, time.perf_counter() - wall_start)
            log(f"[preencode] {finished}/{len(todo)} processed this run ({encoded_now} encoded in {shards_this_run} shards, "
                f"{len(rejected_now)} quarantined), {rate:.2f} clips/s")
            if time.perf_counter() - last_manifest > 5.0:
                write_manifest(output_uri, read_output_state(output_uri, options), inputs, cfg, options, final=False)
                last_manifest = time.perf_counter()

    wall_s = time.perf_counter() - wall_start
    state = read_output_state(output_uri, options)
    summary = summarize(inputs, state, stage_s, wall_s, encoded_now, len(rejected_now), len(pending))
    write_manifest(output_uri, state, inputs, cfg, options, final=True)
    storage.write_bytes(storage.join(output_uri, shards.QUARANTINE_FILE),
                        "".join(json.dumps(r) + "\n" for r in state.quarantined.values()).encode(), options)
    storage.write_bytes(storage.join(output_uri, shards.SUMMARY), json.dumps(summary, indent=2).encode(), options)
    return RunResult(summary, 0)


def build_dataset(pending: list[dict], output_uri: str, cfg: Config, options) -> ray.data.Dataset:
    d, cfg_dict = cfg.data, to_dict(cfg)
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0 and d.encoder_num_gpus > 0
    ds = ray.data.from_items(pending, override_num_blocks=max(1, min(len(pending), 200)))
    ds = ds.map(decode_clip, fn_kwargs={"cfg_dict": cfg_dict, "options": options}, num_cpus=d.decode_num_cpus)
    ds = ds.map_batches(
        EncodeClips,
        fn_constructor_kwargs={"cfg_dict": cfg_dict, "options": options},
        batch_size=d.encode_batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=d.encoder_pool_size),
        num_cpus=d.encoder_num_cpus,
        num_gpus=d.encoder_num_gpus if use_gpu else 0,
    )
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    kill_driver = (os.getpid(), kill_after) if kill_after else None
    return ds.map_batches(write_shard, fn_kwargs={"output_uri": output_uri, "options": options,
                                                  "kill_driver": kill_driver},
                          batch_size=d.shard_rows, batch_format="pyarrow", num_cpus=0.25)


def _check_same_encoders(state: OutputState, cfg: Config, output_uri: str) -> None:
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
              encoded_now: int, quarantined_now: int, decoded_now: int) -> dict:
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
                     "stages": per_stage},
        "shards": len(state.shards),
    }


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


def log_to_mlflow(cfg: Config, summary: dict, input_uri: str, output_uri: str, log=print) -> None:
    tracking_uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        return
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(cfg.tracking.experiment)
    with mlflow.start_run(run_name="preencode"):
        mlflow.log_params({"stage": "preencode", "input": input_uri, "output": output_uri, "config": cfg.name,
                           "shard_rows": cfg.data.shard_rows, "encoder_pool_size": cfg.data.encoder_pool_size})
        metrics = {k: summary[k] for k in ("total", "encoded", "quarantined", "shards")}
        metrics.update({f"quarantined.{reason}": n for reason, n in summary["by_reason"].items()})
        this_run = summary["this_run"]
        metrics["wall_s"] = this_run["wall_s"]
        if this_run["clips_per_s"] is not None:
            metrics["clips_per_s"] = this_run["clips_per_s"]
        for stage, values in this_run["stages"].items():
            metrics[f"{stage}.busy_s"] = values["busy_s"]
            if values["clips_per_busy_s"] is not None:
                metrics[f"{stage}.clips_per_busy_s"] = values["clips_per_busy_s"]
        mlflow.log_metrics(metrics)
        mlflow.log_dict(summary, "preencode_summary.json")
    log(f"[preencode] logged to MLflow at {tracking_uri}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="w2svd preencode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder or s3://bucket/prefix with clips and captions.jsonl")
    p.add_argument("--output", required=True, help="folder or s3://bucket/prefix for the shards")
    p.add_argument("--config", default="debug", help="config name or YAML path")
    p.add_argument("--num-cpus", type=float, default=None,
                   help="logical CPUs when starting a local Ray (default: max(4, cores))")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.shard_rows=16")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as err:
        print(f"w2svd preencode: {err}", file=sys.stderr)
        return 2
    started_ray = False
    try:
        if not ray.is_initialized():
            # Stages hold fractional CPUs; on a 2-core box more logical CPUs than cores keeps the
            # decode tasks and the encoder actors from starving each other.
            if os.environ.get("RAY_ADDRESS"):
                ray.init(log_to_driver=False)
            else:
                ray.init(num_cpus=args.num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False,
                         log_to_driver=False)
            started_ray = True
        result = run(args.input, args.output, cfg)
        summary = result.summary
        print(json.dumps({k: summary[k] for k in ("total", "encoded", "quarantined", "by_reason")}), flush=True)
        try:
            log_to_mlflow(cfg, summary, args.input, args.output)
        except Exception as err:  # the shards are written; a tracking outage must not fail the run
            print(f"[preencode] warning: MLflow logging failed: {err}", file=sys.stderr)
        n = summary["quarantined"]
        print(f"completed with {n} quarantined inputs" if n else "completed", flush=True)
        return result.exit_code
    except Exception as err:
        traceback.print_exc()
        print(f"[preencode] run failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        if started_ray:
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
