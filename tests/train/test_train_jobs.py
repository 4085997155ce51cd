"""Training jobs end to end: 2 CPU workers on a local Ray, real DeepSpeed on gloo, a real
S3-compatible server (moto on 127.0.0.1) and a real MLflow store.

Runs are shared between tests through module fixtures (each costs tens of seconds on 2 cores):

    reference   distill, w2svd full generator, ZeRO-2, 4 steps, storage and data in the bucket
    faulted     the same under ZeRO-3, a worker raises at step 3 → FailureConfig restart from step 2
    reshaped    faulted continued to step 6 on ONE worker, and a copy of reference (from the bucket)
                continued the same way: resume on another number of workers, ZeRO-3 and ZeRO-2
    nan_lora    shared-base (LoRA generator) run with a NaN injected at step 3 → rollback
    finetune    teacher flow-matching fine-tune

Every distillation run keeps a generator EMA (``method.generator_ema``), exported instead of the
raw generator.
"""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines import distill, finetune
from pipelines.training import train
from w2svd.baselines import flow_matching_step
from w2svd.config import load_config
from w2svd.data import storage
from w2svd.export import generate_latents, load_generator
from w2svd.models.base import Cond, count_parameter_bytes
from w2svd.models.hunyuan import build_backbone, dummy_cond
from w2svd.roles import View, build_roles_from_config

pytestmark = pytest.mark.slow

BUCKET = "w2svd-train-test"
COMMON = ["optim.steps=4", "parallel.materialize_data=true", "method.generator_ema=0.9", "health.drift_every=2"]


@pytest.fixture(scope="module")
def services(s3_server, ray_local, mlflow_uri, latents_dir):
    # s3_server first: Ray's worker processes inherit the endpoint variables from ray.init.
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return {"mlflow": mlflow_uri, "latents": latents_dir}


def _cfg(services, *extra):
    return load_config("debug", [*COMMON, f"tracking.tracking_uri={services['mlflow']}", *extra])


def _history(services, run_id: str, key: str) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for m in MlflowClient(services["mlflow"]).get_metric_history(run_id, key):
        out.setdefault(m.step, []).append(m.value)
    return out


@pytest.fixture(scope="module")
def reference(services, shard_writer):
    data = shard_writer(f"s3://{BUCKET}/latents")
    run_dir = f"s3://{BUCKET}/runs/reference"
    result = train("distill", distill.train_loop_per_worker, _cfg(services), data, run_dir)
    return {"result": result, "run_dir": run_dir, "data": data}


@pytest.fixture(scope="module")
def faulted(services, tmp_path_factory, shard_writer):
    run_dir = str(tmp_path_factory.mktemp("faulted"))
    cfg = _cfg(services, "debug.fail_at_step=3", "parallel.zero_stage=3")
    data = shard_writer(str(tmp_path_factory.mktemp("latents-copy")))  # same rows, local copy
    result = train("distill", distill.train_loop_per_worker, cfg, data, run_dir)
    return {"result": result, "run_dir": run_dir, "data": data}


@pytest.fixture(scope="module")
def reshaped(services, reference, faulted):
    """Both runs continued from their step-4 checkpoint to step 6 on a single worker."""
    s3 = boto3.client("s3")
    copy_dir = f"s3://{BUCKET}/runs/reshaped"
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="runs/reference/"):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("result.json"):  # the copy is a run that has not finished
                s3.copy_object(Bucket=BUCKET, Key=obj["Key"].replace("runs/reference/", "runs/reshaped/", 1),
                               CopySource={"Bucket": BUCKET, "Key": obj["Key"]})
    one = ["optim.steps=6", "parallel.num_workers=1"]
    zero2 = train("distill", distill.train_loop_per_worker, _cfg(services, *one), reference["data"], copy_dir)
    zero3 = train("distill", distill.train_loop_per_worker, _cfg(services, *one, "parallel.zero_stage=3"),
                  faulted["data"], faulted["run_dir"])
    return {"zero2": zero2, "zero3": zero3, "zero2_dir": copy_dir}


@pytest.fixture(scope="module")
def nan_lora(services, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("nan-lora"))
    cfg = _cfg(services, "method.generator=lora", "debug.nan_at_step=3", "health.max_rollbacks=1")
    result = train("distill", distill.train_loop_per_worker, cfg, services["latents"], run_dir)
    return {"result": result, "run_dir": run_dir}


# ---------------------------------------------------------------------------------------------


def test_s3_run_checkpoints_mlflow_and_export(services, reference):
    result, run_dir = reference["result"], reference["run_dir"]
    assert result["status"] == "finished" and result["steps"] == 4 and result["method"] == "w2svd"
    assert result["checkpoint"].startswith(f"s3://{BUCKET}/runs/reference/train/checkpoint_")
    assert result["export"] == f"{run_dir}/export"
    assert json.loads(storage.read_bytes(f"{run_dir}/result.json")) == result
    assert result["checkpoint"] == f"s3://{BUCKET}/runs/reference/train/checkpoint_step00000004"

    # Checkpoints are in the bucket, with every role's engine state and both ranks' RNG.
    keys = [o["Key"] for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix="runs/reference/train/") for o in page.get("Contents", [])]
    latest = result["checkpoint"][len(f"s3://{BUCKET}/"):]
    names = {k[len(latest) + 1:] for k in keys if k.startswith(latest + "/")}
    assert {"state.json", "config.yaml", "rng_rank0.pt", "rng_rank1.pt"} <= names
    assert any(n.startswith("critic/") and "optim_states" in n for n in names)
    assert any(n.startswith("generator/") and "model_states" in n for n in names)
    state = json.loads(storage.read_bytes(f"{result['checkpoint']}/state.json"))
    assert state["step"] == 4 and state["data_position"] == 4
    assert len({k.split("/")[3] for k in keys if "/checkpoint_" in k}) >= 2  # every 2 steps, kept 3

    # MLflow: params, per-role losses at every step, learning rates, perf, system metrics, videos.
    client = MlflowClient(services["mlflow"])
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.params["method.name"] == "w2svd" and run.data.params["optim.steps"] == "4"
    assert sorted(_history(services, run.info.run_id, "critic/loss")) == [1, 2, 3, 4]
    # The shared iteration (w2svd/iteration.py): the generator moves at iterations 0 and 2 (steps 1, 3).
    assert sorted(_history(services, run.info.run_id, "gen/dmd")) == [1, 3]
    for key in ("lr/generator", "perf/step_time_s", "perf/samples_per_s", "perf/peak_memory_mb",
                "grad_norm/critic", "quick/temporal_flickering", "system/cpu_utilization_percentage",
                "guard/signal"):
        assert key in run.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert {"samples/step_000003.mp4"} <= artifacts
    local = client.download_artifacts(run.info.run_id, "samples/step_000003.mp4")
    assert Path(local).stat().st_size > 1000

    # The export loads from the bucket and samples.
    backbone, settings = load_generator(result["export"])
    assert settings.method == "w2svd" and settings.steps == 4
    cfg = load_config("debug")
    noise = torch.randn(1, 16, 3, 8, 6, generator=torch.Generator().manual_seed(0))
    latents = generate_latents(backbone, settings, dummy_cond(cfg.model, 1, 16), noise)
    assert latents.shape == noise.shape and torch.isfinite(latents).all()


def test_finished_run_says_so(services, reference, capsys):
    again = train("distill", distill.train_loop_per_worker, _cfg(services), reference["data"], reference["run_dir"])
    assert again == reference["result"]
    assert "already finished at step 4" in capsys.readouterr().out


def test_worker_failure_restarts_and_ends_where_an_uninterrupted_run_ends(services, reference, faulted):
    result = faulted["result"]
    assert result["status"] == "finished" and result["steps"] == reference["result"]["steps"] == 4
    history = _history(services, result["mlflow_run_id"], "critic/loss")
    assert sorted(history) == [1, 2, 3, 4]
    # Step 3 ran twice: before the failure, and again after resuming from the step-2 checkpoint.
    assert len(history[3]) == 2 and all(len(history[s]) == 1 for s in (1, 2, 4))


def test_the_ema_export_of_a_killed_zero3_run_equals_the_uninterrupted_one(reference, faulted):
    # The EMA is checkpointed per rank (a ZeRO-3 partition each here) and resumed: restarting it
    # at the step-2 checkpoint from the weights there would give another export.
    ref, _ = load_generator(reference["result"]["export"])
    got, _ = load_generator(faulted["result"]["export"])
    for (name, a), (_, b) in zip(ref.named_parameters(), got.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


def test_a_run_resumes_on_another_number_of_workers(services, reference, faulted, reshaped):
    for key in ("zero2", "zero3"):
        result = reshaped[key]
        assert result["status"] == "finished" and result["steps"] == 6, result
        assert _history(services, result["mlflow_run_id"], "critic/loss").keys() == {1, 2, 3, 4, 5, 6}
    # ZeRO-2 from the bucket: the continued run's checkpoints and export are in the bucket too.
    assert reshaped["zero2"]["checkpoint"].startswith(f"{reshaped['zero2_dir']}/train/checkpoint_step00000006")
    state = json.loads(storage.read_bytes(f"{reshaped['zero2']['checkpoint']}/state.json"))
    assert state["world_size"] == 1 and state["data_position"] == 4 * 2 // 1 + 2
    backbone, _ = load_generator(reshaped["zero3"]["export"])
    assert all(torch.isfinite(p).all() for p in backbone.parameters())


def test_losses_after_resume_match_the_uninterrupted_run(services, reference, faulted):
    for key in ("critic/loss", "critic/flow_matching", "gen/dmd"):
        ref = _history(services, reference["result"]["mlflow_run_id"], key)
        got = _history(services, faulted["result"]["mlflow_run_id"], key)
        assert sorted(ref) == sorted(got)
        for step in ref:
            for value in got[step]:  # the replayed step 3 included
                assert value == pytest.approx(ref[step][0], rel=1e-5, abs=1e-7), (key, step)


def test_nan_rolls_back_with_a_clear_message_and_no_poisoned_checkpoint(services, nan_lora):
    result, run_dir = nan_lora["result"], nan_lora["run_dir"]
    assert result["status"] == "finished" and result["steps"] == 4 and result["rollbacks"] == 1
    health = json.loads(Path(run_dir, "health.json").read_text())
    assert "step 3: non-finite critic/" in health["history"][0] and "rolling back" in health["history"][0]
    assert health["lr_scale"] == 0.5
    run = MlflowClient(services["mlflow"]).get_run(result["mlflow_run_id"])
    assert "rolling back to the last good checkpoint" in run.data.tags["health"]
    lrs = _history(services, result["mlflow_run_id"], "lr/critic")
    assert lrs[2] == [1e-3] and lrs[4] == [pytest.approx(5e-4)]  # lowered after the rollback

    checkpoint = Path(result["checkpoint"])
    tensors = 0
    for file in checkpoint.rglob("*.pt"):
        state = torch.load(file, map_location="cpu", weights_only=False)
        stack = [state]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, (list, tuple)):
                stack.extend(item)
            elif isinstance(item, torch.Tensor) and item.is_floating_point():
                tensors += 1
                assert torch.isfinite(item).all(), file
    assert tensors > 10
    backbone, settings = load_generator(Path(run_dir, "export"))
    assert all(torch.isfinite(p).all() for p in backbone.parameters())
    assert Path(run_dir, "export", "transformer_lora", "adapter_model.safetensors").is_file()


def test_shared_base_holds_one_copy_of_the_base_per_worker(reference, nan_lora):
    def local_bytes(*overrides):  # the same roles built in this process, without DeepSpeed
        cfg = load_config("debug", list(overrides))
        return count_parameter_bytes(build_roles_from_config(build_backbone(cfg.model), cfg.method))

    base = count_parameter_bytes(build_backbone(load_config("debug").model))
    full = reference["result"]["stats"]["stats/param_bytes_per_worker"]
    shared = nan_lora["result"]["stats"]["stats/param_bytes_per_worker"]
    # The workers hold what the roles hold (DeepSpeed adds no parameter copy; ZeRO-2 may pad).
    assert shared == pytest.approx(local_bytes("method.generator=lora"), rel=0.02)
    assert full == pytest.approx(local_bytes("method.generator=full"), rel=0.02)
    assert full - shared > 0.9 * base  # the full generator is a second copy of the base ...
    assert shared - base < 0.3 * base  # ... shared-base mode adds only adapters and the head
    assert reference["result"]["stats"]["stats/step_time_s"] > 0


def test_finetune_lowers_the_flow_matching_loss(services, latents_dir, tmp_path):
    run_dir = tmp_path / "finetune"
    code = finetune.main(["--config", "debug", "--data", latents_dir, "--run-dir", str(run_dir),
                          *COMMON, "optim.steps=6", "optim.finetune_lr=0.01", "optim.checkpoint_every=6",
                          "optim.sample_every=6", f"tracking.tracking_uri={services['mlflow']}"])
    assert code == 0
    result = json.loads((run_dir / "result.json").read_text())
    assert result["method"] == "finetune" and result["steps"] == 6

    before = build_backbone(load_config("debug").model)
    after, settings = load_generator(run_dir / "export")
    assert settings.mode == "euler" and settings.method == "finetune"
    # The export is a teacher for distillation as well.
    build_backbone(load_config("debug", [f"model.teacher={run_dir / 'export'}"]).model)

    import pyarrow.parquet as pq

    from pipelines.reader import collate_latent_batch

    table = pq.read_table(sorted(Path(latents_dir, "shards").glob("*.parquet"))[0])
    batch = collate_latent_batch(table)
    cond = Cond(batch.text.float(), batch.text_mask.float(), batch.pooled.float())

    def loss(model):
        g = torch.Generator().manual_seed(7)
        values = []
        for _ in range(8):
            sigma = torch.rand(batch.latents.shape[0], generator=g) * 0.9 + 0.05
            with torch.no_grad():
                values.append(flow_matching_step(View(model), batch.latents.float(), cond, sigma,
                                                 backward=lambda _: None, generator=g)["fm/loss"])
        return sum(values) / len(values)

    assert loss(after) < 0.92 * loss(before)  # 6 steps; ~0.88 measured


def test_finetune_exports_the_ema_of_its_weights(services, latents_dir, tmp_path):
    """Two updates at decay ½ from the initial weights θ0: the export holds ¼θ0 + ¼θ1 + ½θ2, where
    θ1 and θ2 are the trained weights of the step checkpoints."""
    run_dir = tmp_path / "finetune-ema"
    code = finetune.main(["--config", "debug", "--data", latents_dir, "--run-dir", str(run_dir),
                          *COMMON, "optim.steps=2", "optim.finetune_lr=0.01", "optim.finetune_ema=0.5",
                          "optim.checkpoint_every=1", "optim.sample_every=2",
                          f"tracking.tracking_uri={services['mlflow']}"])
    assert code == 0

    def weights(step: int) -> dict[str, torch.Tensor]:
        states = torch.load(run_dir / "train" / f"checkpoint_step{step:08d}" / "teacher" / "mp_rank_00_model_states.pt",
                            map_location="cpu", weights_only=False)["module"]
        return {k.removeprefix("0.transformer."): v.float() for k, v in states.items()}

    theta0 = {k: v.float() for k, v in build_backbone(load_config("debug").model).transformer.state_dict().items()}
    theta1, theta2 = weights(1), weights(2)
    exported = {k: v.float() for k, v in load_generator(run_dir / "export")[0].transformer.state_dict().items()}
    moved = [k for k in exported if not torch.equal(theta2[k], theta1[k])]
    assert moved, "the fine-tune did not change the weights"
    for k in moved:
        torch.testing.assert_close(exported[k], 0.25 * theta0[k] + 0.25 * theta1[k] + 0.5 * theta2[k],
                                   rtol=1e-5, atol=1e-6)
        assert not torch.allclose(exported[k], theta2[k])


def test_distill_refuses_euler(tmp_path, capsys):
    assert distill.main(["--config", "debug", "--data", str(tmp_path), "--run-dir", str(tmp_path),
                         "method.name=euler"]) == 2
    assert "nothing to train" in capsys.readouterr().err


def _drift_stop_args(services, run_dir: Path, checkpoint_every: int) -> list[str]:
    """A 12-step distillation whose guard stops it at the first rise of the critic's loss."""
    return ["--data", services["latents"], "--run-dir", str(run_dir), "--config", "debug", *COMMON,
            f"tracking.tracking_uri={services['mlflow']}", "optim.steps=12", f"optim.checkpoint_every={checkpoint_every}",
            "health.drift_signal=critic_loss", "health.drift_every=1", "health.drift_warmup=0",
            "health.drift_patience=1", "health.drift_smoothing=0", "health.drift_rise=0"]


def test_a_drift_stop_exports_the_best_state_by_the_signal(services, tmp_path, capsys):
    """A guard set to fire at the first rise of the critic's loss (checked every step, no band):
    the run stops, loads the checkpoint with the lowest signal and exports it; the command exits 0."""
    run_dir = tmp_path / "drift-stop"
    assert distill.main(_drift_stop_args(services, run_dir, checkpoint_every=2)) == 0
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "stopped" and result["stopped_by"] == "drift" and "drift" in result["reason"]
    assert result["export_kept_by"] == "drift"  # the worker's marker, not just an export folder
    fired = result["drift_fired_at"]
    kept = Path(result["best_checkpoint"])
    signals = {int(p.name.removeprefix("checkpoint_step")): json.loads((p / "state.json").read_text())["drift_signal"]
               for p in kept.parent.glob("checkpoint_step*")}
    assert int(kept.name.removeprefix("checkpoint_step")) == min(signals, key=signals.get) < fired
    # The export is the kept state (result.json's export_step), not the state at the stop.
    assert result["export_step"] == int(kept.name.removeprefix("checkpoint_step"))
    backbone, _ = load_generator(run_dir / "export")
    assert all(torch.isfinite(p).all() for p in backbone.parameters())
    assert "exported its best state" in capsys.readouterr().err


def test_a_drift_stop_before_any_checkpoint_exports_the_state_at_the_stop_and_says_so(services, tmp_path, capsys):
    """The same guard with no checkpoint due before it fires: there is no kept state to load, so
    the export is the state at the stop, marked as such, and the command still exits 0."""
    run_dir = tmp_path / "drift-stop-early"
    assert distill.main(_drift_stop_args(services, run_dir, checkpoint_every=100)) == 0
    result = json.loads((run_dir / "result.json").read_text())
    assert result["stopped_by"] == "drift" and result["export_kept_by"] == "drift-at-stop"
    assert result["best_checkpoint"] is None and result["export_step"] == result["drift_fired_at"] < 12
    assert "before any checkpoint; exported the state at the stop" in capsys.readouterr().err


def test_the_checkpoint_with_the_lowest_drift_signal_outlives_newer_ones(services, tmp_path):
    """Ray Train keeps the newest checkpoints and the one with the lowest drift signal (the state a
    drift stop exports): kept by age alone, it would be gone three checkpoints later."""
    run_dir = tmp_path / "drift-keep"
    args = ["--data", services["latents"], "--run-dir", str(run_dir), "--config", "debug", *COMMON,
            f"tracking.tracking_uri={services['mlflow']}", "optim.steps=10", "optim.checkpoint_every=1",
            # A generator rate 300× the debug config's drives its samples away from the data.
            "optim.generator_lr=0.03", "health.drift_signal=proj_gap", "health.drift_every=2",
            "health.drift_smoothing=0", "health.drift_action=log"]
    assert distill.main(args) == 0
    trace = json.loads((run_dir / "drift.json").read_text())["trace"]
    signal_at = {step: signal for step, _, signal in trace}  # checked before the step's checkpoint
    lowest = min(signal_at, key=signal_at.get)
    assert lowest < 8, "the run's lowest signal must be older than its three newest checkpoints to test this"
    kept = sorted(int(p.name.removeprefix("checkpoint_step")) for p in (run_dir / "train").glob("checkpoint_step*"))
    assert lowest in kept and 10 in kept and len(kept) <= 4
    result = json.loads((run_dir / "result.json").read_text())
    assert result["best_checkpoint"].endswith(f"checkpoint_step{lowest:08d}")
