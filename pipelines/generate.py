"""``w2svd generate``: a prompt table → mp4s in object storage and a results Parquet, on Ray Data.

    w2svd generate --model models:/w2svd-generator@champion --prompts s3://b/prompts.csv --output s3://b/gen
    python -m pipelines.generate --model runs/distill/export --prompts p.jsonl --output out/ [--config NAME]

    read the table (driver) → GenerateRows actor pool (``ActorPoolStrategy``, ``generate.num_gpus``
    each): check each row like the API does, batch rows of one shape, write each mp4
    → driver: a results part every ``generate.part_rows`` rows, progress, then ``results.parquet``

The model is pinned on the first run (``OUTPUT/_job.json``): a rerun finishes with the same
version even if the alias moved meanwhile. A rerun after a kill skips every row already in a
results part and duplicates nothing (``pipelines/generate_table.py``). A bad row (empty prompt,
unknown column, size the model does not make, unreadable reference image) gets its error in its
row and the job goes on. Exit status: 0 every row generated, 3 some rows failed (see their
``error``), 2 a user error (one line on stderr).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pyarrow as pa

from pipelines import generate_table as table
from pipelines.errors import ArgumentParser, run_main
from pipelines.model_ref import EXPORT_VERSION, ModelRef, load, model_card, model_tracking_uri, pin
from pipelines.serve_requests import (
    Limits,
    ModelLimits,
    RequestError,
    decode_image_bytes,
    group_by_shape,
    parse_video_request,
)
from w2svd.config import Config, from_dict, load_config, to_dict
from w2svd.data import storage

EXIT_ROWS_FAILED = 3


class GenerateRows:
    """Actor: rows → results rows; holds one generator."""

    def __init__(self, ref: dict, tracking_uri: str | None, cfg_dict: dict, output: str, prompts: str,
                 options: storage.StorageOptions | None):
        cfg = from_dict(Config, cfg_dict)
        self.ref = ModelRef(**ref)
        self.bundle = load(self.ref, tracking_uri)
        self.limits = ModelLimits.from_card(model_card(self.ref, self.bundle))
        self.request_limits = Limits.from_config(cfg.serve)
        self.seed, self.codec = cfg.generate.seed, cfg.generate.codec
        self.output, self.prompts, self.options = output, prompts, options

    def _image(self, value, limits: Limits):
        if not isinstance(value, str):
            raise RequestError(422, f"image must be a URI, got {type(value).__name__}", "image")
        uri = table.resolve_image(value, self.prompts)
        try:
            data = storage.read_bytes(uri, self.options)
        except (OSError, ValueError) as err:
            raise RequestError(422, f"image {uri} cannot be read: {err}", "image") from None
        return decode_image_bytes(data, limits)

    def _result(self, row: dict, body: dict, request=None, **extra) -> dict:
        fields = request.describe() if request is not None else body
        out = {"row": row["row"], "key": row["key"], "prompt": None if body.get("prompt") is None else str(body["prompt"]),
               "model": self.ref.name, "model_version": self.ref.version, "output_uri": None, "seconds": 0.0,
               "error": None, "image": None if body.get("image") is None else str(body["image"])}
        for key in table.INT_FIELDS:
            value = fields.get(key)
            out[key] = value if isinstance(value, int) and not isinstance(value, bool) else None
        return {**out, **extra}

    def __call__(self, batch: pa.Table) -> pa.Table:
        from w2svd.data.video import encode_video

        results, parsed = [], []
        for row in batch.to_pylist():
            body = json.loads(row["body"])
            try:
                if "__error__" in body:
                    raise RequestError(422, body["__error__"], "row")
                request = parse_video_request(body, self.limits, self.request_limits, image=self._image,
                                              default_seed=lambda row=row: self.seed + row["row"])
            except RequestError as err:
                named = not err.field or err.message.startswith(err.field)
                results.append(self._result(row, body, error=err.message if named else f"{err.field}: {err.message}"))
                continue
            parsed.append((row, body, request))
        for group in group_by_shape([p[2] for p in parsed]):
            items = [parsed[i] for i in group]
            reqs = [r for _, _, r in items]
            start = time.perf_counter()
            try:
                clips = self.bundle.generate([r.prompt for r in reqs], [r.seed for r in reqs], reqs[0].frames,
                                             reqs[0].height, reqs[0].width,
                                             [r.image for r in reqs] if self.limits.image_to_video else None)
            except Exception as err:  # noqa: BLE001 - this group's rows fail, the job goes on
                results += [self._result(row, body, r, error=f"generation failed: {err}") for row, body, r in items]
                continue
            share = (time.perf_counter() - start) / len(items)
            for (row, body, r), clip in zip(items, clips.numpy()):
                t0 = time.perf_counter()
                uri = storage.join(self.output, "videos", f"{row['key']}.mp4")
                storage.write_bytes(uri, encode_video(clip, self.bundle.fps, codec=self.codec), self.options)
                results.append(self._result(row, body, r, output_uri=uri, seconds=share + time.perf_counter() - t0))
        return pa.Table.from_pylist(results, schema=table.RESULTS_SCHEMA)


def pin_job(model: str, output: str, tracking_uri: str | None, options) -> ModelRef:
    """The model of this output: pinned on the first run, the same version on every rerun."""
    uri = storage.join(output, table.JOB_FILE)
    known = storage.read_json(uri, options)
    if known is not None:
        if known["uri"] != model:
            raise ValueError(f"{output} already holds videos of {known['uri']} (version {known['version']}); "
                             f"use another --output for {model}")
        return ModelRef(**known)
    ref = pin(model, tracking_uri)
    storage.write_json(uri, ref.__dict__, options)
    return ref


def run(model: str, prompts: str, output: str, cfg: Config, tracking_uri: str | None = None,
        options: storage.StorageOptions | None = None, retry_failed: bool = False, log=print) -> dict:
    """Generate every row of ``prompts`` not yet in ``output``; returns the summary."""
    import ray

    from pipelines.startup import init_ray, require_local_gpus

    options = options or storage.StorageOptions.from_env(cfg.data.s3_endpoint)
    rows = table.read_prompt_table(prompts, options)
    ref = pin_job(model, output, tracking_uri, options)
    done = table.read_parts(output, options)
    if retry_failed:
        done = {k: r for k, r in done.items() if not r["error"]}
    todo = [r for r in rows if r["key"] not in done]
    log(f"[generate] {len(rows)} rows in {prompts}; {len(rows) - len(todo)} already done in {output}; "
        f"{len(todo)} to generate with {ref.label}")
    start, recorded, pending = time.perf_counter(), 0, []
    kill_after = cfg.debug.kill_generate_after_rows
    if todo:
        init_ray(need_cpus=cfg.generate.actors * cfg.generate.num_cpus)
        require_local_gpus(cfg.generate.num_gpus, "generate.num_gpus")
        g = cfg.generate
        ds = ray.data.from_items([{"row": r["row"], "key": r["key"], "body": json.dumps(r["body"], default=str)}
                                  for r in todo], override_num_blocks=max(1, min(len(todo) // g.batch_size, 200)))
        ds = ds.map_batches(GenerateRows, batch_size=g.batch_size, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=g.actors), num_gpus=g.num_gpus,
                            num_cpus=g.num_cpus,
                            fn_constructor_kwargs={"ref": ref.__dict__, "tracking_uri": tracking_uri,
                                                   "cfg_dict": to_dict(cfg), "output": output, "prompts": prompts,
                                                   "options": options})
        for result in ds.iter_rows():
            pending.append(dict(result))
            if len(pending) >= g.part_rows:
                recorded += _record(output, pending, options, len(todo), recorded, start, log)
                pending = []
                if kill_after and recorded >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)  # test hook: a driver killed mid-run
        recorded += _record(output, pending, options, len(todo), recorded, start, log)
    final = table.read_parts(output, options)
    by_key = [final[r["key"]] for r in rows if r["key"] in final]
    results_uri = table.write_results(output, by_key, options)
    failed = [r for r in by_key if r["error"]]
    summary = {"rows": len(rows), "generated": len(by_key) - len(failed), "failed": len(failed),
               "missing": len(rows) - len(by_key), "this_run": recorded, "model": ref.uri,
               "model_version": ref.version if ref.version != EXPORT_VERSION else ref.pinned_uri,
               "results": results_uri, "seconds": round(time.perf_counter() - start, 2)}
    storage.write_json(storage.join(output, table.SUMMARY_FILE), summary, options)
    return summary


def _record(output: str, rows: list[dict], options, total: int, before: int, start: float, log) -> int:
    table.write_part(output, rows, options)
    for r in rows:
        if r["error"]:
            log(f"[generate] row {r['row']} failed: {r['error']}")
    done = before + len(rows)
    rate = done / max(1e-9, time.perf_counter() - start)
    left = (total - done) / rate if rate > 0 else float("nan")
    log(f"[generate] {done}/{total} rows this run, {rate:.2f} rows/s, ~{left:.0f} s left")
    return len(rows)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="w2svd generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, an export folder or s3://")
    p.add_argument("--prompts", required=True, help="prompt table: .jsonl, .csv or .parquet, local or s3://")
    p.add_argument("--output", required=True, help="folder or s3://bucket/prefix for the mp4s and results")
    p.add_argument("--config", default="debug", help="config name or YAML path (its generate section)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's, $MLFLOW_TRACKING_URI, ./mlruns)")
    p.add_argument("--retry-failed", action="store_true", help="generate again the rows that failed before")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. generate.actors=4")
    return p


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        import ray

        args = build_parser().parse_args(argv)
        cfg = load_config(args.config, args.overrides)
        tracking_uri = model_tracking_uri(args.model, cfg, args.tracking_uri)
        started = not ray.is_initialized()
        try:
            summary = run(args.model, args.prompts, args.output, cfg, tracking_uri, retry_failed=args.retry_failed)
        finally:
            if started and ray.is_initialized():
                ray.shutdown()
        print(json.dumps(summary), flush=True)
        if summary["failed"] or summary["missing"]:
            print(f"[generate] completed: {summary['failed']} of {summary['rows']} rows failed "
                  f"(their error is in {summary['results']})", flush=True)
            return EXIT_ROWS_FAILED
        print(f"[generate] completed: {summary['rows']} videos, results in {summary['results']}", flush=True)
        return 0

    return run_main("w2svd generate", body)


if __name__ == "__main__":
    sys.exit(main())
