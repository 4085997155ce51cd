"""User errors end a command with one line on stderr and exit status 2, never a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def w2svd(*args: str, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_a_missing_path(tmp_path):
    result = w2svd("distill", "--data", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "run"))
    assert_one_line_error(result, "w2svd distill: error:", "no latent shards", "w2svd preencode")


def test_an_unknown_model_uri(tmp_path):
    result = w2svd("evaluate", "--model", str(tmp_path / "no-export"), "--out", str(tmp_path / "r.json"))
    assert_one_line_error(result, "w2svd evaluate: error:", "neither a registry URI")
    registry = w2svd("evaluate", "--model", "models:/w2svd-generator@champion", "--out", str(tmp_path / "r.json"),
                     env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert_one_line_error(registry, "models:/w2svd-generator@champion")


def test_an_empty_bucket(s3_server, tmp_path):
    import boto3

    boto3.client("s3").create_bucket(Bucket="empty-raw")
    result = w2svd("preencode", "--input", "s3://empty-raw/clips", "--output", str(tmp_path / "out"))
    assert_one_line_error(result, "nothing to pre-encode", "s3://empty-raw/clips")


@pytest.mark.parametrize("args", [["distill", "--data", "x", "--run-dir", "y", "--bogus"], ["promote", "--dry-rn"]])
def test_a_bad_flag(args):
    assert_one_line_error(w2svd(*args), "unrecognized arguments")


def test_a_bad_config_value():
    assert_one_line_error(w2svd("config", "debug", "method.alpha_weak=2"), "method.alpha_weak")
    assert_one_line_error(w2svd("distill", "--data", "x", "--run-dir", "y", "method.nmae=w2svd"), "['nmae'] in method",
                          "allowed")
