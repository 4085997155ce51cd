"""The registered generator: an MLflow ``pyfunc`` over the export folder, and its plain loader.

    bundle = load_registered_generator("models:/w2svd-generator@champion")   # or a local export
    clips_BTHWC = bundle.generate(["a person talking"], seeds=[0])           # uint8 [B, T, H, W, 3]

    version = register_export("runs/x/export", name="w2svd-generator")       # alias "challenger"

Model layout in the registry (one version): the pyfunc's artifact ``export`` is the export
folder unchanged (``transformer/`` safetensors in diffusers layout, ``sampler.json``,
``config.yaml``). The text encoders and the VAE are *not* copied: ``config.yaml`` names them
(``model.vae``, ``model.text_encoder*``; tiny random ones are rebuilt from its seed), so the
serving image must reach the same paths or bucket. The ``w2svd`` package itself must be
installed where the model is loaded (it is in the Ray image): the pyfunc class is imported from
``pipelines.registry``.

pyfunc ``predict`` input: a DataFrame with ``prompt`` (str) and optional ``seed``, ``num_frames``,
``height``, ``width`` (int; give a column for every row or not at all). Param ``format``:
``"mp4"`` (default) or ``"uint8"``. Output: a DataFrame, one row per prompt, with ``video``
(base64 of the mp4 bytes, or of the raw uint8 ``[T, H, W, 3]`` array), ``format``, ``num_frames``,
``height``, ``width``, ``fps``, ``seed``; :func:`decode_video_column` turns a row back into frames.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipelines.tracking import MLFLOW_RUN_FILE, experiment_id, registry_uri
from w2svd.data import storage
from w2svd.export import SAMPLER_FILE, SamplerSettings
from w2svd.generate import GeneratorBundle, load_export_bundle

DEFAULT_MODEL_NAME = "w2svd-generator"
CHALLENGER, CHAMPION = "challenger", "champion"
EXPORT_ARTIFACT = "export"
MODEL_ARTIFACT_NAME = "generator"
REGISTRY_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


@dataclass(frozen=True)
class RegisteredVersion:
    """A registry model version with its number as a string, whichever store answered (the
    REST client returns strings, a local SQL store integers)."""

    name: str
    version: str
    run_id: str | None
    tags: dict
    source: str | None = None

    @classmethod
    def of(cls, mv) -> RegisteredVersion:
        return cls(str(mv.name), str(mv.version), mv.run_id or None, dict(mv.tags or {}), mv.source)


def find_export(local: Path) -> Path:
    """The export folder inside a downloaded pyfunc model, a run dir, or the folder itself."""
    for candidate in (local, local / EXPORT_ARTIFACT, local / "artifacts" / EXPORT_ARTIFACT):
        if (candidate / SAMPLER_FILE).is_file():
            return candidate
    found = sorted(local.rglob(SAMPLER_FILE))
    if len(found) == 1:
        return found[0].parent
    raise FileNotFoundError(f"{str(local)!r} holds no generator export ({SAMPLER_FILE} not found)")


def download_model(model_uri: str, tracking_uri: str | None = None, dst: str | None = None) -> Path:
    """Download a registry/run model URI; errors name the URI and what was wrong with it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    tracking_uri = registry_uri(explicit=tracking_uri)
    try:
        mlflow.set_tracking_uri(tracking_uri)
        path = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst)
    except MlflowException as err:
        raise ValueError(f"cannot load model {model_uri!r} from tracking server {tracking_uri}: "
                         f"{err.message}") from None
    return Path(path)


def _local_export(model_uri: str) -> Path:
    """The export folder a local ``model_uri`` names (an export, a run dir, a pyfunc folder)."""
    path = Path(model_uri.removeprefix("file://")).expanduser()
    if not path.exists():
        raise ValueError(f"model {model_uri!r} is neither a registry URI ({', '.join(REGISTRY_SCHEMES)}) "
                         f"nor an existing export folder")
    try:
        return find_export(path)
    except FileNotFoundError:
        raise ValueError(f"model {model_uri!r}: no generator export there ({SAMPLER_FILE} missing); "
                         "for a training run dir, run `w2svd distill --export-only` first") from None


def parse_registry_uri(uri: str) -> tuple[str, str, str] | None:
    """``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` → (name, "version"|"alias", value)."""
    if not uri.startswith("models:/"):
        return None
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        return name, "alias", alias
    name, _, version = rest.rpartition("/")
    return (name, "version", version) if name and version.isdigit() else None


def resolve_version(client, uri: str) -> RegisteredVersion | None:
    """The version a ``models:/`` URI names (None for other URIs); a missing alias, version or
    model is a one-line ``ValueError``."""
    from mlflow.exceptions import MlflowException

    parsed = parse_registry_uri(uri)
    if parsed is None:
        if uri.startswith("models:/"):
            raise ValueError(f"model {uri!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
        return None
    name, kind, value = parsed
    try:
        if kind == "alias":
            return RegisteredVersion.of(client.get_model_version_by_alias(name, value))
        return RegisteredVersion.of(client.get_model_version(name, value))
    except MlflowException as err:
        raise ValueError(f"model {uri!r}: {err.message}") from None


def check_model_uri(model_uri: str, tracking_uri: str | None = None) -> None:
    """Fail early, on the driver and in one line, for a model URI that names nothing loadable,
    before actors are started to load it."""
    if model_uri.startswith("models:/"):
        from mlflow.tracking import MlflowClient

        resolve_version(MlflowClient(tracking_uri=registry_uri(explicit=tracking_uri)), model_uri)
    elif storage.is_s3(model_uri):
        if not storage.exists(storage.join(model_uri, SAMPLER_FILE)):
            raise ValueError(f"model {model_uri!r}: no generator export there ({SAMPLER_FILE} missing)")
    elif not model_uri.startswith(REGISTRY_SCHEMES):
        _local_export(model_uri)


def load_registered_generator(model_uri: str, tracking_uri: str | None = None, device: str | None = None,
                              dst: str | None = None) -> GeneratorBundle:
    """``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/ID/generator``, a local export
    folder, a training run dir (its ``export/``) or a downloaded pyfunc model folder →
    ``GeneratorBundle``. This is what evaluation, Serve and batch generation call."""
    if model_uri.startswith(REGISTRY_SCHEMES):
        local = download_model(model_uri, tracking_uri, dst or tempfile.mkdtemp(prefix="w2svd-model-"))
        return load_export_bundle(find_export(local), device=device)
    if storage.is_s3(model_uri):
        return load_export_bundle(model_uri, device=device)
    return load_export_bundle(_local_export(model_uri), device=device)


# ---------------------------------------------------------------------------------------------
# pyfunc


def _mlflow_python_model_base():
    import mlflow.pyfunc

    return mlflow.pyfunc.PythonModel


def decode_video_column(row) -> np.ndarray:
    """One output row of the pyfunc → uint8 frames ``[T, H, W, 3]``."""
    data = base64.b64decode(row["video"])
    if row["format"] == "uint8":
        shape = (int(row["num_frames"]), int(row["height"]), int(row["width"]), 3)
        return np.frombuffer(data, dtype=np.uint8).reshape(shape)
    from w2svd.data.video import decode_video

    return decode_video(data)[0]


# MLflow advises type hints on predict when this class is created (a UserWarning that would open
# every registry command's output); the signature is given explicitly (model_signature), so the
# advice is recorded and dropped.
with warnings.catch_warnings(record=True):
    class GeneratorPyfunc(_mlflow_python_model_base()):
        """``mlflow.pyfunc`` wrapper: loads the export artifact, generates clips for a prompt table."""

        def load_context(self, context):
            self.bundle = load_export_bundle(find_export(Path(context.artifacts[EXPORT_ARTIFACT])))

        def predict(self, context, model_input, params=None):
            import pandas as pd

            fmt = (params or {}).get("format", "mp4")
            if fmt not in ("mp4", "uint8"):
                raise ValueError(f"param format = {fmt!r}; choose 'mp4' or 'uint8'")
            df = pd.DataFrame(model_input)
            if "prompt" not in df.columns:
                raise ValueError(f"input needs a 'prompt' column; got columns {list(df.columns)}")
            f0, h0, w0 = self.bundle.default_size()
            rows = []
            # Rows sharing a size are generated together; sizes differ in latent shape.
            df = df.reset_index(drop=True)
            seeds = df["seed"].astype(int).tolist() if "seed" in df else list(range(len(df)))
            sizes = [(int(df["num_frames"][i]) if "num_frames" in df else f0,
                      int(df["height"][i]) if "height" in df else h0,
                      int(df["width"][i]) if "width" in df else w0) for i in range(len(df))]
            out: dict[int, dict] = {}
            for size in dict.fromkeys(sizes):
                idx = [i for i, s in enumerate(sizes) if s == size]
                clips = self.bundle.generate([str(df["prompt"][i]) for i in idx], [seeds[i] for i in idx], *size)
                for i, clip in zip(idx, clips.numpy(), strict=True):
                    if fmt == "mp4":
                        from w2svd.data.video import encode_video

                        data = encode_video(clip, self.bundle.fps)
                    else:
                        data = np.ascontiguousarray(clip).tobytes()
                    out[i] = {"video": base64.b64encode(data).decode("ascii"), "format": fmt, "num_frames": size[0],
                              "height": size[1], "width": size[2], "fps": self.bundle.fps, "seed": seeds[i]}
            rows = [out[i] for i in range(len(df))]
            return pd.DataFrame(rows, columns=["video", "format", "num_frames", "height", "width", "fps", "seed"])


def model_signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "prompt"), ColSpec("long", "seed", required=False),
                     ColSpec("long", "num_frames", required=False), ColSpec("long", "height", required=False),
                     ColSpec("long", "width", required=False)])
    outputs = Schema([ColSpec("string", "video"), ColSpec("string", "format"), ColSpec("long", "num_frames"),
                      ColSpec("long", "height"), ColSpec("long", "width"), ColSpec("double", "fps"),
                      ColSpec("long", "seed")])
    params = ParamSchema([ParamSpec("format", "string", "mp4")])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _pip_requirements() -> list[str]:
    # Explicit pins: MLflow's inference would load the model in a subprocess just to list imports.
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("torch", "diffusers", "transformers", "peft", "safetensors", "av", "pandas", "pyyaml", "mlflow"):
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


# ---------------------------------------------------------------------------------------------
# Registering


def _training_run_id(export: Path, tracking_uri: str) -> str | None:
    """The MLflow run that trained this export (``RUN_DIR/mlflow_run.json`` beside ``RUN_DIR/export``)."""
    known = export.parent / MLFLOW_RUN_FILE
    if not known.is_file():
        return None
    try:
        info = json.loads(known.read_text())
    except json.JSONDecodeError:
        return None
    return info.get("run_id") if info.get("tracking_uri") == tracking_uri else None


def register_export(export: str | os.PathLike, name: str = DEFAULT_MODEL_NAME, tracking_uri: str | None = None,
                    experiment: str = "w2svd", run_id: str | None = None):
    """Log ``export`` as a pyfunc model, register it as a new version of ``name`` and point alias
    ``challenger`` at it. Logged into the training run when the export's run dir names one
    (or ``run_id``), else into a new run. Returns the ``ModelVersion``."""
    import mlflow
    from mlflow.tracking import MlflowClient

    export = Path(export).expanduser().absolute()
    if not (export / SAMPLER_FILE).is_file() or not (export / "transformer").is_dir():
        raise ValueError(f"{str(export)!r} is not a generator export (needs {SAMPLER_FILE} and transformer/)")
    settings = SamplerSettings.from_json((export / SAMPLER_FILE).read_text())
    tracking_uri = registry_uri(explicit=tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    run_id = run_id or _training_run_id(export, tracking_uri)
    if run_id is None:
        exp_id = experiment_id(client, experiment, tracking_uri)
        run_id = client.create_run(exp_id, run_name=f"register-{export.parent.name}-{export.name}",
                                   tags={"w2svd.program": "register"}).info.run_id
    with mlflow.start_run(run_id=run_id):
        mlflow.set_tags({"w2svd.export": str(export)})
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT_NAME, python_model=GeneratorPyfunc(), artifacts={EXPORT_ARTIFACT: str(export)},
            signature=model_signature(), pip_requirements=_pip_requirements(), registered_model_name=name,
            metadata={"sampler": asdict(settings)},
        )
    version = str(info.registered_model_version)
    for key, value in asdict(settings).items():
        client.set_model_version_tag(name, version, f"sampler.{key}", json.dumps(value))
    client.set_model_version_tag(name, version, "w2svd.export", str(export))
    client.set_registered_model_alias(name, CHALLENGER, version)
    return RegisteredVersion.of(client.get_model_version(name, version))
