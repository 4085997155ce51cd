"""HealthMonitor: NaN → rollback at once, collapse only after patience, stop after max_rollbacks."""

from __future__ import annotations

import math

from w2svd.config import load_config
from w2svd.health import HealthMonitor, HealthState


def _monitor(**kw):
    args = dict(patience=2, max_rollbacks=1, lr_decay_on_rollback=0.5, sample_std_band=(0.2, 5.0), loss_max=100.0)
    args.update(kw)
    return HealthMonitor(**args)


GOOD = {"critic/loss": 0.5, "gen/sample_std": 1.0, "data/std": 1.0}


def test_healthy_steps_are_ok():
    m = _monitor()
    for step in range(5):
        d = m.check(step, GOOD, {"critic": 1.0})
        assert d.ok and d.lr_scale == 1.0


def test_nan_loss_or_grad_rolls_back_at_once_then_stops():
    m = _monitor()
    d = m.check(3, {**GOOD, "critic/loss": math.nan})
    assert d.action == "rollback" and "critic/loss=nan" in d.reason and "rollback 1 of 1" in d.reason
    assert d.lr_scale == 0.5
    d = m.check(4, GOOD, {"generator": math.inf})
    assert d.action == "stop" and "grad_norm/generator=inf" in d.reason and "health.max_rollbacks" in d.reason


def test_collapse_signal_needs_patience_and_resets():
    m = _monitor()
    collapsed = {**GOOD, "gen/sample_std": 0.05}
    assert m.check(1, collapsed).ok
    assert m.check(2, GOOD).ok  # back in band: the count resets
    assert m.check(3, collapsed).ok
    d = m.check(4, collapsed)
    assert d.action == "rollback" and "sample std" in d.reason


def test_diverging_loss_is_a_collapse_signal():
    m = _monitor(patience=1)
    d = m.check(1, {**GOOD, "critic/loss": 1e6})
    assert d.action == "rollback" and "critic/loss" in d.reason and "health.loss_max" in d.reason


def test_state_survives_a_restart_and_config_builds_it():
    m = _monitor()
    m.check(1, {**GOOD, "critic/loss": math.nan})
    again = HealthMonitor.from_config(load_config("debug").health, HealthState(**m.state_dict()))
    assert again.state.rollbacks == 1 and again.lr_scale == 0.5


def test_disabled_monitor_never_intervenes():
    m = _monitor(enabled=False)
    assert m.check(1, {"critic/loss": math.nan}).ok
