"""The family study at its smallest size: the protocol's order and fairness, the result contract.

At this size (tiny teacher, 16 generator updates) no distillation number means anything; the test
asserts what must hold at any size.
"""

import json
import math

import torch

import bench
from bench.toy_family import (
    METHODS,
    choose_guard,
    drift_event,
    guard_outcome,
    main,
    replay_guard,
    search_configs,
)

ROW_KEYS = {"problem", "split", "seed", "method", "steps", "variant", "fd", "fd_floor", "fd_best_on_curve",
            "modes_lost", "mode_tv", "guard_fired_at"}


def test_drift_events_and_guard_outcomes():
    curve = [{"gen_updates": u, "fd": fd} for u, fd in [(0, 10.0), (10, 4.0), (20, 4.9), (30, 5.1), (40, 3.0)]]
    assert drift_event(curve) == 30  # 5.1 > 1.25·4.0; 4.9 is not
    assert drift_event(curve[:3]) is None
    assert [guard_outcome(30, f) for f in (20, 30, 40, None)] == ["early", "early", "late", "missed"]
    assert [guard_outcome(None, f) for f in (20, None)] == ["false", "quiet"]
    trace = [{"gen_updates": 5 * i, "disc_acc": v} for i, v in enumerate([0.7, 0.6, 0.5, 0.5, 0.8, 0.8, 0.8])]
    params = {"signal": "disc_acc", "rise": 0.25, "patience": 2, "warmup": 1, "smoothing": 0.0, "action": "stop"}
    assert replay_guard(trace, params) == 25


def test_the_guard_rule_prefers_early_and_quiet_over_false():
    drifting = {"curve": [{"gen_updates": u, "fd": fd} for u, fd in [(0, 5.0), (20, 2.0), (40, 4.0)]],
                "trace": [{"gen_updates": u, "proj_gap": 1.0, "disc_acc": a, "score_gap": 1.0, "critic_loss": 1.0}
                          for u, a in [(5, 0.5), (10, 0.5), (15, 0.5), (20, 0.5), (25, 0.5), (30, 0.9), (35, 0.9),
                                       (40, 0.9), (45, 0.9), (50, 0.9)]]}
    guard, table = choose_guard([drifting])
    assert guard["signal"] == "disc_acc" and len(table) == 32
    assert next(t for t in table if t["signal"] == "proj_gap")["missed"] == 1


def test_every_method_gets_as_many_configurations_and_w2svd_dmd2_share_their_draws():
    configs = {m: search_configs(m, 6) for m in METHODS}
    assert {len(c) for c in configs.values()} == {6}
    for w, d in zip(configs["w2svd"][1:], configs["dmd2"][1:]):
        assert {k: v for k, v in w.items() if k != "lora_rank"} == d
    assert len({c["critic_lr"] for c in configs["dmd2"]}) > 1  # DMD2's critic rate is swept too


def test_fast_family_study_writes_the_contract(tmp_path):
    torch.set_num_threads(1)
    assert main(["--fast", "--out", str(tmp_path)]) == 0
    protocol = json.loads((tmp_path / "protocol.json").read_text())
    selection = json.loads((tmp_path / "selection.json").read_text())
    rows = json.loads((tmp_path / "family.json").read_text())
    assert (tmp_path / "curves_test.png").stat().st_size > 0 and (tmp_path / "summary.md").exists()
    # The rule and the search were fixed before any selection.
    assert protocol["written_at"] <= selection["chosen_at"]
    assert set(protocol["split"]["tuning"]).isdisjoint(protocol["split"]["test"])
    assert {len(protocol["search"][m]) for m in METHODS} == {2}
    for row in rows:
        assert ROW_KEYS <= set(row), set(row) ^ ROW_KEYS
        assert row["split"] == ("tuning" if row["problem"] in protocol["split"]["tuning"] else "test")
        assert math.isfinite(row["fd"]) and row["fd_floor"] < row["fd"]
    # The selection follows the written rule, from validation numbers of tuning problems only.
    for key, pick in selection["recipes"].items():
        method, steps = key.split("-")
        scores = [s for s in selection["tuning_scores"] if s["method"] == method and s["steps"] == int(steps)]
        assert pick["config"] == min(scores, key=lambda s: (round(s["mean_log_val_fd"], 9), s["val_modes_lost"],
                                                             s["config"]))["config"]
        tuning = [r for r in rows if r["split"] == "tuning" and r["method"] == method and r["steps"] == int(steps)
                  and r["config"] == pick["config"]]
        assert math.log(tuning[0]["val_fd"]) == next(s["mean_log_val_fd"] for s in scores
                                                     if s["config"] == pick["config"])
    test = [r for r in rows if r["split"] == "test"]
    assert {(r["method"], r["steps"]) for r in test if r["variant"] == "recipe"} == {
        (m, n) for m in METHODS for n in (1, 4)}
    assert {r["variant"] for r in test if r["method"] == "w2svd" and r["steps"] == 4} == {
        "recipe", "alpha0", "alpha0.1", "alpha0.5"}
    # The guard that watched the test runs decides exactly as its replay on their recorded traces.
    entries = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    watched = [e for e in entries if "row" in e and e["row"]["split"] == "test" and e["row"]["method"] != "lcm"]
    assert watched and all(replay_guard(e["trace"], selection["guard"]) == e["row"]["guard_fired_at"]
                           for e in watched)
    euler = {r["steps"]: r["fd"] for r in test if r["method"] == "euler"}
    assert euler[1] > euler[4]


def test_bench_dispatches_by_name():
    assert {"toy", "toy-family", "toy-family-r2", "toy-family-guard"} <= set(bench.available())
    assert bench.main(["no-such-bench"]) == 2


def test_round_two_keeps_round_one_and_its_rule_punishes_drift_on_one_problem():
    from bench.toy_family_r2 import FIRST_ROUND_CONFIGS, minimax_choice, round_two_configs

    for m in METHODS:  # the first round's configurations come first, unchanged: its runs are reused
        assert round_two_configs(m)[:FIRST_ROUND_CONFIGS] == search_configs(m, FIRST_ROUND_CONFIGS)
    w2, d2 = round_two_configs("w2svd"), round_two_configs("dmd2")
    assert len(w2) == len(d2) == len(round_two_configs("lcm")) == 12
    for w, d in zip(w2[FIRST_ROUND_CONFIGS:], d2[FIRST_ROUND_CONFIGS:]):
        assert {k: v for k, v in w.items() if k not in ("lora_rank", "alpha_weak")} == d
    # Config 0: best mean, but 3x its Euler reference on one problem; config 1 steady: minimax takes 1.
    euler = {("a", 4): 2.0, ("b", 4): 2.0, ("c", 4): 4.0}
    rows = [{"config": 0, "problem": p, "steps": 4, "val_fd": v} for p, v in (("a", 1.0), ("b", 1.0), ("c", 12.0))]
    rows += [{"config": 1, "problem": p, "steps": 4, "val_fd": v} for p, v in (("a", 2.2), ("b", 2.2), ("c", 4.4))]
    mean_log = {i: sum(math.log(r["val_fd"]) for r in rows if r["config"] == i) for i in (0, 1)}
    assert mean_log[0] < mean_log[1]  # the first round's rule would pick config 0
    pick, scored = minimax_choice(rows, euler, 2)
    assert pick == 1
    assert math.isclose(scored[0]["worst_log_vs_euler"], math.log(3.0))


def test_the_third_round_guard_scores_the_state_a_run_ends_with():
    from bench.toy_family_guard import GUARD_GRID, choose, end_fd, score

    # Fréchet improves to 1.0 at 20 updates, then drifts to 3.0; proj_gap tracks it, disc_acc is flat.
    curve = [{"gen_updates": u, "fd": fd} for u, fd in [(0, 4.0), (10, 2.0), (20, 1.0), (30, 2.0), (40, 3.0)]]
    gaps = [0.8, 0.6, 0.5, 0.4, 0.3, 0.3, 0.5, 0.7, 0.9, 1.1, 1.3, 1.5]
    trace = [{"gen_updates": 5 * (i + 1), "proj_gap": v, "disc_acc": 0.5, "score_gap": 1.0, "critic_loss": 1.0}
             for i, v in enumerate(gaps[:8])]
    drifting = {"curve": curve, "trace": trace}
    params = {"signal": "proj_gap", "smoothing": 0.0, "rise": 0.25, "patience": 1, "warmup": 0, "action": "stop"}
    # Best signal at 25 updates (0.3, first of the tie); fires at 35 (0.7 > 0.375): the state kept
    # is scored at the curve point at or before 25, i.e. 20 (fd 1.0) instead of the final 3.0.
    assert end_fd(drifting, params) == (1.0, 35)
    flat = {**params, "signal": "disc_acc"}
    assert end_fd(drifting, flat) == (3.0, None)
    s = score([drifting], params)
    assert s["mean_log_end_vs_best"] == 0.0 and s["late"] == 1 and s["false_rate"] == 0.0  # event at 30
    # A steady run whose noisy signal fires: the rule sees its cost, a false firing.
    steady = {"curve": [{"gen_updates": u, "fd": fd} for u, fd in [(0, 4.0), (20, 2.0), (40, 1.0)]],
              "trace": [{**p, "proj_gap": v} for p, v in zip(trace, [0.5, 0.9, 0.5, 0.9, 0.5, 0.9, 0.5, 0.9])]}
    assert score([steady], params)["false"] == 1
    guard, table = choose([drifting, steady])
    assert len(table) == math.prod(len(v) for v in GUARD_GRID.values())
    best = min(t["mean_log_end_vs_best"] for t in table)
    assert guard["signal"] == "proj_gap" and score([drifting, steady], guard)["mean_log_end_vs_best"] == best
