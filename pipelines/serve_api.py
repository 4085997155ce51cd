"""The HTTP API of the Serve application: the FastAPI ingress in front of the generator deployment.

    POST /v1/videos                  JSON {prompt, image?, steps?, seed?, frames?, height?, width?}
                                     → 202 + the job (id, status); the video is made in the background
    POST /v1/videos/sync             same body → 200 video/mp4 once generated (X-Video-Id header);
                                     for small requests, bounded by serve.request_timeout_s (504)
    GET  /v1/videos/{id}             the job: status, request, model version, timings, error
    GET  /v1/videos/{id}/content     the mp4 (409 while not completed)
    GET  /v1/models                  name, version, alias, sampler settings, allowed steps and sizes
    GET  /healthz                    200 once the generator answers (never needs a token)
    GET  /metrics                    Prometheus text format (this ingress replica's counters)

Errors are JSON ``{"error": {"message", "field", "type", "status"}}``: bad input is a 4xx naming
the field, a full service 503 with ``Retry-After``. With a token configured (``serve.auth_token_env``
or ``serve.auth_token_file``) every route but ``/healthz`` needs ``Authorization: Bearer TOKEN``.
"""

# No ``from __future__ import annotations`` here: FastAPI must see the real ``Request`` type on
# the route methods that Serve rebinds, not a string.
import asyncio
import hmac
import logging
import os
import secrets
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError

from pipelines.serve_jobs import BATCH_BUCKETS, COMPLETED, FAILED, RUNNING, JobStore, Metrics
from pipelines.serve_requests import (
    Limits,
    ModelLimits,
    RequestError,
    parse_json_body,
    parse_video_request,
)
from w2svd.config import ServeConfig, from_dict

app = FastAPI(title="w2svd video generation", version="1",
              description="OpenAI-style /v1/videos over a W2SVD few-step generator")
logger = logging.getLogger("ray.serve")
MODEL_INFO_TTL_S = 2.0  # how stale /v1/models and validation may be after the model changes
BUSY_RETRY_S = 0.25  # a queued job's wait between tries while every generator is full


def read_token(s: ServeConfig) -> str | None:
    """The bearer token, from the configured file or environment variable (never the config)."""
    if s.auth_token_file:
        path = Path(s.auth_token_file)
        token = path.read_text().strip() if path.is_file() else ""
        if not token:  # a configured but unreadable token must not silently open the API
            raise ValueError(f"serve.auth_token_file = {s.auth_token_file!r} is missing or empty")
        return token
    return os.environ.get(s.auth_token_env or "", "").strip() or None


def _error(err: RequestError, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return JSONResponse(err.to_json(), status_code=err.status, headers=headers)


@serve.ingress(app)
class VideoAPI:
    def __init__(self, generator, serve_cfg: dict, storage_options=None):
        self.s = from_dict(ServeConfig, serve_cfg)
        self.generator = generator
        self.token = read_token(self.s)
        self.limits = Limits.from_config(self.s)
        self.jobs = JobStore(self.s.results_uri, self.s.max_results_in_memory, storage_options)
        self.metrics = Metrics()
        self._card: dict | None = None
        self._card_at = 0.0
        self._refresh: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ plumbing

    async def _serve(self, route: str, request: Request, work, open_route: bool = False) -> Response:
        """Auth, then ``work()``; a ``RequestError`` becomes its JSON error. Counts every answer."""
        start = time.perf_counter()
        try:
            if not open_route:
                self._check_token(request)
            response = await work()
        except RequestError as err:
            response = _error(err, self.s.retry_after_s if err.status == 503 else None)
        self.metrics.inc("w2svd_http_requests_total", "HTTP requests by route and status", route=route,
                         status=response.status_code)
        self.metrics.observe("w2svd_http_request_seconds", "HTTP request latency", time.perf_counter() - start,
                             route=route)
        return response

    def _check_token(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise RequestError(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)", "authorization")

    async def _fetch_card(self) -> None:
        try:
            self._card = await asyncio.wait_for(self.generator.info.remote(), timeout=30)
            self._card_at = time.monotonic()
        except Exception:  # noqa: BLE001 - a busy or restarting generator: keep the last card
            pass

    async def _model_card(self) -> dict:
        """The generator's model card, refreshed in the background every few seconds."""
        stale = time.monotonic() - self._card_at > MODEL_INFO_TTL_S
        if stale and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.create_task(self._fetch_card())
        if self._card is None:
            await asyncio.wait({self._refresh}, timeout=30)
        if self._card is None:
            raise RequestError(503, "the model is still loading; try again shortly")
        return self._card

    async def _parse(self, request: Request):
        if int(request.headers.get("content-length") or 0) > self.s.max_body_bytes:
            raise RequestError(413, f"body is larger than {self.s.max_body_bytes} bytes", "body")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.s.max_body_bytes:
                raise RequestError(413, f"body is larger than {self.s.max_body_bytes} bytes", "body")
        body = parse_json_body(bytes(raw), request.headers.get("content-type"), self.s.max_body_bytes)
        card = await self._model_card()
        parsed = await asyncio.to_thread(parse_video_request, body, ModelLimits.from_card(card), self.limits,
                                         default_seed=lambda: secrets.randbelow(2**31))
        return parsed

    def _admit(self, parsed):
        pending = self.jobs.pending()
        self.metrics.set("w2svd_jobs_pending", "unfinished jobs on this ingress replica", pending)
        if pending >= self.s.max_pending_jobs:
            self.metrics.inc("w2svd_rejected_total", "requests refused because the service was full",
                             reason="pending_jobs")
            raise RequestError(503, f"{pending} jobs are waiting; the service is full, try again later")
        return self.jobs.create(parsed.describe(), self.s.request_timeout_s)

    async def _generate(self, job, parsed, retry_when_busy: bool) -> bytes:
        """Run ``job`` on a generator replica until done, failed or past its deadline."""
        job.status, job.started_at = RUNNING, time.time()
        while True:
            remaining = job.deadline - time.time()
            response = self.generator.generate.remote(parsed)
            try:
                result = await asyncio.wait_for(response, timeout=max(0.01, remaining))
                break
            except BackPressureError:
                if not retry_when_busy or time.time() + BUSY_RETRY_S > job.deadline:
                    self.metrics.inc("w2svd_rejected_total", "requests refused because the service was full",
                                     reason="generator_queue")
                    raise RequestError(503, "every generator replica is busy; try again later") from None
                await asyncio.sleep(BUSY_RETRY_S)
            except asyncio.TimeoutError:
                response.cancel()
                raise RequestError(504, f"not finished within serve.request_timeout_s = "
                                        f"{self.s.request_timeout_s:g} s") from None
        if result.get("error"):
            err = result["error"]
            raise RequestError(err["status"], err["message"], err.get("field"))
        job.model, job.timings, job.batch_size = result["model"], result["timings"], result["batch_size"]
        self.metrics.observe("w2svd_batch_size", "requests per sampler call", result["batch_size"],
                             buckets=BATCH_BUCKETS)
        for phase, seconds in result["timings"].items():
            self.metrics.inc("w2svd_phase_seconds_total", "seconds per generation phase (per batch)", seconds,
                             phase=phase.removesuffix("_s"))
        return result["video"]

    async def _run(self, job, parsed, retry_when_busy: bool) -> bytes:
        video = None
        try:
            video = await self._generate(job, parsed, retry_when_busy)
            job.status = COMPLETED
            return video
        except RequestError as err:
            job.status, job.error = FAILED, err.to_json()["error"]
            raise
        except Exception as err:  # noqa: BLE001 - a generator bug fails this job, not the service
            job.status, job.error = FAILED, {"message": f"generation failed: {err}", "status": 500}
            raise RequestError(500, f"generation failed: {err}") from None
        finally:
            job.completed_at = time.time()
            self.jobs.finish(job, video)
            self.metrics.inc("w2svd_jobs_total", "finished jobs by status", status=job.status)
            self.metrics.observe("w2svd_job_seconds", "job latency, queue to finish", job.completed_at - job.created_at)
            await self._save(job, video)

    async def _save(self, job, video: bytes | None = None) -> bool:
        """Write the job to ``results_uri``; an outage there is counted and logged, and the job
        stays answerable from this replica's memory."""
        try:
            await asyncio.to_thread(self.jobs.save, job, video)
            return True
        except Exception as err:  # noqa: BLE001
            logger.warning("w2svd: cannot write job %s to %s: %s", job.id, self.s.results_uri, err)
            self.metrics.inc("w2svd_storage_errors_total", "failed writes to serve.results_uri")
            return False

    async def _background(self, job, parsed) -> None:
        try:
            await self._run(job, parsed, retry_when_busy=True)
        except RequestError:
            pass  # recorded on the job

    # ------------------------------------------------------------------ routes

    @app.get("/healthz")
    async def healthz(self, request: Request):
        async def work():
            card = await self._model_card()
            return JSONResponse({"status": "ok", "model": card["name"], "version": card["version"]})
        return await self._serve("/healthz", request, work, open_route=True)

    @app.get("/v1/models")
    async def models(self, request: Request):
        async def work():
            return JSONResponse({"object": "list", "data": [await self._model_card()]})
        return await self._serve("/v1/models", request, work)

    @app.post("/v1/videos")
    async def create(self, request: Request):
        async def work():
            parsed = await self._parse(request)
            job = self._admit(parsed)
            await self._save(job)
            task = asyncio.create_task(self._background(job, parsed))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return JSONResponse(job.to_json(), status_code=202, headers={"Location": f"/v1/videos/{job.id}"})
        return await self._serve("/v1/videos", request, work)

    @app.post("/v1/videos/sync")
    async def create_sync(self, request: Request):
        async def work():
            parsed = await self._parse(request)
            job = self._admit(parsed)
            video = await self._run(job, parsed, retry_when_busy=False)
            return Response(video, media_type="video/mp4",
                            headers={"X-Video-Id": job.id, "X-Model-Version": str(job.model["version"])})
        return await self._serve("/v1/videos/sync", request, work)

    async def _job(self, video_id: str):
        try:
            job = await asyncio.to_thread(self.jobs.get, video_id)
        except Exception as err:  # noqa: BLE001 - results storage unreachable: the service is degraded
            raise RequestError(503, f"job storage is unavailable: {err}") from None
        if job is None:
            raise RequestError(404, f"no video job {video_id!r} (unknown, or expired from this replica)", "id")
        return job

    @app.get("/v1/videos/{video_id}")
    async def status(self, video_id: str, request: Request):
        async def work():
            return JSONResponse((await self._job(video_id)).to_json())
        return await self._serve("/v1/videos/{id}", request, work)

    @app.get("/v1/videos/{video_id}/content")
    async def content(self, video_id: str, request: Request):
        async def work():
            job = await self._job(video_id)
            if job.status != COMPLETED:
                raise RequestError(409, f"video {video_id} is {job.status}; its content exists once completed", "id")
            try:
                video = await asyncio.to_thread(self.jobs.video, video_id)
            except Exception as err:  # noqa: BLE001
                raise RequestError(503, f"job storage is unavailable: {err}") from None
            if video is None:
                raise RequestError(404, f"the content of {video_id} has expired from this replica", "id")
            return Response(video, media_type="video/mp4")
        return await self._serve("/v1/videos/{id}/content", request, work)

    @app.get("/metrics")
    async def prometheus(self, request: Request):
        async def work():
            self.metrics.set("w2svd_jobs_pending", "unfinished jobs on this ingress replica", self.jobs.pending())
            if self._card:
                self.metrics.set("w2svd_model_info", "the model version served (value 1)", 1, only=True,
                                 name=self._card["name"], version=self._card["version"])
            return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")
        return await self._serve("/metrics", request, work)
