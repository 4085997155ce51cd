"""``w2svd serve``: the distilled generator as a Ray Serve application.

    w2svd serve --model models:/w2svd-generator@champion [--config NAME] [--host H] [--port P]
    serve run pipelines.serve:build_app model=models:/w2svd-generator@champion config=debug
    # or a RayService's serveConfigV2: import_path pipelines.serve:build_app, args {model, config}

Two deployments: ``VideoAPI`` (the FastAPI ingress, ``pipelines/serve_api.py``) and
``VideoGenerator`` (one ``GeneratorBundle`` per replica; ``serve.num_gpus`` each, a fixed
``serve.min_replicas`` or autoscaling up to ``serve.max_replicas``). Same-shape requests are
batched with ``@serve.batch`` and split by shape inside a batch, so one sampler call never mixes
sizes or step counts. A ``models:/NAME@ALIAS`` is pinned to its version at load and polled every
``serve.alias_poll_s``; when the alias moves, the replica loads the new version beside the old
one and switches, and the requests already in a batch finish on the old one.

``w2svd serve`` runs in the foreground; Ctrl-C (or SIGTERM) deletes the application and stops
the local Ray it started, leaving nothing running.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

from ray import serve

from pipelines.errors import ArgumentParser, run_main
from pipelines.model_ref import ModelRef, load, model_card, model_tracking_uri, pin
from pipelines.serve_api import VideoAPI, read_token
from pipelines.serve_requests import ModelLimits, RequestError, VideoRequest, group_by_shape, refit
from w2svd.config import Config, ServeConfig, from_dict, load_config
from w2svd.data import storage

APP_NAME = "w2svd"
logger = logging.getLogger("ray.serve")


class VideoGenerator:
    """Serve deployment: one generator per replica; ``generate`` takes one ``VideoRequest`` and
    answers ``{"video": mp4 bytes, "model", "timings", "batch_size"}`` or ``{"error": …}``."""

    def __init__(self, model_uri: str, tracking_uri: str | None, serve_cfg: dict):
        s = from_dict(ServeConfig, serve_cfg)
        self.uri, self.tracking_uri, self.codec = model_uri, tracking_uri, s.codec
        self.current = self._load(pin(model_uri, tracking_uri))
        # One thread: batches run one after another on the device, off the replica's event loop
        # (which keeps taking requests and health checks meanwhile).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="w2svd-generate")
        self.generate_batch.set_max_batch_size(s.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        self._stop = threading.Event()
        if self.current[0].alias and s.alias_poll_s > 0:
            threading.Thread(target=self._poll_alias, args=(s.alias_poll_s,), daemon=True,
                             name="w2svd-alias-poll").start()

    def _load(self, ref: ModelRef) -> tuple[ModelRef, object, dict]:
        bundle = load(ref, self.tracking_uri)
        logger.info("w2svd: serving %s (%s)", ref.label, ref.uri)
        return ref, bundle, model_card(ref, bundle)

    def _poll_alias(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                ref = pin(self.uri, self.tracking_uri)
                if ref.version != self.current[0].version:
                    self.current = self._load(ref)  # one assignment: a batch sees the old or the new model
            except Exception as err:  # noqa: BLE001 - a registry outage must not stop serving
                logger.warning("w2svd: alias poll of %s failed: %s", self.uri, err)

    def __del__(self):
        self._stop.set()

    def info(self) -> dict:
        return self.current[2]

    async def generate(self, request: VideoRequest) -> dict:
        return await self.generate_batch(request)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def generate_batch(self, requests: list[VideoRequest]) -> list[dict]:
        current = self.current  # one model for the whole batch, even if the alias moves meanwhile
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, current, requests)

    def _run(self, current, requests: list[VideoRequest]) -> list[dict]:
        from w2svd.data.video import encode_video

        ref, bundle, card = current
        limits = ModelLimits.from_card(card)
        results: list[dict | None] = [None] * len(requests)
        requests = list(requests)
        for i, r in enumerate(requests):  # the ingress checked against the card it saw; the model may have moved
            try:
                requests[i] = refit(r, limits)
            except RequestError as err:
                results[i] = {"error": {"status": 409, "field": err.field, "message": (
                    f"the served model changed to {ref.label}, which does not take this request: {err.message}")}}
        todo = [i for i, r in enumerate(requests) if results[i] is None]
        for group in group_by_shape([requests[i] for i in todo]):
            idx = [todo[j] for j in group]
            batch = [requests[i] for i in idx]
            timings: dict = {}
            try:
                clips = bundle.generate([r.prompt for r in batch], [r.seed for r in batch], batch[0].frames,
                                        batch[0].height, batch[0].width,
                                        [r.image for r in batch] if limits.image_to_video else None, timings=timings)
                start = time.perf_counter()
                videos = [encode_video(clip, bundle.fps, codec=self.codec) for clip in clips.numpy()]
                timings["mp4_s"] = time.perf_counter() - start
            except Exception as err:  # noqa: BLE001 - fail this group's requests, keep the replica
                logger.exception("w2svd: generation failed")
                for i in idx:
                    results[i] = {"error": {"status": 500, "field": None, "message": f"generation failed: {err}"}}
                continue
            model = {"name": ref.name, "version": ref.version, "uri": ref.pinned_uri}
            for i, video in zip(idx, videos):
                results[i] = {"video": video, "model": model, "timings": timings, "batch_size": len(idx)}
        return results


def application(model_uri: str, cfg: Config, tracking_uri: str | None = None,
                options: storage.StorageOptions | None = None):
    """The bound Serve application for ``model_uri`` with ``cfg.serve``'s settings."""
    from ray.serve.config import BackpressureConfig

    s = cfg.serve
    serve_dict = asdict(s)
    read_token(s)  # a configured but missing token file fails here, not in every replica
    backpressure = BackpressureConfig(status_code=503, retry_after_s=s.retry_after_s)
    scaling = ({"num_replicas": s.min_replicas} if s.max_replicas == s.min_replicas else
               {"autoscaling_config": {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                                       "target_ongoing_requests": s.target_ongoing_requests}})
    generator = serve.deployment(
        VideoGenerator, name="VideoGenerator", ray_actor_options={"num_gpus": s.num_gpus, "num_cpus": s.num_cpus},
        max_ongoing_requests=s.max_ongoing_requests, max_queued_requests=s.max_queued_requests,
        backpressure_config=backpressure, health_check_timeout_s=60, **scaling)
    api = serve.deployment(
        VideoAPI, name="VideoAPI", num_replicas=s.ingress_replicas, ray_actor_options={"num_cpus": 0.25},
        max_ongoing_requests=s.max_pending_jobs + 32, max_queued_requests=s.max_pending_jobs,
        backpressure_config=backpressure, health_check_period_s=2)  # a lost ingress is replaced in seconds
    if options is None and s.results_uri and storage.is_s3(s.results_uri):
        options = storage.StorageOptions.from_env()
    return api.bind(generator.bind(model_uri, tracking_uri, serve_dict), serve_dict, options)


BUILD_ARGS = ("model", "config", "tracking_uri", "overrides")


def build_app(args: dict):
    """``serve run pipelines.serve:build_app model=URI [config=NAME] [tracking_uri=URI]
    [overrides="serve.max_batch_size=2 …"]`` and a RayService's ``serveConfigV2`` args."""
    unknown = sorted(set(args) - set(BUILD_ARGS))
    if unknown or "model" not in args:
        raise ValueError(f"build_app args: need model=URI, may have {list(BUILD_ARGS[1:])}; got {sorted(args)}")
    overrides = args.get("overrides") or []
    cfg = load_config(args.get("config") or "debug", shlex.split(overrides) if isinstance(overrides, str) else overrides)
    tracking_uri = model_tracking_uri(args["model"], cfg, args.get("tracking_uri"))
    pin(args["model"], tracking_uri)  # a model that names nothing fails here, in one line
    return application(args["model"], cfg, tracking_uri)


# ---------------------------------------------------------------------------------------------
# Command line


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ValueError(f"cannot listen on {host}:{port}: {err.strerror}; choose another --port") from None


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="w2svd serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, an export folder or s3://")
    p.add_argument("--config", default="debug", help="config name or YAML path (its serve section)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's, $MLFLOW_TRACKING_URI, ./mlruns)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. serve.max_batch_size=8")
    return p


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        import ray

        from pipelines.startup import init_ray, require_local_gpus

        args = build_parser().parse_args(argv)
        cfg = load_config(args.config, args.overrides)
        tracking_uri = model_tracking_uri(args.model, cfg, args.tracking_uri)
        ref = pin(args.model, tracking_uri)
        app = application(args.model, cfg, tracking_uri)
        _check_port_free(args.host, args.port)
        started = init_ray(need_cpus=cfg.serve.num_cpus * cfg.serve.max_replicas)
        stop = threading.Event()
        # Both set explicitly: a process started in the background inherits SIGINT ignored.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        try:
            if started:
                require_local_gpus(cfg.serve.num_gpus, "serve.num_gpus")
            serve.start(http_options={"host": args.host, "port": args.port,
                                      "request_timeout_s": cfg.serve.request_timeout_s})
            serve.run(app, name=APP_NAME, route_prefix="/")
            url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
            auth = ' -H "Authorization: Bearer $TOKEN"' if read_token(cfg.serve) else ""
            print(f"[serve] {ref.label} is being served at {url} (Ctrl-C stops it)\n"
                  f"curl -s{auth} -H 'Content-Type: application/json' -d '{{\"prompt\": \"a person talking\", "
                  f"\"seed\": 1}}' {url}/v1/videos/sync -o video.mp4", flush=True)
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            print("[serve] shutting down", flush=True)
            try:
                if started:
                    serve.shutdown()
                else:
                    serve.delete(APP_NAME)
            finally:
                if started:
                    ray.shutdown()
        return 0

    return run_main("w2svd serve", body)


if __name__ == "__main__":
    sys.exit(main())
