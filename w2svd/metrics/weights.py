"""Loading metric weights from a local path or the project's bucket — never from a hub.

Every feature network of ``w2svd.metrics`` gets its weights through :func:`load_state_dict`, so the
missing-weights behaviour is one piece of code: a :class:`MissingWeightsError` (a
``FileNotFoundError``) that names the file needed and where it comes from. Nothing here opens a
network connection other than the storage URI it is given (``s3://…``, through ``w2svd.data.storage``).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch


class MissingWeightsError(FileNotFoundError):
    """The weights file for a metric is not at the given path; the message says which file and how to get it."""


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def weights_exist(path_or_uri: str | os.PathLike | None) -> bool:
    if path_or_uri is None:
        return False
    path = str(path_or_uri)
    if _is_uri(path):
        from w2svd.data import storage  # bucket URIs only: local paths need no object-store client

        return storage.exists(path)
    return Path(path.removeprefix("file://")).is_file()


def require_weights(path_or_uri: str | os.PathLike | None, what: str, needed: str, how_to_get: str) -> str:
    """Return ``path_or_uri`` as a string if the file is there, else raise :class:`MissingWeightsError`."""
    if not weights_exist(path_or_uri):
        where = "no path was given" if path_or_uri is None else f"nothing at {str(path_or_uri)!r}"
        raise MissingWeightsError(
            f"{what}: weights file missing ({where}). Needed: {needed}. {how_to_get} "
            "Weights are never downloaded at run time: put the file on a local path or in the "
            "project's bucket and pass that path."
        )
    return str(path_or_uri)


def read_bytes(path: str) -> bytes:
    if _is_uri(path):
        from w2svd.data import storage

        return storage.read_bytes(path)
    return Path(path.removeprefix("file://")).read_bytes()


def load_state_dict(path_or_uri, what: str, needed: str, how_to_get: str) -> dict[str, torch.Tensor]:
    """A tensor dict from ``.safetensors``, ``.pt``/``.pth``/``.bin`` (``torch.save`` of a state dict) or ``.npz``."""
    path = require_weights(path_or_uri, what, needed, how_to_get)
    data = read_bytes(path)
    suffix = Path(path).suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load

        return load(data)
    if suffix == ".npz":
        with np.load(io.BytesIO(data)) as z:
            return {k: torch.from_numpy(z[k]) for k in z.files}
    sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd
