"""Fixtures of the registry tests (the ``mlflow server`` and the generator exports are in
``tests/conftest.py``, shared with the serving tests)."""

from __future__ import annotations

import os

import pytest


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
