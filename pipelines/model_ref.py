"""Which generator a model URI names, pinned, and what it serves.

    ref = pin("models:/w2svd-generator@champion", tracking_uri)   # → models:/w2svd-generator/7
    bundle = load(ref, tracking_uri)
    card = model_card(ref, bundle)     # name, version, alias, sampler, allowed steps and sizes

Serve, batch generation and the benchmark pin an alias to its version once and load that
version, so an alias that moves while a model is loading (or while a batch job runs) can never
mix two models; they notice a move by pinning again and comparing versions.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipelines import tracking
from pipelines.registry import (
    REGISTRY_SCHEMES,
    check_model_uri,
    load_registered_generator,
    parse_registry_uri,
    resolve_version,
)

EXPORT_VERSION = "export"  # the version of a model given as a folder or bucket, not a registry entry


@dataclass(frozen=True)
class ModelRef:
    uri: str  # as given
    pinned_uri: str  # models:/NAME/VERSION for a registry URI, else the URI itself
    name: str
    version: str  # the registry version, or EXPORT_VERSION
    alias: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}"


def model_tracking_uri(uri: str, cfg=None, explicit: str | None = None) -> str | None:
    """The MLflow server a model URI needs: the registry's for ``models:/``/``runs:/`` URIs (with
    its ``./mlruns`` fallback), else only one that was named (an export needs none)."""
    if uri.startswith(REGISTRY_SCHEMES):
        return tracking.registry_uri(cfg, explicit)
    return tracking.tracking_uri(cfg, explicit)


def pin(uri: str, tracking_uri: str | None = None) -> ModelRef:
    """Resolve ``uri`` now; a missing model, version or alias is a one-line ``ValueError``."""
    parsed = parse_registry_uri(uri)
    if uri.startswith("models:/"):
        from mlflow.tracking import MlflowClient

        version = resolve_version(MlflowClient(tracking_uri=tracking.registry_uri(explicit=tracking_uri)), uri)
        alias = parsed[2] if parsed and parsed[1] == "alias" else None
        return ModelRef(uri, f"models:/{version.name}/{version.version}", version.name, version.version, alias)
    check_model_uri(uri, tracking_uri)
    return ModelRef(uri, uri, Path(uri.rstrip("/")).name or uri, EXPORT_VERSION)


def load(ref: ModelRef, tracking_uri: str | None = None, device: str | None = None):
    """The ``GeneratorBundle`` of the pinned version."""
    return load_registered_generator(ref.pinned_uri, tracking_uri, device=device)


def model_card(ref: ModelRef, bundle) -> dict:
    """What ``/v1/models`` shows and what requests are checked against."""
    return {
        "id": ref.name, "object": "model", "name": ref.name, "version": ref.version, "alias": ref.alias,
        "uri": ref.uri, "pinned_uri": ref.pinned_uri, "family": bundle.settings.family,
        "sampler": asdict(bundle.settings), "steps": [int(bundle.settings.steps)],
        "sizes": [{"frames": f, "height": h, "width": w} for f, h, w in bundle.sizes()],
        "image_to_video": bundle.image_to_video, "fps": bundle.fps, "loaded_at": time.time(),
    }
