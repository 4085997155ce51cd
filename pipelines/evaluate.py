"""Evaluation job: the fixed evaluation set through a generator, metrics merged into one report.

    w2svd evaluate --model models:/w2svd-generator@champion --out report.json
    w2svd evaluate --model runs/distill-1/export --config debug --out report.json
    w2svd evaluate --teacher debug --steps 28 --out teacher28.json      # the reference row

Ray Data, two actor pools: ``GenerateClips`` actors hold the generator(s) and turn prompt rows
into uint8 clips; ``ComputeMetrics`` actors hold the domain encoder and turn clips into
mergeable partial results (Fréchet feature statistics, per-clip VBench-style and face scores).
The driver merges them with the reference side. Several models can go through one Dataset
(promotion evaluates challenger and champion together, on the same items and noise).

A registered version (``models:/NAME/VERSION`` or ``@ALIAS``) also gets the numbers as metrics on
its run and as ``eval.*`` tags on the version, with the evaluation set's fingerprint in
``eval.set``, so promotion can reuse them.
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.errors import ArgumentParser, run_main
from pipelines.registry import check_model_uri, resolve_version
from pipelines.startup import init_ray
from pipelines.tracking import registry_uri
from w2svd.config import Config, EvalConfig, load_config
from w2svd.evalset import EvalSet, build_evalset, reference_clips, reference_factors
from w2svd.metrics.domain import ensure_domain_encoder
from w2svd.metrics.scores import clip_scores, score_backends

FVD_KEY = "fvd/domain"
# The real-vs-real floor's second draw of synthetic portraits: eval.factor_seed + this.
REAL_FLOOR_OFFSET = 7919


# ---------------------------------------------------------------------------------------------
# Model sources (plain dicts: they travel to the actors)


def model_source(uri: str, tracking_uri: str | None = None, steps: int | None = None) -> dict:
    """A registered or exported generator; ``steps`` samples it at another step count than its
    export's (a consistency student, LCM, is one model for every count)."""
    source = {"kind": "model", "uri": uri, "tracking_uri": tracking_uri}
    return source if steps is None else {**source, "steps": int(steps)}


def teacher_source(teacher: str, steps: int, config: str, overrides: list[str] | tuple = ()) -> dict:
    return {"kind": "teacher", "teacher": teacher, "steps": int(steps), "config": config,
            "overrides": list(overrides)}


def load_source(source: dict, device: str | None = None):
    from pipelines.registry import load_registered_generator
    from w2svd.generate import load_teacher_bundle

    if source["kind"] == "teacher":
        return load_teacher_bundle(source["teacher"], source["steps"], source["config"], source["overrides"],
                                   device=device)
    bundle = load_registered_generator(source["uri"], source.get("tracking_uri"), device=device)
    return bundle.with_steps(source["steps"]) if source.get("steps") else bundle


def describe_source(source: dict) -> str:
    if source["kind"] == "real":
        return f"real synthetic clips (factor seed {source['factor_seed']})"
    if source["kind"] == "teacher":
        return f"teacher {source['teacher']} (Euler, {source['steps']} steps)"
    return source["uri"] + (f" at {source['steps']} steps" if source.get("steps") else "")


# ---------------------------------------------------------------------------------------------
# Ray Data stages


class GenerateClips:
    """Actor: prompt rows → uint8 clips, with the shared few-step sampler of each model."""

    def __init__(self, sources: dict[str, dict], threads: int = 1):
        torch.set_num_threads(max(1, threads))
        self.sources = sources
        self.bundles = {}

    def _bundle(self, label: str):
        if label not in self.bundles:
            self.bundles[label] = load_source(self.sources[label])
        return self.bundles[label]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        labels = [str(x) for x in batch["label"]]
        clips: list[np.ndarray | None] = [None] * len(labels)
        conditioned = [False] * len(labels)
        for label in dict.fromkeys(labels):
            idx = [i for i, lab in enumerate(labels) if lab == label]
            first = idx[0]
            size = (int(batch["num_frames"][first]), int(batch["height"][first]), int(batch["width"][first]))
            bundle = self._bundle(label)
            images = [np.asarray(batch["reference"][i]) for i in idx] if bundle.image_to_video else None
            out = bundle.generate([str(batch["prompt"][i]) for i in idx], [int(batch["seed"][i]) for i in idx],
                                  *size, images=images)
            for i, clip in zip(idx, out.numpy(), strict=True):
                clips[i], conditioned[i] = clip, bundle.image_to_video
        return {"label": np.array(labels, dtype=object), "index": batch["index"], "clip": np.stack(clips),
                "reference": batch["reference"], "image_conditioned": np.array(conditioned)}


class ComputeMetrics:
    """Actor: clips → partial metrics (fake-side Fréchet statistics + per-clip scores), mergeable."""

    def __init__(self, encoder_path: str, fps: float, threads: int = 1, factors: list[dict] | None = None):
        from w2svd.metrics import DomainVideoEncoder

        torch.set_num_threads(max(1, threads))
        self.encoder = DomainVideoEncoder.from_path(encoder_path)
        self.fps = fps
        self.factors = factors

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from w2svd.metrics import FrechetDistance

        labels = [str(x) for x in batch["label"]]
        out = {"label": [], "state": [], "scores": []}
        for label in dict.fromkeys(labels):
            idx = [i for i, lab in enumerate(labels) if lab == label]
            clips = torch.from_numpy(np.stack([batch["clip"][i] for i in idx]))
            fd = FrechetDistance(self.encoder)
            fd.update(clips, real=False)
            buf = io.BytesIO()
            torch.save(fd.state(), buf)
            scores = {int(batch["index"][i]): clip_scores(
                np.asarray(batch["clip"][i]), self.fps, self._factors(int(batch["index"][i])),
                reference=np.asarray(batch["reference"][i]) if batch["image_conditioned"][i] else None) for i in idx}
            out["label"].append(label)
            out["state"].append(buf.getvalue())
            out["scores"].append(json.dumps(scores))
        return {k: np.array(v, dtype=object) for k, v in out.items()}

    def _factors(self, index: int) -> dict | None:
        return None if self.factors is None else self.factors[index]


def evaluate_sources(sources: dict[str, dict], cfg: Config, log=print) -> dict[str, dict]:
    """Evaluate every model of ``sources`` (label → source dict) on the config's evaluation set;
    returns label → report. Starts a local Ray unless one is running (or ``RAY_ADDRESS`` is set)."""
    import ray

    from w2svd.metrics import DomainVideoEncoder, FrechetDistance

    start = time.time()
    e = cfg.eval
    encoder_path, encoder_sha = ensure_domain_encoder(e)
    evalset = build_evalset(e).with_domain_encoder(encoder_sha)
    reference = reference_clips(evalset)
    init_ray()  # joins $RAY_ADDRESS or starts a local Ray (left running for later evaluations)
    # Every row carries its item's first real frame: an image-to-video model's reference.
    rows = [{"label": label, "index": it.index, "prompt": it.prompt, "seed": it.seed, "num_frames": it.num_frames,
             "height": it.height, "width": it.width, "reference": reference[it.index, 0].numpy()}
            for label in sources for it in evalset.items]
    threads = max(1, int(e.actor_num_cpus))
    ds = ray.data.from_items(rows)
    ds = ds.map_batches(GenerateClips, fn_constructor_kwargs={"sources": sources, "threads": threads},
                        batch_size=e.batch_size, batch_format="numpy", num_cpus=e.actor_num_cpus,
                        num_gpus=e.actor_num_gpus, compute=ray.data.ActorPoolStrategy(size=e.generator_actors))
    ds = ds.map_batches(ComputeMetrics,
                        fn_constructor_kwargs={"encoder_path": encoder_path, "fps": e.fps, "threads": threads,
                                               "factors": reference_factors(evalset)},
                        batch_size=e.batch_size, batch_format="numpy", num_cpus=e.actor_num_cpus,
                        compute=ray.data.ActorPoolStrategy(size=e.metric_actors))
    partials = ds.take_all()

    encoder = DomainVideoEncoder.from_path(encoder_path)
    real = FrechetDistance(encoder)
    real.update(reference, real=True)
    reports = {}
    for label, source in sources.items():
        fd = FrechetDistance(encoder)
        fd.merge(real)
        per_item: dict[int, dict] = {}
        for part in (p for p in partials if p["label"] == label):
            fd.merge(torch.load(io.BytesIO(part["state"]), weights_only=True))
            per_item.update({int(k): v for k, v in json.loads(part["scores"]).items()})
        if len(per_item) != len(evalset):
            raise RuntimeError(f"evaluation of {label} returned {len(per_item)} of {len(evalset)} clips")
        metrics = {FVD_KEY: fd.compute()}
        for name in per_item[0]:
            metrics[name] = float(np.mean([per_item[i][name] for i in sorted(per_item)]))
        reports[label] = build_report(source, evalset, e, encoder_path, encoder_sha, metrics, per_item,
                                      time.time() - start)
        log(f"[evaluate] {describe_source(source)}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return reports


def real_clips_report(cfg: Config, log=print) -> dict:
    """The evaluation's numbers for real clips instead of a model's: a second draw of synthetic
    portraits for the same prompts' sizes (``eval.factor_seed + REAL_FLOOR_OFFSET``, disjoint from
    the references) scored exactly like generated clips. Its ``fvd/domain`` is the real-vs-real
    floor at this set size (no model can be expected below it), its other metrics are what real
    clips score (the targets a generator's values are read against)."""
    from dataclasses import replace

    from w2svd.metrics import DomainVideoEncoder, FrechetDistance

    start = time.time()
    e = cfg.eval
    encoder_path, encoder_sha = ensure_domain_encoder(e)
    evalset = build_evalset(e).with_domain_encoder(encoder_sha)
    other = build_evalset(replace(e, factor_seed=e.factor_seed + REAL_FLOOR_OFFSET))
    clips, factors = reference_clips(other).numpy(), reference_factors(other)
    encoder = DomainVideoEncoder.from_path(encoder_path)
    fd = FrechetDistance(encoder)
    fd.update(reference_clips(evalset), real=True)
    fd.update(torch.from_numpy(clips), real=False)
    per_item = {i: clip_scores(clip, e.fps, f) for i, (clip, f) in enumerate(zip(clips, factors, strict=True))}
    metrics = {FVD_KEY: fd.compute()}
    for name in per_item[0]:
        metrics[name] = float(np.mean([per_item[i][name] for i in sorted(per_item)]))
    source = {"kind": "real", "factor_seed": e.factor_seed + REAL_FLOOR_OFFSET}
    report = build_report(source, evalset, e, encoder_path, encoder_sha, metrics, per_item, time.time() - start)
    log("[evaluate] real clips: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return report


def build_report(source: dict, evalset: EvalSet, e: EvalConfig, encoder_path: str, encoder_sha: str,
                 metrics: dict, per_item: dict, seconds: float) -> dict:
    backends = {FVD_KEY: f"domain-encoder sha256:{encoder_sha[:16]}", **score_backends(metrics)}
    return {
        "model": {**source, "description": describe_source(source)},
        "evalset": {"fingerprint": evalset.fingerprint(), "num_prompts": len(evalset), "num_frames": e.num_frames,
                    "height": e.height, "width": e.width, "fps": e.fps, "seed": e.seed, "factor_seed": e.factor_seed,
                    "domain_encoder": encoder_path, "domain_encoder_sha256": encoder_sha},
        "metrics": metrics,
        "backends": backends,
        "per_item": [{"index": i, "prompt": evalset.items[i].prompt, "seed": evalset.items[i].seed, **per_item[i]}
                     for i in sorted(per_item)],
        "seconds": round(seconds, 2),
    }


# ---------------------------------------------------------------------------------------------
# Recording on a registered version


def metric_tags(metrics: dict) -> dict[str, str]:
    return {f"eval.{k}": repr(float(v)) for k, v in metrics.items()}


def record_on_version(client, version, report: dict) -> None:
    """Metrics on the version's run, the report as a run artifact, ``eval.*`` tags on the version."""
    fingerprint = report["evalset"]["fingerprint"]
    metrics = {k: float(v) for k, v in report["metrics"].items() if math.isfinite(float(v))}
    if version.run_id:
        ts = int(time.time() * 1000)
        from mlflow.entities import Metric

        client.log_batch(version.run_id, metrics=[Metric(f"eval/{k}", v, ts, 0) for k, v in metrics.items()])
        client.log_dict(version.run_id, report, f"eval/{fingerprint}-v{version.version}.json")
    for key, value in {**metric_tags(report["metrics"]), "eval.set": fingerprint}.items():
        client.set_model_version_tag(version.name, version.version, key, value)


def cached_metrics(version, fingerprint: str, needed: list[str]) -> dict | None:
    """The version's recorded metrics if they came from this evaluation set and cover ``needed``."""
    tags = version.tags or {}
    if tags.get("eval.set") != fingerprint:
        return None
    metrics = {k[len("eval."):]: float(v) for k, v in tags.items() if k.startswith("eval.") and k != "eval.set"}
    return metrics if all(n in metrics for n in needed) else None


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="w2svd evaluate", description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/…, an export folder "
                                      "or a training run dir")
    what.add_argument("--teacher", help="teacher folder/export or config name, sampled with Euler at --steps")
    p.add_argument("--steps", type=int, help="teacher Euler steps (with --teacher; default method.teacher_steps)")
    p.add_argument("--config", default="debug", help="named config or YAML path: the evaluation set and gates")
    p.add_argument("--out", required=True, help="JSON report path")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's, $MLFLOW_TRACKING_URI, "
                                          "or ./mlruns)")
    p.add_argument("--no-record", action="store_true", help="do not write metrics/tags to the registry")
    p.add_argument("--strip", help="also write this PNG: real clips of the evaluation set, the config's "
                                   "teacher at method.teacher_steps and the evaluated model, same prompts and noise")
    p.add_argument("--strip-clips", type=int, default=4, help="clips (columns of frames) in --strip")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. eval.num_prompts=4")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()

    def body() -> int:
        args = parser.parse_args(argv)
        if args.steps is not None and not args.teacher:
            parser.error("--steps goes with --teacher")
        cfg = load_config(args.config, args.overrides)
        if args.teacher:
            source = teacher_source(args.teacher, args.steps or cfg.method.teacher_steps, args.config,
                                    args.overrides)
        else:
            source = model_source(args.model, args.tracking_uri)
        version, client = None, None
        if args.model:
            check_model_uri(args.model, registry_uri(cfg, args.tracking_uri))
        if args.model and args.model.startswith("models:/"):
            from mlflow.tracking import MlflowClient

            uri = registry_uri(cfg, args.tracking_uri)
            client = MlflowClient(tracking_uri=uri)
            version = resolve_version(client, args.model)
            # Pin the version, so an alias moving during the job cannot mix two models' numbers.
            source = model_source(f"models:/{version.name}/{version.version}", uri)
        report = evaluate_sources({"model": source}, cfg)["model"]
        if version is not None:
            report["model"]["registered"] = {"name": version.name, "version": version.version}
            if not args.no_record:
                record_on_version(client, version, report)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(f"[evaluate] report written to {out}")
        if args.strip:
            from pipelines.sample_strips import sample_clips, strip_sources, write_sample_strip

            write_sample_strip(args.strip, *sample_clips(strip_sources(source, cfg, args.config, args.overrides),
                                                         cfg, args.strip_clips))
            print(f"[evaluate] sample strip written to {args.strip}")
        return 0

    return run_main("w2svd evaluate", body)


if __name__ == "__main__":
    sys.exit(main())
