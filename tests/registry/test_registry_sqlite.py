"""Promotion on the default local store (``sqlite:///…``, the registry's fallback without a
server): its model versions are integers where the REST client's are strings."""

from __future__ import annotations

import os

import pytest

from pipelines import cli

FAST = ["eval.num_prompts=2", "eval.batch_size=2"]


@pytest.fixture
def sqlite_store(tmp_path, ray_local, eval_cache):
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    yield os.environ["MLFLOW_TRACKING_URI"]
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved


def test_register_and_promote_twice_on_a_local_sqlite_store(sqlite_store, exports, capsys):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=sqlite_store)
    assert cli.main(["register", "--export", exports["base"]]) == 0
    client.set_registered_model_alias("w2svd-generator", "champion", "1")  # as an operator would
    assert cli.main(["register", "--export", exports["better"]]) == 0
    # Against a champion: the comparison, the history and the log line read the SQL store's versions.
    assert cli.main(["promote", *FAST]) in (0, 3)
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    assert "compared to v1" in out.out
    decision = client.get_model_version("w2svd-generator", "2").tags["promotion.decision"]
    assert decision in ("promoted", "rejected")
    assert str(client.get_model_version_by_alias("w2svd-generator", "champion").version) == \
        ("2" if decision == "promoted" else "1")
