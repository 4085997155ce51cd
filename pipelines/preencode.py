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
included; 2 a user error (one line on stderr: a missing input, a malformed captions file, a bad
flag or config value); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import Counter

import pyarrow as pa
import ray

from pipelines.errors import ArgumentParser, run_main
from pipelines.startup import init_ray
from pipelines.tracking import tracking_uri
from w2svd.config import Config, from_dict, load_config, to_dict
from w2svd.data import shards, storage
from w2svd.data.clips import (
    decode_clip,
    encode_batch_rows,
    encode_clips,
    list_inputs,
    precheck,
    quarantine_record,
)
from w2svd.data.manifest import (
    check_same_encoders,
    read_output_state,
    summarize,
    write_batch,
    write_manifest,
    write_quarantine_part,
)

# ---------------------------------------------------------------------------------------------
# Stage 1 (CPU tasks, ``data.decode_batch_size`` clips each): read, decode, bucket, resize.


def decode_task(batch: pa.Table, *, cfg_dict: dict, options: storage.StorageOptions, threads: int) -> pa.Table:
    cfg = from_dict(Config, cfg_dict)
    return rows_to_table([decode_clip(r, cfg, options, threads) for r in batch.to_pylist()])


# ---------------------------------------------------------------------------------------------
# Stage 2 (actor pool): VAE and text encoders, loaded once per actor.


class EncodeClips:
    def __init__(self, cfg_dict: dict, options: storage.StorageOptions, threads: int = 1):
        import torch

        from w2svd.models.encoders import LatentEncoder

        # As many intra-op threads as CPUs the actor reserved: more would contend with the
        # decode tasks Ray schedules on the remaining CPUs.
        torch.set_num_threads(threads)
        cfg = from_dict(Config, cfg_dict)
        self.encoder = LatentEncoder(cfg, options)
        self.encode_reference = cfg.data.encode_reference

    def __call__(self, batch: pa.Table) -> pa.Table:
        return rows_to_table(encode_clips(batch.to_pylist(), self.encoder, self.encode_reference),
                             [*shards.SHARD_SCHEMA.names, "encode_s"])


def rows_to_table(rows: list[dict], columns: list[str] = ()) -> pa.Table:
    """Rows → a table with every column any row (or ``columns``) names: ``from_pylist`` alone
    takes its columns from the FIRST row, so a batch starting with a quarantined row would
    silently drop the encoded columns of the others."""
    names = list(dict.fromkeys([*(k for r in rows for k in r), *columns]))
    return pa.Table.from_pylist([{c: r.get(c) for c in names} for r in rows])


def threads_for(num_cpus: float) -> int:
    return max(1, round(num_cpus))


# ---------------------------------------------------------------------------------------------
# Stage 3 (tasks): one shard (and one quarantine part) per batch, written whole.


def write_task(batch: pa.Table, *, output_uri: str, options: storage.StorageOptions,
               kill_driver: tuple[int, int] | None = None) -> pa.Table:
    start = time.perf_counter()
    rows = batch.to_pylist()
    written = write_batch(rows, output_uri, options)
    if kill_driver:
        driver_pid, after = kill_driver
        done = [f for f in storage.list_files(storage.join(output_uri, shards.SHARDS_DIR), options)
                if f.uri.endswith(".parquet")]
        if len(done) >= after:
            os.kill(driver_pid, signal.SIGKILL)
    return pa.Table.from_pylist([{
        "shard": written["shard"],
        "encoded": json.dumps(written["encoded"]),
        "quarantined": json.dumps(written["quarantined"]),
        "decode_s": float(sum(r["decode_s"] for r in rows)),
        "encode_s": float(sum(r["encode_s"] for r in rows)),
        "write_s": time.perf_counter() - start,
    }])


# ---------------------------------------------------------------------------------------------
# Driver


def run(input_uri: str, output_uri: str, cfg: Config, *, options: storage.StorageOptions | None = None,
        inputs: list[dict] | None = None, log=print) -> dict:
    """Pre-encode every input not done yet (``inputs``: ``list_inputs`` of ``input_uri``, listed
    here when not given); returns the summary (also in ``_summary.json``)."""
    options = options or storage.StorageOptions.from_env(cfg.data.s3_endpoint)
    wall_start = time.perf_counter()
    inputs = list_inputs(input_uri, cfg, options) if inputs is None else inputs
    state = read_output_state(output_uri, options)
    check_same_encoders(state, cfg, output_uri)
    done = state.done
    todo = [r for r in inputs if r["source_uri"] not in done]
    log(f"[preencode] {len(inputs)} inputs under {input_uri}; {len(inputs) - len(todo)} already done in "
        f"{output_uri}; {len(todo)} to process")

    early = [(r, precheck(r, cfg)) for r in todo]
    rejected_now = [quarantine_record(r, *why) for r, why in early if why]
    write_quarantine_part(output_uri, rejected_now, options)
    pending = [r for r, why in early if not why]

    stage_s = Counter()
    shards_this_run, encoded_now = 0, 0
    first = None  # (seconds, clips) when the first batch was written: the end of start-up
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
            if first is None:
                first = (time.perf_counter() - wall_start, finished)
            rate = finished / max(1e-9, time.perf_counter() - wall_start)
            log(f"[preencode] {finished}/{len(todo)} processed this run ({encoded_now} encoded in {shards_this_run} shards, "
                f"{len(rejected_now)} quarantined), {rate:.2f} clips/s")
            if time.perf_counter() - last_manifest > 5.0:
                write_manifest(output_uri, read_output_state(output_uri, options), inputs, cfg, options, final=False)
                last_manifest = time.perf_counter()

    wall_s = time.perf_counter() - wall_start
    state = read_output_state(output_uri, options)
    summary = summarize(inputs, state, stage_s, wall_s, encoded_now, len(rejected_now), len(pending), first)
    write_manifest(output_uri, state, inputs, cfg, options, final=True)
    storage.write_bytes(storage.join(output_uri, shards.QUARANTINE_FILE),
                        "".join(json.dumps(r) + "\n" for r in state.quarantined.values()).encode(), options)
    storage.write_bytes(storage.join(output_uri, shards.SUMMARY), json.dumps(summary, indent=2).encode(), options)
    return summary


def build_dataset(pending: list[dict], output_uri: str, cfg: Config, options) -> ray.data.Dataset:
    """Decode tasks and encoder actors stream concurrently: blocks of ``data.decode_batch_size``
    clips are decoded while the actor pool encodes earlier ones in batches of
    ``encode_batch_rows(cfg)`` clips, and shard writers follow."""
    d, cfg_dict = cfg.data, to_dict(cfg)
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0 and d.encoder_num_gpus > 0
    ds = ray.data.from_items(pending, override_num_blocks=max(1, -(-len(pending) // d.decode_batch_size)))
    ds = ds.map_batches(decode_task, batch_size=d.decode_batch_size, batch_format="pyarrow",
                        fn_kwargs={"cfg_dict": cfg_dict, "options": options,
                                   "threads": threads_for(d.decode_num_cpus)},
                        num_cpus=d.decode_num_cpus)
    ds = ds.map_batches(
        EncodeClips,
        fn_constructor_kwargs={"cfg_dict": cfg_dict, "options": options,
                               "threads": threads_for(d.encoder_num_cpus)},
        batch_size=encode_batch_rows(cfg),
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=d.encoder_pool_size),
        num_cpus=d.encoder_num_cpus,
        num_gpus=d.encoder_num_gpus if use_gpu else 0,
    )
    kill_after = cfg.debug.kill_preencode_after_shards
    kill_driver = (os.getpid(), kill_after) if kill_after else None
    return ds.map_batches(write_task, fn_kwargs={"output_uri": output_uri, "options": options,
                                                 "kill_driver": kill_driver},
                          batch_size=d.shard_rows, batch_format="pyarrow", num_cpus=0.25)


def log_to_mlflow(cfg: Config, summary: dict, input_uri: str, output_uri: str, log=print) -> None:
    uri = tracking_uri(cfg)
    if not uri:
        return
    import mlflow

    mlflow.set_tracking_uri(uri)
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
    log(f"[preencode] logged to MLflow at {uri}")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="w2svd preencode", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="folder or s3://bucket/prefix with clips and captions.jsonl")
    p.add_argument("--output", required=True, help="folder or s3://bucket/prefix for the shards")
    p.add_argument("--config", default="debug", help="config name or YAML path")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="logical CPUs when starting a local Ray (default: max(4, cores))")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.shard_rows=16")
    return p


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        cfg = load_config(args.config, args.overrides)
        options = storage.StorageOptions.from_env(cfg.data.s3_endpoint)
        inputs = list_inputs(args.input, cfg, options)  # a missing or empty input fails before Ray starts
        started_ray = init_ray(num_cpus=args.num_cpus)
        try:
            summary = run(args.input, args.output, cfg, options=options, inputs=inputs)
        finally:
            if started_ray:
                ray.shutdown()
        print(json.dumps({k: summary[k] for k in ("total", "encoded", "quarantined", "by_reason")}), flush=True)
        try:
            log_to_mlflow(cfg, summary, args.input, args.output)
        except Exception as err:  # noqa: BLE001 - the shards are written; a tracking outage must not fail the run
            print(f"[preencode] warning: MLflow logging failed: {err}", file=sys.stderr)
        n = summary["quarantined"]
        print(f"completed with {n} quarantined inputs" if n else "completed", flush=True)
        return 0

    return run_main("w2svd preencode", body)


if __name__ == "__main__":
    sys.exit(main())
