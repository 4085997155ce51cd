"""``w2svd serve`` as a user runs it: in the foreground until Ctrl-C, which leaves nothing running;
a model or port it cannot use is a one-line error before anything starts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import requests
from serve_helpers import free_port, port_open, wait_for

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    env.pop("W2SVD_SERVE_TOKEN", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def test_serve_in_the_foreground_until_ctrl_c_leaves_nothing_running(exports, tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--model", exports["base"],
                             "--port", str(port), "serve.alias_poll_s=0"],
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy():
            if proc.poll() is not None:
                raise AssertionError(f"w2svd serve exited {proc.returncode}:\n{''.join(lines)[-3000:]}")
            try:
                return requests.get(f"{url}/healthz", timeout=5).status_code == 200
            except requests.RequestException:
                return False
        wait_for(healthy, 240, "w2svd serve to answer /healthz", every=0.5)
        wait_for(lambda: any("curl" in line for line in lines), 30, "the ready curl line")
        r = requests.post(f"{url}/v1/videos/sync", json={"prompt": "a person talking", "seed": 1}, timeout=120)
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
        started = [p for p in psutil.Process(proc.pid).children(recursive=True)]
        assert started, "serve started no Ray processes?"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, "".join(lines)[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(timeout=10)

    def all_gone():
        return not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    wait_for(all_gone, 60, "every process the server started to exit")
    assert not port_open(port)
    assert "shutting down" in "".join(lines)


def test_a_model_or_port_it_cannot_use_is_a_one_line_error(exports, tmp_path, capsys, monkeypatch):
    from pipelines import serve

    monkeypatch.chdir(tmp_path)
    assert serve.main(["--model", str(tmp_path / "no-export")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("w2svd serve: error:") and "no-export" in line
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert serve.main(["--model", exports["base"], "--port", str(busy.getsockname()[1])]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("w2svd serve: error:") and "--port" in line
