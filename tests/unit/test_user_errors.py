"""User errors end a command with one line on stderr and exit status 2, never a traceback.

Two cases run as real processes (what a user sees, library import noise included); the others
call the same ``main`` in-process, which is what the process runs.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import cli

REPO = Path(__file__).resolve().parents[2]


def w2svd(*args: str, env: dict | None = None) -> tuple[int, str]:
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=300)
    return result.returncode, result.stderr


def in_process(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(list(args))
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2, (code, stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_a_missing_path(tmp_path):
    code, err = w2svd("distill", "--data", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "run"))
    assert_one_line_error(code, err, "w2svd distill: error:", "no latent shards", "w2svd preencode")


def test_an_unknown_model_uri(tmp_path, capsys):
    code, err = w2svd("evaluate", "--model", str(tmp_path / "no-export"), "--out", str(tmp_path / "r.json"))
    assert_one_line_error(code, err, "w2svd evaluate: error:", "neither a registry URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        code, err = in_process(capsys, "evaluate", "--model", "models:/w2svd-generator@champion",
                               "--out", str(tmp_path / "r.json"))
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
    assert_one_line_error(code, err, "models:/w2svd-generator@champion")


def test_an_empty_bucket(s3_server, tmp_path, capsys):
    import boto3

    boto3.client("s3").create_bucket(Bucket="empty-raw")
    code, err = in_process(capsys, "preencode", "--input", "s3://empty-raw/clips", "--output", str(tmp_path / "out"))
    assert_one_line_error(code, err, "nothing to pre-encode", "s3://empty-raw/clips")


@pytest.mark.parametrize("args", [["distill", "--data", "x", "--run-dir", "y", "--bogus"], ["promote", "--dry-rn"]])
def test_a_bad_flag(args, capsys):
    assert_one_line_error(*in_process(capsys, *args), "unrecognized arguments")


def test_a_bad_config_value(capsys):
    assert_one_line_error(*in_process(capsys, "config", "debug", "method.alpha_weak=2"), "method.alpha_weak")
    assert_one_line_error(*in_process(capsys, "distill", "--data", "x", "--run-dir", "y", "method.nmae=w2svd"),
                          "['nmae'] in method", "allowed")
