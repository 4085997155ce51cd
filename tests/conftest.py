"""Shared fixtures. Heavy services (Ray, S3-compatible server, MLflow) start once per session."""

from __future__ import annotations

import os

# Before any import of diffusers/transformers/ray: no hub access, Ray on loopback.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import dataclasses  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------
# Session services shared by pipeline tests: an S3-compatible server and one local Ray.


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP endpoint (moto's server) on 127.0.0.1; yields its URL.

    Sets AWS_ENDPOINT_URL and dummy credentials for the whole session, so boto3, s3fs,
    pyarrow and Ray's own S3 access all reach it. Create buckets with boto3 as needed.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray for the session (ray.init costs seconds): 4 logical CPUs, no dashboard."""
    import ray

    if ray.is_initialized():  # someone else's session-wide Ray: reuse, do not shut down
        yield ray
        return
    # Ray's socket paths must stay short (107 bytes), so not under pytest's deep tmp dirs.
    import tempfile

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})
    try:
        yield ray
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------------------------
# A real MLflow server and tiny generator exports, shared by the registry and serving tests.


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


def _with_steps(settings, steps: int, mode: str, method: str):
    from w2svd.schedule import student_sigmas

    sigmas = [float(s) for s in student_sigmas(steps, settings.shift)]
    return dataclasses.replace(settings, steps=steps, sigmas=sigmas, mode=mode, method=method)


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> dict[str, str]:
    """Three exports of the debug architecture:

    base:   the tiny teacher weights with the 4-step student sampler;
    better: the same weights sampled like the teacher reference (8 Euler steps);
    worse:  the weights drowned in noise (10x their own scale) with a 1-step sampler.
    """
    from w2svd.config import load_config
    from w2svd.export import sampler_settings_for, save_generator_export
    from w2svd.models.hunyuan import build_backbone

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
