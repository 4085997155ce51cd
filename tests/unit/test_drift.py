"""The drift guard: its statistic against closed forms, and its decisions on synthetic traces."""

import math

import pytest
import torch

from w2svd.config import load_config
from w2svd.drift import (
    DriftGuard,
    check_interval,
    earliest_firing_step,
    joint_features,
    projected_gap,
    random_projection_FK,
    sliced_w1,
    summarize_BF,
)


def test_sliced_w1_of_shifted_samples_is_the_mean_shift():
    a_NK = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    b_NK = a_NK + torch.tensor([0.5, -2.0])
    assert sliced_w1(a_NK, b_NK) == pytest.approx((0.5 + 2.0) / 2, abs=1e-9)
    # Two points vs two points in 1-D: quantiles {0, 1} vs {0, 3}: W1 = (0 + 2) / 2.
    assert sliced_w1(torch.tensor([[0.0], [1.0]]), torch.tensor([[3.0], [0.0]])) == pytest.approx(1.0)


def test_projected_gap_is_small_for_one_law_and_large_for_another():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2000, 6, generator=g), torch.randn(2000, 6, generator=g)
    proj = random_projection_FK(6, 4, seed=0)
    assert torch.allclose(proj.T @ proj, torch.eye(4), atol=1e-5)
    same, shifted = projected_gap(x @ proj, y @ proj), projected_gap((x + 1.0) @ proj, y @ proj)
    assert same < 0.06 and shifted > 0.3


def test_joint_features_let_the_statistic_see_a_wrong_conditional():
    # Two conditions with opposite means; a generator that swaps them has the right marginal.
    g = torch.Generator().manual_seed(2)
    c_B2 = torch.nn.functional.one_hot(torch.arange(2000) % 2, 2).float()
    sign_B1 = (2 * c_B2[:, :1] - 1)
    data = 2 * sign_B1 + 0.3 * torch.randn(2000, 3, generator=g)
    swapped = -2 * sign_B1 + 0.3 * torch.randn(2000, 3, generator=g)
    proj = random_projection_FK(5, 16, seed=0)
    marginal = projected_gap(swapped @ proj[:3], data @ proj[:3])
    joint = projected_gap(joint_features(swapped, c_B2, 1.0, 1.0) @ proj, joint_features(data, c_B2, 1.0, 1.0) @ proj)
    assert marginal < 0.05 and joint > 0.2


def test_summarize_pools_video_latents_to_a_small_vector():
    assert summarize_BF(torch.zeros(3, 16, 5, 32, 24)).shape == (3, 16 * 5 * 16)
    assert summarize_BF(torch.zeros(2, 7)).shape == (2, 7)


def test_the_local_std_sees_detail_that_the_pooled_mean_averages_away():
    # A smooth layout, and the same layout with a ±a checkerboard: equal means in every 2×2 cell.
    g = torch.Generator().manual_seed(0)
    smooth_BCTHW = torch.randn(2, 3, 2, 2, 2, generator=g).repeat_interleave(2, -1).repeat_interleave(2, -2)
    a = 0.7
    board_HW = a * (1 - 2 * ((torch.arange(4)[:, None] + torch.arange(4)[None]) % 2)).float()
    textured_BCTHW = smooth_BCTHW + board_HW
    pooled = summarize_BF(smooth_BCTHW, pooled=2)
    torch.testing.assert_close(summarize_BF(textured_BCTHW, pooled=2), pooled)
    plain, detailed = summarize_BF(smooth_BCTHW, 2, local_std=True), summarize_BF(textured_BCTHW, 2, local_std=True)
    assert detailed.shape == (2, 2 * 3 * 2 * 4)
    # The plain summary, then every cell's std.
    torch.testing.assert_close(detailed[:, :24], pooled)
    torch.testing.assert_close(plain[:, 24:], torch.zeros(2, 24), atol=1e-3, rtol=0)
    torch.testing.assert_close(detailed[:, 24:], torch.full((2, 24), a), atol=1e-3, rtol=0)


def _run(guard: DriftGuard, values):
    return [guard.decide(i, v) for i, v in enumerate(values)]


def test_guard_fires_on_a_drifting_trace_and_not_on_a_flat_noisy_one():
    g = torch.Generator().manual_seed(3)
    noise = (0.1 * torch.randn(60, generator=g)).tolist()
    # Falls to 1.0 by check 20, stays, then rises by 5 % per check from check 35.
    drifting = [max(1.0, 3.0 - 0.1 * i) * (1 + 0.05 * max(0, i - 35)) * (1 + n) for i, n in enumerate(noise)]
    flat = [1.0 * (1 + n) for n in noise]
    fired = _run(DriftGuard(signal="disc_acc", rise=0.5, patience=3, warmup=5, smoothing=0.5), drifting)
    fire_at = next(i for i, d in enumerate(fired) if d.action != "ok")
    assert 40 < fire_at < 55 and fired[fire_at].action == "stop" and "drift" in fired[fire_at].reason
    assert all(d.action == "ok" for d in _run(DriftGuard(signal="disc_acc", rise=0.5, patience=3), flat))


def test_guard_rolls_back_with_a_lower_rate_then_stops_and_remembers_across_a_restart():
    guard = DriftGuard(signal="score_gap", rise=0.2, patience=2, warmup=0, smoothing=0.0, action="rollback",
                       max_rollbacks=1, lr_decay=0.5)
    decisions = _run(guard, [1.0, 1.0, 2.0, 2.0])
    assert [d.action for d in decisions] == ["ok", "ok", "ok", "rollback"]
    assert decisions[0].is_best and not decisions[2].in_band and decisions[3].lr_scale == 0.5
    assert guard.fired_at == 3 and math.isnan(guard.signal)  # the restored state is measured afresh
    restarted = DriftGuard(signal="score_gap", rise=0.2, patience=2, warmup=0, smoothing=0.0, action="rollback",
                           max_rollbacks=1, lr_decay=0.5)
    restarted.load_state_dict(guard.state_dict())
    tail = [restarted.decide(4 + i, v) for i, v in enumerate([2.0, 2.0])]
    assert [d.action for d in tail] == ["ok", "stop"] and tail[-1].lr_scale == 0.5


def test_guard_accumulates_metrics_and_samples_between_checks():
    guard = DriftGuard(signal="disc_acc")
    for v in (0.5, 0.7):
        guard.observe({"critic/disc_acc": v})
    assert guard.value() == pytest.approx(0.6) and math.isnan(guard.value())
    proj = DriftGuard(signal="proj_gap", window=64)
    g = torch.Generator().manual_seed(4)
    for _ in range(4):
        x = torch.randn(32, 5, generator=g)
        proj.observe({}, gen_x=x + 3.0, data_x=x, cond_x=torch.ones(32, 2))
    assert len(proj.state.gen_proj) == 64 and proj.value() > 1.0


def test_guard_is_built_from_the_health_config():
    cfg = load_config("debug", ["health.drift_signal=disc_acc", "health.drift_action=rollback"])
    guard = DriftGuard.from_config(cfg.health, rows_per_batch=cfg.optim.batch_size)
    assert guard.kind == "disc_acc" and guard.action == "rollback"
    assert guard.window == cfg.health.drift_window * cfg.optim.batch_size
    with pytest.raises(ValueError, match="drift_signal"):
        load_config("debug", ["health.drift_signal=loss"])


def test_a_logging_guard_records_the_fire_and_changes_nothing():
    guard = DriftGuard(signal="score_gap", rise=0.2, patience=2, warmup=0, smoothing=0.0, action="log")
    decisions = _run(guard, [1.0, 2.0, 2.0, 2.0])
    assert all(d.action == "ok" for d in decisions) and guard.fired_at == 2
    assert "logged only" in decisions[2].reason and decisions[2].lr_scale == 1.0
    assert DriftGuard.from_config(load_config("debug", ["health.drift_action=log"]).health, 4).action == "log"


def test_the_default_guard_is_the_third_rounds_and_it_acts():
    default = DriftGuard.from_config(load_config("debug").health, 4)
    assert (default.kind, default.action, default.rise, default.patience) == ("proj_gap", "stop", 0.1, 8)


def test_the_projected_gap_sees_a_late_drift_because_it_forgets_the_steady_rows():
    # 60 steady batches, then 3 drifted ones: a window of a few batches sees the drift at full
    # size; a window spanning the run (the statistic before drift_window) sees it diluted.
    def observed(window: int) -> float:
        guard, g = DriftGuard(signal="proj_gap", window=window), torch.Generator().manual_seed(5)
        for i in range(63):
            x_B5 = torch.randn(8, 5, generator=g)
            drift = 3.0 if i >= 60 else 0.0
            guard.observe({}, gen_x=torch.randn(8, 5, generator=g) + drift, data_x=x_B5, cond_x=None)
        return guard.value()

    assert observed(window=3 * 8) > 2.0 and observed(window=1024) < 0.5


def test_the_earliest_firing_step_is_where_a_guard_first_can_fire():
    # Best at the first check, far out of band from the second on: it fires at the earliest.
    for warmup, patience, every in ((0, 1, 1), (3, 2, 10), (10, 8, 25)):
        guard = DriftGuard(signal="disc_acc", rise=0.1, patience=patience, warmup=warmup, smoothing=0.0)
        steps = [every * n for n in range(1, 40)]
        fired = next(s for s, v in zip(steps, [1.0] + [9.0] * 38, strict=True) if guard.decide(s, v).action != "ok")
        assert fired == earliest_firing_step(every, warmup, patience)
        assert guard.state.trace[0] == [every, 1.0, 1.0] and len(guard.state.trace) == fired // every
    # Unset, a check spans the study's 5 generator updates at any critic ratio.
    assert check_interval(None, 2) == 10 and check_interval(None, 5) == 25 and check_interval(7, 2) == 7
    with pytest.raises(ValueError, match="drift_window"):
        load_config("debug", ["health.drift_window=0"])
