"""`ray job submit` end to end, as docs/operations.md runs it: a head from `ray start` on
127.0.0.1 (token authentication on, its own token), pre-encode and then a short distillation
submitted with `--runtime-env ray_job.yaml`, their status, logs and outputs where the guide says,
what was uploaded, and nothing left running after the head is stopped.

The head runs under its own session (`setsid`), so exactly its processes are stopped: a
machine-wide `ray stop` would also stop other people's Ray instances on a shared machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipelines import synth_data

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PORT_FLAGS = ("port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
              "metrics-export-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "runtime-env-agent-port")
START_TIMEOUT_S = 300
JOB_TIMEOUT_S = 900

pytestmark = pytest.mark.timeout(2 * JOB_TIMEOUT_S + START_TIMEOUT_S)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (held open together while they are picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def session_processes(sid: int) -> list[int]:
    """Live processes of session ``sid`` (zombies have exited: they only wait to be reaped)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) != sid:
                    continue
                with open(f"/proc/{entry}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except (ProcessLookupError, PermissionError, FileNotFoundError):
                continue
            if state != "Z":
                out.append(int(entry))
    return out


@dataclass
class Head:
    address: str
    env: dict
    temp_dir: Path
    process: subprocess.Popen

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def submit(self, submission_id: str, entrypoint: list[str]) -> subprocess.CompletedProcess:
        """The guide's command: blocks until the job ends, streaming its logs."""
        return self.ray("job", "submit", "--address", self.address, "--submission-id", submission_id,
                        "--runtime-env", "ray_job.yaml", "--", *entrypoint, timeout=JOB_TIMEOUT_S)

    def succeeded(self, submission_id: str) -> bool:
        out = self.ray("job", "status", "--address", self.address, "--log-style=record", "--log-color=false",
                       submission_id)
        return f"Job '{submission_id}' succeeded" in out.stdout + out.stderr


@pytest.fixture
def ray_head():
    # Unix socket paths under the temp dir must stay short (about 100 characters).
    temp_dir = Path(tempfile.mkdtemp(prefix="w2svd-rj-", dir="/tmp"))
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           # Token authentication as `ray start` enables it, with a token of this head's own
           # (~/.ray/auth_token is shared with whoever else starts Ray here).
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(temp_dir / "head.log", "w")
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=4", f"--temp-dir={temp_dir}",
           "--disable-usage-stats", *(f"--{flag}={port}" for flag, port in ports.items())]
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(f"http://127.0.0.1:{ports['dashboard-port']}", env, temp_dir, process)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while head.ray("job", "list", "--address", head.address, timeout=60).returncode != 0:
            assert process.poll() is None, f"ray start exited: {(temp_dir / 'head.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"head not up after {START_TIMEOUT_S} s"
            time.sleep(2)
        print(f"head up: {START_TIMEOUT_S - (deadline - time.monotonic()):.0f} s")
        yield head
    finally:
        sid = process.pid  # start_new_session: the session id is the leader's pid
        for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 30)):
            try:
                os.killpg(sid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while process.poll() is None or session_processes(sid):  # poll() reaps the leader
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            if not session_processes(sid):
                break
        process.wait(timeout=30)
        log.close()
        left = session_processes(sid)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert left == [], f"processes of the stopped head still running: {left}"


def test_preencode_then_distill_as_ray_jobs(ray_head, tmp_path):
    raw, latents, run = tmp_path / "raw", tmp_path / "latents", tmp_path / "run"
    assert synth_data.main(["--out", str(raw), "--clips", "4", "--seed", "3", "--portrait-size", "54x96",
                            "--landscape-size", "96x54", "--frames", "9", "--fps", "8"]) == 0
    tag = secrets.token_hex(3)

    pre = f"w2svd-preencode-{tag}"
    t0 = time.monotonic()
    out = ray_head.submit(pre, ["python", "-m", "pipelines.preencode", "--input", str(raw), "--output", str(latents),
                                "data.shard_rows=2", "data.encode_batch_size=2"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert ray_head.succeeded(pre)
    print(f"pre-encode job: {time.monotonic() - t0:.0f} s")
    summary = json.loads((latents / "_summary.json").read_text())
    assert summary["encoded"] == 4 and summary["quarantined"] == 0, summary
    assert (latents / "_manifest.json").is_file()

    dist = f"w2svd-distill-{tag}"
    t0 = time.monotonic()
    out = ray_head.submit(dist, ["python", "-m", "pipelines.distill", "--config", "debug", "--data", str(latents),
                                 "--run-dir", str(run), "optim.steps=2", "optim.checkpoint_every=2",
                                 "parallel.num_workers=1", "tracking.log_samples=false"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert ray_head.succeeded(dist)
    print(f"distill job: {time.monotonic() - t0:.0f} s")
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "finished" and result["steps"] == 2, result
    assert (run / "export").is_dir() and result["checkpoint"]

    # The drivers' output: `ray job logs ID`, and on the head under the session's logs folder.
    logs = ray_head.temp_dir / "session_latest" / "logs"
    for job, marker in ((pre, "completed"), (dist, '"status": "finished"')):
        assert marker in ray_head.ray("job", "logs", "--address", ray_head.address, job).stdout
        assert marker in (logs / f"job-driver-{job}.log").read_text()

    # What ray_job.yaml uploaded: the code, not the virtualenv, runs, caches or git history.
    packages = [p for p in (ray_head.temp_dir / "session_latest" / "runtime_resources" / "working_dir_files").iterdir()
                if p.is_dir()]
    assert packages, "no working_dir package on the head"
    for package in packages:
        names = {p.relative_to(package).parts[0] for p in package.rglob("*")}
        assert {"w2svd", "pipelines", "ray_job.yaml"} <= names, names
        assert not names & {".venv", ".git", "runs", "mlruns", "tests", "docs", ".pytest_cache"}, names
        # Weights stay out, except the committed portrait world's (w2svd/worlds/).
        weights = {p.relative_to(package).parts[:2] for p in package.rglob("*.safetensors")}
        assert weights == {("w2svd", "worlds")}, weights
        size = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
        assert size < 20 * 2**20, f"uploaded {size / 2**20:.1f} MiB"
