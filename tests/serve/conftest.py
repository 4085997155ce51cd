"""Fixtures of the serving tests: the tiny export registered in the session's real MLflow server."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def registry(request, mlflow_server, exports):
    """The base export registered under a model name of this module's own, alias champion."""
    from mlflow.tracking import MlflowClient

    from pipelines.registry import register_export

    name = f"w2svd-{request.module.__name__.rsplit('.', 1)[-1].replace('_', '-')}"
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    client = MlflowClient(tracking_uri=mlflow_server)
    v1 = register_export(exports["base"], name=name, tracking_uri=mlflow_server)
    client.set_registered_model_alias(name, "champion", v1.version)
    yield {"uri": mlflow_server, "client": client, "name": name, "v1": v1.version, "exports": exports}
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved
