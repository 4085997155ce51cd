"""Fixtures of the registry tests: a real ``mlflow server`` (SQLite store + artifact root) on
127.0.0.1, and generator exports that differ in a way the evaluation can measure."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from w2svd.config import load_config
from w2svd.export import sampler_settings_for, save_generator_export
from w2svd.models.hunyuan import build_backbone
from w2svd.schedule import student_sigmas


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` with a SQLite backend and a proxied file artifact root; yields its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", (root / "artifacts").as_uri()],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"mlflow server did not become healthy: {(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory):
    """Domain encoders trained by the evaluation go here, not into the user's cache."""
    path = tmp_path_factory.mktemp("w2svd-cache")
    saved = os.environ.get("W2SVD_CACHE_DIR")
    os.environ["W2SVD_CACHE_DIR"] = str(path)
    yield path
    if saved is None:
        os.environ.pop("W2SVD_CACHE_DIR", None)
    else:
        os.environ["W2SVD_CACHE_DIR"] = saved


def _with_steps(settings, steps: int, mode: str, method: str):
    sigmas = [float(s) for s in student_sigmas(steps, settings.shift)]
    return dataclasses.replace(settings, steps=steps, sigmas=sigmas, mode=mode, method=method)


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> dict[str, str]:
    """Three exports of the debug architecture:

    base:   the tiny teacher weights with the 4-step student sampler;
    better: the same weights sampled like the teacher reference (8 Euler steps);
    worse:  the weights drowned in noise (10x their own scale) with a 1-step sampler.
    """
    cfg = load_config("debug")
    root = tmp_path_factory.mktemp("exports")
    backbone = build_backbone(cfg.model)
    student = sampler_settings_for(cfg)
    out = {
        "base": save_generator_export(backbone, root / "base", student, cfg),
        "better": save_generator_export(backbone, root / "better", _with_steps(student, 8, "euler", "euler"), cfg),
    }
    noisy = build_backbone(cfg.model)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in noisy.parameters():
            scale = p.std().nan_to_num(0.02).clamp_min(0.02) if p.numel() > 1 else torch.tensor(0.02)
            p.add_(torch.randn(p.shape, generator=g) * scale * 10)
    out["worse"] = save_generator_export(noisy, root / "worse", _with_steps(student, 1, "renoise", "w2svd"), cfg)
    return {k: str(v) for k, v in out.items()}
