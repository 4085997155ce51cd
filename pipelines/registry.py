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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from w2svd.config import Config, load_config
from w2svd.evalset import clips_from_pixels
from w2svd.export import SAMPLER_FILE, SamplerSettings, generate_latents, load_generator, sampler_settings_for
from w2svd.models.base import Cond
from w2svd.schedule import student_sigmas

DEFAULT_MODEL_NAME = "w2svd-generator"
CHALLENGER, CHAMPION = "challenger", "champion"
EXPORT_ARTIFACT = "export"
MODEL_ARTIFACT_NAME = "generator"
MLFLOW_RUN_FILE = "mlflow_run.json"  # written by the training programs next to RUN_DIR/export
REGISTRY_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


# ---------------------------------------------------------------------------------------------
# Tracking URI


def resolve_tracking_uri(explicit: str | None = None, cfg: Config | None = None) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``tracking.tracking_uri`` of the
    config, else a local SQLite store in ``./mlruns`` (artifacts in ``./mlruns/artifacts``)."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or (cfg.tracking.tracking_uri if cfg else None)
    if uri:
        return uri
    root = Path("mlruns").absolute()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def _experiment_id(client, name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        # A database store's default artifact root is ./mlruns of whichever process asks first.
        artifact_location = Path(tracking_uri[len("sqlite:///"):]).absolute().parent.joinpath("artifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


# ---------------------------------------------------------------------------------------------
# The loaded generator


@dataclass
class GeneratorBundle:
    """Everything needed to turn prompts into clips: backbone, sampler settings, text encoders and
    VAE (``encoders``, a :class:`w2svd.models.encoders.LatentEncoder`), and the export's config."""

    backbone: torch.nn.Module
    settings: SamplerSettings
    cfg: Config
    encoders: object
    source: str
    # Sample with the teacher's N-step Euler sampler (the reference) instead of the student's.
    teacher: bool = False

    @property
    def fps(self) -> float:
        return float(self.cfg.data.fps)

    def default_size(self) -> tuple[int, int, int]:
        b = self.cfg.data.buckets[0]
        return b.frames, b.height, b.width

    def check_size(self, num_frames: int, height: int, width: int) -> None:
        patch = int(self.cfg.model.arch.patch_size) * self.encoders.spatial_ratio
        if (num_frames - 1) % self.encoders.temporal_ratio:
            raise ValueError(f"num_frames = {num_frames} must be {self.encoders.temporal_ratio}k+1")
        if height % patch or width % patch:
            raise ValueError(f"size {height}x{width} must be multiples of {patch} for this generator")

    def encode_prompts(self, prompts: list[str]) -> Cond:
        text, mask, pooled = self.encoders.encode_text(list(prompts))
        return Cond(text=text, text_mask=mask.to(text.dtype), pooled=pooled)

    @torch.no_grad()
    def generate_latents(self, prompts: list[str], seeds: list[int], num_frames: int, height: int,
                         width: int) -> torch.Tensor:
        """Latents ``[B, C, T', h, w]``; prompt ``i`` starts from ``randn`` seeded with ``seeds[i]``,
        so a clip does not depend on which other prompts share its batch."""
        from w2svd.evalset import EvalItem, item_noise
        from w2svd.roles import View, guided_velocity
        from w2svd.sampling import sample_teacher_euler

        self.check_size(num_frames, height, width)
        shape = self.encoders.latent_shape(num_frames, height, width)
        device = next(self.backbone.parameters()).device
        cond = self.encode_prompts(prompts).to(device)
        noise = torch.stack([item_noise(EvalItem(i, p, int(s), num_frames, height, width, self.fps), shape)
                             for i, (p, s) in enumerate(zip(prompts, seeds, strict=True))]).to(device)
        s = self.settings
        if self.teacher:
            view = View(self.backbone)

            def velocity(x, s_B):
                return guided_velocity(view, x, s_B, cond, s.guidance_mode, s.guidance_scale)

            return sample_teacher_euler(velocity, noise, s.steps, s.shift)
        if s.mode == "euler":  # deterministic given the noise: one batched call
            return generate_latents(self.backbone, s, cond, noise)
        # Re-noising draws fresh noise per step; one generator per prompt keeps clips batch-independent.
        out = [generate_latents(self.backbone, s, cond.index(slice(i, i + 1)), noise[i:i + 1],
                                torch.Generator(device=device).manual_seed(int(seeds[i]) + 1))
               for i in range(len(prompts))]
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents_BCTHW: torch.Tensor) -> torch.Tensor:
        """Latents → uint8 clips ``[B, T, H, W, 3]``."""
        return clips_from_pixels(self.encoders.decode_latents(latents_BCTHW).cpu())

    def generate(self, prompts: list[str], seeds: list[int] | None = None, num_frames: int | None = None,
                 height: int | None = None, width: int | None = None) -> torch.Tensor:
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        f0, h0, w0 = self.default_size()
        seeds = list(range(len(prompts))) if seeds is None else [int(x) for x in seeds]
        latents = self.generate_latents(list(prompts), seeds, num_frames or f0, height or h0, width or w0)
        return self.decode(latents)


def _bundle(backbone, settings: SamplerSettings, cfg: Config, source: str, device, teacher: bool = False):
    from w2svd.models.encoders import LatentEncoder

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoders = LatentEncoder(cfg, device=str(device))
    if encoders.vae.config.latent_channels != settings.latent_channels:
        raise ValueError(f"{source}: the VAE of its config has {encoders.vae.config.latent_channels} latent "
                         f"channels, the generator {settings.latent_channels}")
    return GeneratorBundle(backbone.to(device), settings, cfg, encoders, source, teacher)


def load_export_bundle(folder: str | os.PathLike, device: str | None = None) -> GeneratorBundle:
    """A generator export folder (local or s3://) → :class:`GeneratorBundle`."""
    backbone, settings = load_generator(folder, device=device)
    local = Path(str(folder))
    cfg_path = local / "config.yaml"
    if str(folder).startswith("s3://"):
        from w2svd.data import storage

        with tempfile.TemporaryDirectory() as tmp:
            cfg_path = Path(tmp) / "config.yaml"
            cfg_path.write_bytes(storage.read_bytes(storage.join(str(folder), "config.yaml")))
            cfg = load_config(str(cfg_path))
    else:
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{folder!r} is not a generator export: no config.yaml")
        cfg = load_config(str(cfg_path))
    return _bundle(backbone, settings, cfg, str(folder), device)


def load_teacher_bundle(teacher: str, steps: int, config: str = "debug", overrides: list[str] | tuple = (),
                        device: str | None = None) -> GeneratorBundle:
    """The teacher sampled with ``sample_teacher_euler`` at ``steps`` steps: ``teacher`` is a
    transformer folder / export (used with ``config``'s encoders) or a config name whose
    ``model.teacher`` it takes (``null``: the tiny random weights of ``model.arch``)."""
    from w2svd.models.hunyuan import build_backbone

    overrides = list(overrides) + [f"method.teacher_steps={int(steps)}"]
    if Path(teacher).expanduser().exists() or teacher.startswith("s3://"):
        cfg = load_config(config, overrides + [f"model.teacher={teacher}"])
    else:
        cfg = load_config(teacher, overrides)
    backbone = build_backbone(cfg.model, device=device).eval().requires_grad_(False)
    settings = sampler_settings_for(cfg, role="teacher")
    if settings.sigmas != [float(x) for x in student_sigmas(steps, cfg.method.shift)]:
        settings = replace(settings, steps=steps, sigmas=[float(x) for x in student_sigmas(steps, cfg.method.shift)])
    return _bundle(backbone, settings, cfg, f"teacher:{teacher}@{steps}", device, teacher=True)


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

    tracking_uri = resolve_tracking_uri(tracking_uri)
    try:
        mlflow.set_tracking_uri(tracking_uri)
        path = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst)
    except MlflowException as err:
        raise ValueError(f"cannot load model {model_uri!r} from tracking server {tracking_uri}: "
                         f"{err.message}") from None
    return Path(path)


def load_registered_generator(model_uri: str, tracking_uri: str | None = None, device: str | None = None,
                              dst: str | None = None) -> GeneratorBundle:
    """``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/ID/generator``, a local export
    folder, a training run dir (its ``export/``) or a downloaded pyfunc model folder →
    :class:`GeneratorBundle`. This is what Serve and batch generation call."""
    if model_uri.startswith(REGISTRY_SCHEMES):
        local = download_model(model_uri, tracking_uri, dst or tempfile.mkdtemp(prefix="w2svd-model-"))
        return load_export_bundle(find_export(local), device=device)
    if model_uri.startswith("s3://"):
        return load_export_bundle(model_uri, device=device)
    path = Path(model_uri.removeprefix("file://")).expanduser()
    if not path.exists():
        raise ValueError(f"model {model_uri!r} is neither a registry URI ({', '.join(REGISTRY_SCHEMES)}) "
                         f"nor an existing export folder")
    try:
        export = find_export(path)
    except FileNotFoundError:
        raise ValueError(f"model {model_uri!r}: no generator export there ({SAMPLER_FILE} missing); "
                         "for a training run dir, run `w2svd distill --export-only` first") from None
    return load_export_bundle(export, device=device)


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
    tracking_uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    run_id = run_id or _training_run_id(export, tracking_uri)
    if run_id is None:
        exp_id = _experiment_id(client, experiment, tracking_uri)
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
    return client.get_model_version(name, version)
