"""Registry and promotion against a real ``mlflow server`` and a real local Ray.

One story, in order (each step depends on the last): register → first version becomes champion
on the absolute gates → a worse challenger is rejected and says why → a better one is promoted →
rollback → the champion loads by alias in a fresh process and generates.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines import cli
from pipelines.promote import champion_history, promote, rollback
from w2svd.config import load_config

NAME = "w2svd-generator"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def env(mlflow_server, ray_local, eval_cache, exports):
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server  # what the commands read
    yield {"uri": mlflow_server, "client": MlflowClient(tracking_uri=mlflow_server), "exports": exports}
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved


def _register(export: str, capsys) -> str:
    assert cli.main(["register", "--export", export]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"models:/{NAME}/"), line
    return line.rsplit("/", 1)[1]


def _alias(client, alias: str) -> str:
    return client.get_model_version_by_alias(NAME, alias).version


def test_register_promote_reject_rollback(env, capsys, tmp_path):
    client, cfg = env["client"], load_config("debug")

    # Nothing registered yet: clear errors, not stack traces.
    assert cli.main(["promote"]) == 2
    assert "does not exist" in capsys.readouterr().err

    v1 = _register(env["exports"]["base"], capsys)
    assert _alias(client, "challenger") == v1
    mv = client.get_model_version(NAME, v1)
    assert json.loads(mv.tags["sampler.steps"]) == 4

    # Dry run: decision recorded, no alias moved.
    assert cli.main(["promote", "--dry-run"]) == 0
    tags = client.get_model_version(NAME, v1).tags
    assert tags["promotion.decision"] == "dry-run" and tags["promotion.would_promote"] == "true"
    assert "first version" in tags["promotion.compared_to"]
    with pytest.raises(Exception, match="champion"):
        client.get_model_version_by_alias(NAME, "champion")
    # The evaluation landed on the version's run as metrics, and as tags for reuse.
    run = client.get_run(mv.run_id)
    assert "eval/fvd/domain" in run.data.metrics and "eval.set" in tags

    # First version: absolute gates only → champion.
    first = promote(NAME, cfg)
    assert first.decision == "promoted" and first.gate.first_version
    assert _alias(client, "champion") == v1 and champion_history(client, NAME) == [v1]

    # A worse challenger: rejected by the relative FVD gate, champion unchanged, reasons on the version.
    v2 = _register(env["exports"]["worse"], capsys)
    assert cli.main(["promote", "--out", str(tmp_path / "decision.json")]) == 3
    decision = json.loads((tmp_path / "decision.json").read_text())
    fvd_worse, fvd_champ = decision["metrics"]["challenger"]["fvd/domain"], decision["metrics"]["champion"]["fvd/domain"]
    assert fvd_worse > 1.1 * fvd_champ, decision["metrics"]
    assert _alias(client, "champion") == v1
    tags = client.get_model_version(NAME, v2).tags
    assert tags["promotion.decision"] == "rejected" and tags["promotion.compared_to"] == f"v{v1}"
    assert "fvd/domain" in tags["promotion.reasons"] and "more than the allowed" in tags["promotion.reasons"]
    assert float(tags["promotion.metric.fvd/domain"]) == pytest.approx(fvd_worse)

    # A better challenger (the teacher's 8-step Euler sampling of the same weights): promoted.
    v3 = _register(env["exports"]["better"], capsys)
    result = promote(NAME, cfg)
    assert result.decision == "promoted", result.reasons
    assert result.metrics["challenger"]["fvd/domain"] <= 1.1 * result.metrics["champion"]["fvd/domain"]
    assert _alias(client, "champion") == v3 and champion_history(client, NAME) == [v1, v3]
    assert client.get_model_version(NAME, v3).tags["promotion.decision"] == "promoted"

    # Rollback walks the history back; past the first champion it refuses.
    assert cli.main(["rollback"]) == 0
    assert _alias(client, "champion") == v1 and champion_history(client, NAME) == [v1]
    assert "rolled_back" in " ".join(client.get_model_version(NAME, v3).tags)
    with pytest.raises(ValueError, match="no previous version"):
        rollback(NAME)


def test_champion_loads_in_a_fresh_process_and_generates(env, tmp_path):
    code = f"""
import json, mlflow, pandas as pd
from pipelines.registry import decode_video_column, load_registered_generator
model = mlflow.pyfunc.load_model("models:/{NAME}@champion")
out = model.predict(pd.DataFrame({{"prompt": ["a person talking", "a person blinking"], "seed": [1, 2]}}))
frames = [decode_video_column(row) for _, row in out.iterrows()]
raw = model.predict(pd.DataFrame({{"prompt": ["a person talking"], "seed": [1]}}), params={{"format": "uint8"}})
bundle = load_registered_generator("models:/{NAME}@champion")
direct = bundle.generate(["a person talking"], [1]).numpy()[0]
print(json.dumps({{"shapes": [list(f.shape) for f in frames], "formats": out["format"].tolist(),
                  "uint8_equal": bool((decode_video_column(raw.iloc[0]) == direct).all()),
                  "std": float(frames[0].std())}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "MLFLOW_TRACKING_URI": env["uri"]})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["shapes"] == [[9, 64, 48, 3]] * 2 and result["formats"] == ["mp4", "mp4"]
    assert result["uint8_equal"] and result["std"] > 1.0


def test_bad_uris_name_the_problem(env):
    from pipelines.registry import load_registered_generator

    with pytest.raises(ValueError, match="no-such-model"):
        load_registered_generator("models:/no-such-model@champion")
    with pytest.raises(ValueError, match="alias missing-alias"):
        load_registered_generator(f"models:/{NAME}@missing-alias")
    with pytest.raises(ValueError, match="/does/not/exist"):
        load_registered_generator("/does/not/exist")


def test_evaluate_command_and_teacher_reference(env, tmp_path):
    out = tmp_path / "champion.json"
    assert cli.main(["evaluate", "--model", f"models:/{NAME}@champion", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["model"]["registered"]["name"] == NAME
    assert report["evalset"]["num_prompts"] == 8 and len(report["per_item"]) == 8
    assert {"fvd/domain", "dynamic_degree", "temporal_flickering", "face_detection_rate"} <= set(report["metrics"])
    assert report["backends"]["temporal_flickering"] == "vbench"

    ref = tmp_path / "teacher.json"
    assert cli.main(["evaluate", "--teacher", "debug", "--steps", "8", "--out", str(ref)]) == 0
    teacher = json.loads(ref.read_text())
    assert teacher["model"]["kind"] == "teacher" and teacher["model"]["steps"] == 8
    assert teacher["evalset"]["fingerprint"] == report["evalset"]["fingerprint"]
