"""Fixtures of the training tests: latent shards in the pre-encode layout, an MLflow store."""

from __future__ import annotations

import pytest

from w2svd.config import load_config
from w2svd.data.synthetic_latents import write_synthetic_latents


def write_latent_shards(uri: str) -> str:
    return write_synthetic_latents(uri, load_config("debug"), clips_per_bucket=8)


@pytest.fixture(scope="session")
def shard_writer():
    return write_latent_shards


@pytest.fixture(scope="session")
def latents_dir(tmp_path_factory) -> str:
    return write_latent_shards(str(tmp_path_factory.mktemp("latents")))


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
