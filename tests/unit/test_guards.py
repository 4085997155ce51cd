"""The worker's guards without a cluster: the drift guard's decisions become rollbacks and stops
recorded in health.json, and a restarted worker reads them back."""

import json
import math

import pytest
import torch

from pipelines import checkpoint
from pipelines.guards import DRIFT_FILE, HEALTH_FILE, Guards, RollbackRequested
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
    assert g.lr_scale == 1.0 and g.drift.fired_at == 3 and g.in_band  # resumable: log-only changes nothing
    recorded = json.loads((tmp_path / HEALTH_FILE).read_text())
    assert "logged only" in recorded["drift"]["history"][0] and "stopped" not in recorded
    assert "drift: step 3" in capsys.readouterr().err
    assert feed(g, 4, 2.2) and feed(g, 5, 2.3)  # a second firing goes on too, not re-recorded
    assert len(json.loads((tmp_path / HEALTH_FILE).read_text())["drift"]["history"]) == 1
    # A resumed run carries on from its checkpoint, which is newer than the firing's record.
    resumed = guards(tmp_path, "log")
    resumed.load_checkpoint_state(g.state_dict())
    assert resumed.drift.state.checks == 5 and [row[0] for row in resumed.drift.state.trace] == [1, 2, 3, 4, 5]


def test_a_stop_names_the_checkpoint_with_the_best_drift_signal(tmp_path):
    for step, signal in ((2, 0.9), (4, 0.4), (6, 1.7)):
        folder = tmp_path / checkpoint.dir_name(step)
        folder.mkdir()
        (folder / checkpoint.STATE_FILE).write_text(json.dumps({"step": step, "drift_signal": signal}))
    assert checkpoint.best_by_drift(str(tmp_path), None).endswith(checkpoint.dir_name(4))


def test_the_checkpoint_that_lowers_the_drift_signal_outranks_every_newer_one_that_does_not(tmp_path):
    nan, tier = math.nan, checkpoint.BEST_TIER
    assert checkpoint.keep_rank(5, 0.3, None) == 5 + tier  # the first signal is the lowest so far
    assert checkpoint.keep_rank(5, 0.3, 0.2) == 5 and checkpoint.keep_rank(5, 0.2, 0.2) == 5  # not lower
    assert checkpoint.keep_rank(5, nan, None) == 5 and checkpoint.keep_rank(5, nan, 0.2) == 5  # no signal: age
    assert checkpoint.keep_rank(9, 0.5, None) > checkpoint.keep_rank(1000, 0.6, 0.5) > checkpoint.keep_rank(999, 0.7, 0.5)
    for step, signal in ((2, 0.9), (4, 0.4), (6, 1.7)):
        folder = tmp_path / checkpoint.dir_name(step)
        folder.mkdir()
        (folder / checkpoint.STATE_FILE).write_text(json.dumps({"step": step, "drift_signal": signal}))
    # Against the checkpoints written before it: 0.5 is the lowest at step 3, not at step 8.
    assert checkpoint.rank_for_keeping(str(tmp_path), None, 3, 0.5) == 3 + tier
    assert checkpoint.rank_for_keeping(str(tmp_path), None, 8, 0.5) == 8
    assert checkpoint.rank_for_keeping(str(tmp_path), None, 8, 0.39) == 8 + tier


def test_the_projected_gap_samples_the_window_before_each_check_and_writes_its_trace(tmp_path):
    cfg = load_config("debug", ["health.drift_every=null", "method.gen_update_every=2", "health.drift_window=3",
                                "optim.batch_size=2", "health.drift_action=log"])
    g = Guards(cfg, str(tmp_path), None, rank=0, world=1, tracker=Tracker(None, None))
    assert g.every == 10  # null: 5 generator updates of 2 steps each
    sampled = []

    def sample_at(step):
        def sample(generator):
            sampled.append(step)
            return torch.randn(2, 4, generator=generator) + step
        return sample

    for step in range(20):  # the check after step s's update runs at s + 1
        g.observe(step, {}, torch.zeros(2, 4), None, sample_at(step))
        assert g.check(step + 1, {"critic/loss": 1.0})
    assert sampled == [7, 8, 9, 17, 18, 19]
    trace = json.loads((tmp_path / DRIFT_FILE).read_text())
    assert [row[0] for row in trace["trace"]] == [10, 20] and trace["signal"] == "proj_gap"
    # The second check compares only its own window: samples near 18, data at 0.
    assert trace["trace"][1][1] > trace["trace"][0][1] + 5


def test_a_distillation_the_guard_cannot_watch_or_keep_from_is_told_so(capsys):
    from pipelines.distill import warn_about_the_guard

    base = ["method.gen_update_every=2", "health.drift_every=null", "health.drift_warmup=10", "health.drift_patience=8"]
    warn_about_the_guard(load_config("debug", [*base, "optim.steps=179"]))
    assert "cannot fire in this run: its earliest firing is step 180" in capsys.readouterr().err
    warn_about_the_guard(load_config("debug", [*base, "optim.steps=180"]))
    assert capsys.readouterr().err == ""
    # The portrait world's checkpoint interval (250) leaves the guard nothing to keep at 180.
    warn_about_the_guard(load_config("debug", [*base, "optim.steps=1000", "optim.checkpoint_every=250"]))
    assert "can act at step 180, before the first checkpoint" in capsys.readouterr().err
    for quiet in ("optim.checkpoint_every=180", "health.drift_action=log"):
        warn_about_the_guard(load_config("debug", [*base, "optim.steps=1000", "optim.checkpoint_every=250", quiet]))
        assert capsys.readouterr().err == "", quiet


def test_only_a_guard_that_acts_and_is_past_warmup_marks_states_out_of_band(tmp_path):
    def in_band_after(action: str, warmup: int) -> list[bool]:
        cfg = load_config("debug", ["health.drift_signal=critic_loss", "health.drift_every=1", "health.drift_smoothing=0",
                                    "health.drift_rise=0.1", "health.drift_patience=5", f"health.drift_warmup={warmup}",
                                    f"health.drift_action={action}"])
        g = Guards(cfg, str(tmp_path / f"{action}{warmup}"), None, rank=0, world=1, tracker=Tracker(None, None))
        marks = []
        for step, loss in enumerate([1.0, 2.0, 2.0, 2.0], start=1):
            g.observe(step, {"critic/flow_matching": loss}, data_x=None, cond_x=None, sample=None)
            assert g.check(step, {"critic/loss": loss})
            marks.append(g.in_band)
        return marks

    assert in_band_after("stop", warmup=0) == [True, False, False, False]
    assert in_band_after("stop", warmup=2) == [True, True, False, False]  # checks 1-2: warmup
    assert in_band_after("log", warmup=0) == [True, True, True, True]  # a killed run can resume anywhere
