"""The worker's guards without a cluster: the drift guard's decisions become rollbacks and stops
recorded in health.json, and a restarted worker reads them back."""

import json

import pytest

from pipelines import checkpoint
from pipelines.guards import HEALTH_FILE, Guards, RollbackRequested
from pipelines.tracking import Tracker
from w2svd.config import load_config


def guards(tmp_path, action: str) -> Guards:
    cfg = load_config("debug", ["health.drift_signal=critic_loss", "health.drift_every=1", "health.drift_warmup=0",
                                "health.drift_patience=2", "health.drift_smoothing=0", "health.drift_rise=0.5",
                                f"health.drift_action={action}", "health.max_rollbacks=1"])
    return Guards(cfg, str(tmp_path), None, rank=0, world=1, tracker=Tracker(None, None))


def feed(g: Guards, step: int, critic_loss: float):
    g.observe(step, {"critic/flow_matching": critic_loss}, data_x=None, cond_x=None, sample=None)
    return g.check(step, {"critic/loss": critic_loss})


def test_drift_rolls_back_once_then_stops_and_a_restart_reads_both(tmp_path):
    g = guards(tmp_path, "rollback")
    assert feed(g, 1, 1.0) and feed(g, 2, 0.8) and g.in_band
    assert feed(g, 3, 1.5) and not g.in_band  # out of band once: patience 2
    with pytest.raises(RollbackRequested, match="drift"):
        feed(g, 4, 1.6)
    recorded = json.loads((tmp_path / HEALTH_FILE).read_text())
    assert recorded["lr_scale"] == 0.5 and recorded["drift"]["rollbacks"] == 1

    restarted = guards(tmp_path, "rollback")  # a new worker group after the rollback
    assert restarted.lr_scale == 0.5 and restarted.drift.state.rollbacks == 1
    restarted.load_checkpoint_state({"drift": {"rollbacks": 0}})  # an older checkpoint's copy loses
    assert restarted.drift.state.rollbacks == 1
    assert feed(restarted, 5, 0.8) and feed(restarted, 6, 2.0)
    assert feed(restarted, 7, 2.0) is False  # rollbacks used up: stop
    assert "stopping" in json.loads((tmp_path / HEALTH_FILE).read_text())["stopped"]


def test_a_logged_drift_changes_nothing_but_is_recorded_once(tmp_path, capsys):
    g = guards(tmp_path, "log")
    assert feed(g, 1, 1.0) and feed(g, 2, 2.0) and feed(g, 3, 2.1)  # fires at 3: the run goes on
    assert g.lr_scale == 1.0 and g.drift.fired_at == 3 and not g.in_band
    recorded = json.loads((tmp_path / HEALTH_FILE).read_text())
    assert "logged only" in recorded["drift"]["history"][0] and "stopped" not in recorded
    assert "drift: step 3" in capsys.readouterr().err
    assert feed(g, 4, 2.2) and feed(g, 5, 2.3)  # a second firing goes on too, not re-recorded
    assert len(json.loads((tmp_path / HEALTH_FILE).read_text())["drift"]["history"]) == 1


def test_a_stop_names_the_checkpoint_with_the_best_drift_signal(tmp_path):
    for step, signal in ((2, 0.9), (4, 0.4), (6, 1.7)):
        folder = tmp_path / checkpoint.dir_name(step)
        folder.mkdir()
        (folder / checkpoint.STATE_FILE).write_text(json.dumps({"step": step, "drift_signal": signal}))
    assert checkpoint.best_by_drift(str(tmp_path), None).endswith(checkpoint.dir_name(4))
