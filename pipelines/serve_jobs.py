"""The Serve API's jobs (status + mp4) and its Prometheus-style metrics, per ingress replica.

A job lives in memory while it runs and for the last ``max_results_in_memory`` finished ones.
With ``results_uri`` set (a folder or ``s3://``) every state change is also written there
(``jobs/<id>.json``, ``videos/<id>.mp4``), so another ingress replica, or this one restarted,
still answers for it. A job read back from storage that never finished and whose deadline has
passed is reported failed: the replica that ran it stopped.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

from w2svd.data import storage

JOB_ID = re.compile(r"^video_[0-9a-f]{32}$")
QUEUED, RUNNING, COMPLETED, FAILED = "queued", "in_progress", "completed", "failed"
TERMINAL = (COMPLETED, FAILED)


@dataclass
class Job:
    id: str
    request: dict
    created_at: float
    deadline: float
    status: str = QUEUED
    started_at: float | None = None
    completed_at: float | None = None
    model: dict | None = None
    timings: dict = field(default_factory=dict)
    batch_size: int | None = None
    error: dict | None = None

    def to_json(self) -> dict:
        """The API's view (OpenAI-style video object)."""
        out = {"id": self.id, "object": "video", "status": self.status, "created_at": self.created_at,
               "completed_at": self.completed_at, **{k: v for k, v in self.request.items()},
               "model": (self.model or {}).get("name"), "model_version": (self.model or {}).get("version"),
               "timings": self.timings, "batch_size": self.batch_size, "error": self.error}
        if self.status == COMPLETED:
            out["content_url"] = f"/v1/videos/{self.id}/content"
        return out


class JobStore:
    def __init__(self, results_uri: str | None = None, max_in_memory: int = 256,
                 options: storage.StorageOptions | None = None):
        self.results_uri = results_uri
        self.max_in_memory = max_in_memory
        self.options = options
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._videos: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def create(self, request: dict, timeout_s: float) -> Job:
        now = time.time()
        job = Job(f"video_{uuid.uuid4().hex}", request, now, now + timeout_s)
        with self._lock:
            self._jobs[job.id] = job
        return job

    def pending(self) -> int:
        with self._lock:
            return sum(j.status not in TERMINAL for j in self._jobs.values())

    def finish(self, job: Job, video: bytes | None = None) -> None:
        with self._lock:
            if video is not None:
                self._videos[job.id] = video
            finished = [k for k, j in self._jobs.items() if j.status in TERMINAL]
            for key in finished[: max(0, len(finished) - self.max_in_memory)]:
                del self._jobs[key]
                self._videos.pop(key, None)

    # Storage (blocking: the API calls these in a worker thread)

    def _uri(self, kind: str, job_id: str) -> str:
        return storage.join(self.results_uri, kind, f"{job_id}.{'json' if kind == 'jobs' else 'mp4'}")

    def save(self, job: Job, video: bytes | None = None) -> None:
        if not self.results_uri:
            return
        if video is not None:  # the video first: a job that says completed always has its content
            storage.write_bytes(self._uri("videos", job.id), video, self.options)
        storage.write_json(self._uri("jobs", job.id), asdict(job), self.options)

    def get(self, job_id: str) -> Job | None:
        if not JOB_ID.match(job_id):
            return None
        with self._lock:
            job = self._jobs.get(job_id)
        if job is not None or not self.results_uri:
            return job
        raw = storage.read_json(self._uri("jobs", job_id), self.options)
        if raw is None:
            return None
        job = Job(**raw)
        if job.status not in TERMINAL and time.time() > job.deadline:
            job.status, job.completed_at = FAILED, job.deadline
            job.error = {"message": "the replica running this job stopped before it finished; submit it again",
                         "status": 500}
        return job

    def video(self, job_id: str) -> bytes | None:
        with self._lock:
            data = self._videos.get(job_id)
        if data is None and self.results_uri and JOB_ID.match(job_id):
            uri = self._uri("videos", job_id)
            data = storage.read_bytes(uri, self.options) if storage.exists(uri, self.options) else None
        return data


# ---------------------------------------------------------------------------------------------
# Metrics in Prometheus' text format (per ingress replica; each replica's /metrics is its own).

SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.counters: dict[tuple[str, tuple], float] = {}
        self.histograms: dict[tuple[str, tuple], list] = {}  # → [bucket counts..., sum, count]
        self.gauges: dict[tuple[str, tuple], float] = {}
        self.help: dict[str, tuple[str, str]] = {}

    def _key(self, name: str, kind: str, help_: str, labels: dict) -> tuple[str, tuple]:
        self.help.setdefault(name, (kind, help_))
        return name, tuple(sorted(labels.items()))

    # Positional-only names, so that a label may be called "name" too.
    def inc(self, name: str, help_: str, value: float = 1.0, /, **labels) -> None:
        with self._lock:
            key = self._key(name, "counter", help_, labels)
            self.counters[key] = self.counters.get(key, 0.0) + value

    def set(self, name: str, help_: str, value: float, /, only: bool = False, **labels) -> None:
        """Set a gauge; ``only``: drop its other label sets (an info metric whose labels changed)."""
        with self._lock:
            if only:
                self.gauges = {k: v for k, v in self.gauges.items() if k[0] != name}
            self.gauges[self._key(name, "gauge", help_, labels)] = float(value)

    def observe(self, name: str, help_: str, value: float, /, buckets=SECONDS_BUCKETS, **labels) -> None:
        with self._lock:
            key = self._key(name, "histogram", help_, labels)
            hist = self.histograms.setdefault(key, [0] * len(buckets) + [0.0, 0, tuple(buckets)])
            for i, edge in enumerate(buckets):
                hist[i] += value <= edge
            hist[-3] += value
            hist[-2] += 1

    def render(self) -> str:
        def fmt(labels: tuple, extra: tuple = ()) -> str:
            items = [*labels, *extra]
            return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in items) + "}" if items else ""

        lines: list[str] = []
        with self._lock:
            for name, (kind, help_) in sorted(self.help.items()):
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
                for (n, labels), value in sorted((self.counters | self.gauges).items()):
                    if n == name:
                        lines.append(f"{name}{fmt(labels)} {value:g}")
                for (n, labels), hist in sorted(self.histograms.items()):
                    if n != name:
                        continue
                    buckets = hist[-1]
                    for i, edge in enumerate(buckets):
                        lines.append(f"{name}_bucket{fmt(labels, (('le', f'{edge:g}'),))} {hist[i]}")
                    lines.append(f"{name}_bucket{fmt(labels, (('le', '+Inf'),))} {hist[-2]}")
                    lines.append(f"{name}_sum{fmt(labels)} {hist[-3]:g}")
                    lines.append(f"{name}_count{fmt(labels)} {hist[-2]}")
        return "\n".join(lines) + "\n"


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
