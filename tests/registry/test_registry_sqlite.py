"""Promotion on the default local store (``sqlite:///…``, the registry's fallback without a
server): its model versions are integers where the REST client's are strings."""

from __future__ import annotations

import os

import pytest

from pipelines import cli
from w2svd.config import load_config
from w2svd.evalset import build_evalset
from w2svd.metrics.domain import ensure_domain_encoder

NAME = "w2svd-generator"


@pytest.fixture
def sqlite_store(tmp_path, eval_cache):
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    yield os.environ["MLFLOW_TRACKING_URI"]
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved


def _record(client, version: str, metrics: dict) -> None:
    """Evaluation results on a version, as `w2svd evaluate` records them (promotion reuses them
    for the same evaluation set, so this test spends no time generating clips)."""
    cfg = load_config("debug")
    _, sha = ensure_domain_encoder(cfg.eval)
    client.set_model_version_tag(NAME, version, "eval.set", build_evalset(cfg.eval).with_domain_encoder(sha).fingerprint())
    for key, value in metrics.items():
        client.set_model_version_tag(NAME, version, f"eval.{key}", repr(value))


def test_register_and_promote_against_a_champion_on_a_local_sqlite_store(sqlite_store, exports, capsys):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=sqlite_store)
    good = {"fvd/domain": 10.0, "dynamic_degree": 0.5, "temporal_flickering": 0.95, "face_detection_rate": 0.9}
    assert cli.main(["register", "--export", exports["base"]]) == 0
    _record(client, "1", good)
    assert cli.main(["promote"]) == 0  # first version: absolute gates only
    assert cli.main(["register", "--export", exports["better"]]) == 0
    _record(client, "2", {**good, "fvd/domain": 9.0})
    # Against a champion: the comparison, the history and the log line read the SQL store's versions.
    assert cli.main(["promote"]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    assert "promoted to champion (compared to v1)" in out.out
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    assert cli.main(["rollback"]) == 0
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
