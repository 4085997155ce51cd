"""MLflow: which tracking server, the run of a training run dir, and rank 0's logger.

One precedence for the tracking URI, everywhere: an explicit ``--tracking-uri`` flag, else the
config's ``tracking.tracking_uri`` (a dotted override is explicit too), else
``$MLFLOW_TRACKING_URI``. Training without any of them does not track (a SQLite file on the
driver's disk would be out of reach of workers on other nodes); the registry commands fall back
to a local SQLite store in ``./mlruns``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from w2svd.config import Config, flatten, to_yaml
from w2svd.data import storage

MLFLOW_RUN_FILE = "mlflow_run.json"  # RUN_DIR/mlflow_run.json: the run of a training run dir


def tracking_uri(cfg: Config | None = None, explicit: str | None = None) -> str | None:
    return explicit or (cfg.tracking.tracking_uri if cfg is not None else None) or os.environ.get("MLFLOW_TRACKING_URI")


def registry_uri(cfg: Config | None = None, explicit: str | None = None) -> str:
    """``tracking_uri``, else a local SQLite store ``./mlruns/mlflow.db`` (artifacts beside it)."""
    uri = tracking_uri(cfg, explicit)
    if uri:
        return uri
    root = Path("mlruns").absolute()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def experiment_id(client, name: str, uri: str) -> str:
    """The experiment ``name``, created on first use. A database store's default artifact root
    is ``./mlruns`` of whichever process asks first, so it gets one beside the database."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        artifact_location = Path(uri[len("sqlite:///"):]).absolute().parent.joinpath("artifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def training_run_id(cfg: Config, run_dir: str, program: str, options: storage.StorageOptions) -> str | None:
    """The MLflow run of a training run dir: created (with the resolved config as params) on
    first use, found again in ``RUN_DIR/mlflow_run.json`` on resume."""
    uri = tracking_uri(cfg)
    if not uri:
        return None
    known = storage.read_json(storage.join(run_dir, MLFLOW_RUN_FILE), options)
    if known and known.get("tracking_uri") == uri:
        return known["run_id"]
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(experiment_id(client, cfg.tracking.experiment, uri),
                            run_name=f"{program}-{cfg.method.name}-{Path(run_dir).name}",
                            tags={"w2svd.program": program, "w2svd.run_dir": run_dir})
    params = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in flatten(cfg).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    client.log_text(run.info.run_id, to_yaml(cfg), "config.yaml")
    storage.write_json(storage.join(run_dir, MLFLOW_RUN_FILE), {"run_id": run.info.run_id, "tracking_uri": uri},
                       options)
    return run.info.run_id


class Tracker:
    """MLflow logging from rank 0 only; a no-op elsewhere or without a tracking URI."""

    def __init__(self, run_id: str | None, uri: str | None, system_metrics: bool = True):
        self.active = bool(run_id and uri)
        if not self.active:
            return
        import mlflow

        mlflow.set_tracking_uri(uri)
        if system_metrics:
            mlflow.set_system_metrics_sampling_interval(2)
        self._mlflow = mlflow
        self._run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.active:
            clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and np.isfinite(v)}
            self._mlflow.log_metrics(clean, step=step)

    def tag(self, key: str, value: str) -> None:
        if self.active:
            self._mlflow.set_tag(key, value[:5000])

    def log_video(self, video_THWC: np.ndarray, fps: float, step: int, label: str | None = None) -> None:
        if not self.active:
            return
        from w2svd.data.video import encode_video

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"step_{step:06d}.mp4"
            path.write_bytes(encode_video(video_THWC, fps))
            self._mlflow.log_artifact(str(path), artifact_path="samples")
            if label:
                self._mlflow.set_tag("samples.decoder", label)

    def close(self) -> None:
        if self.active:
            self._mlflow.end_run()
            self.active = False
