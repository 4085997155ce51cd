"""The family study's third round: a drift guard chosen for what a run ends with.

    w2svd bench toy-family-guard --out DIR [--no-live]   (DIR: the study's folder, both rounds done)

Why a third round, for the guard only. The first round's rule ("most early + quiet") chose a
guard that fires on nearly every run, and the post-hoc Youden rule picked one that separated
drifting from steady runs but fired mostly late. Neither asked what matters to a user: with
``drift_action = stop`` a run that fires ends with its best state *by the guard's signal*, so
a late firing costs nothing if that state is good, and a false firing costs only what the
steady run would still have gained. The rule below scores exactly that, on the recorded
training-quantity traces of the DMD-family **tuning** runs of both rounds (``DIR/runs.jsonl``):

    end(run)  = the Fréchet of the state the run ends with under the candidate guard
                (its best state by the signal if the guard fires, else its final state)
    score     = mean over tuning runs of log(end / best on the run's Fréchet curve)

Offline, the kept state is scored at the last curve point at or before it (curves every
``eval_every`` generator updates, checks every ``guard_every``): an approximation. The chosen
guard is therefore also run **live** on the test problems (the second round's recipes, every
seed; it records and does not act, so training is unchanged), where the kept state's Fréchet is
measured exactly. ``DIR/protocol-guard.json`` holds the rule and the candidates, written before
the choice. Writes ``DIR/guard.json``, ``DIR/summary-guard.md`` and ``DIR/guard.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

from bench._toy_runner import Run
from bench.toy_family import (
    FAMILY_SETTINGS,
    STEPS,
    Study,
    drift_event,
    guard_outcome,
    replay_guard_kept,
)
from w2svd.drift import SIGNALS
from w2svd.toy.problems import TEST, TUNING

GUARD_GRID = {"signal": list(SIGNALS), "smoothing": [0.5, 0.8, 0.9], "rise": [0.05, 0.1, 0.25, 0.5, 1.0],
              "patience": [1, 2, 4, 8], "warmup": [4, 10]}
GUARD_RULE = (
    "Over the DMD-family tuning runs of both rounds: the candidate (signal x smoothing x rise x patience x "
    "warm-up, action stop) with the lowest mean log(end / best on curve), where end is the Fréchet of the state "
    "the run ends with under it (its best state by the signal when it fires, scored at the last curve point at "
    "or before that state; else the final state). Ties (rounded to 0.01) go to the lower false-fire rate "
    "(firings on runs without a drift event), then the larger patience, then the larger warm-up.")
LIVE_VARIANT = "r2-guard3"
DMD_FAMILY = ("w2svd", "dmd2")


def best_fd(entry: dict) -> float:
    """The lowest Fréchet on a run's curve (its "best on the curve")."""
    return min(p["fd"] for p in entry["curve"])


def geo_mean(values) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def fd_at(curve: list[dict], updates: int) -> float:
    """The Fréchet at the last curve point at or before ``updates`` generator updates."""
    return [p["fd"] for p in curve if p["gen_updates"] <= updates][-1]


def end_fd(entry: dict, params: dict) -> tuple[float, int | None]:
    """The Fréchet a run ends with under the guard (action stop), offline; and when it fired."""
    fired, kept = replay_guard_kept(entry["trace"], params)
    return (entry["curve"][-1]["fd"] if fired is None else fd_at(entry["curve"], kept)), fired


def score(entries: list[dict], params: dict) -> dict:
    """The rule's numbers for one candidate over runs ``[{"curve", "trace"}]``."""
    counts = dict.fromkeys(("early", "late", "missed", "false", "quiet"), 0)
    logs = []
    for e in entries:
        end, fired = end_fd(e, params)
        counts[guard_outcome(drift_event(e["curve"]), fired)] += 1
        logs.append(math.log(end / best_fd(e)))
    steady = counts["false"] + counts["quiet"]
    return {"mean_log_end_vs_best": statistics.fmean(logs), "false_rate": counts["false"] / max(steady, 1), **counts}


def choose(entries: list[dict]) -> tuple[dict, list[dict]]:
    """``GUARD_RULE`` over the tuning runs: the chosen guard's parameters and the scored grid."""
    table = []
    for values in itertools.product(*GUARD_GRID.values()):
        params = {**dict(zip(GUARD_GRID, values)), "action": "stop"}
        table.append({**params, **score(entries, params)})
    best = min(table, key=lambda t: (round(t["mean_log_end_vs_best"], 2), t["false_rate"], -t["patience"], -t["warmup"]))
    return {k: best[k] for k in (*GUARD_GRID, "action")}, table


def early_tradeoff(table: list[dict], caps: tuple[float, ...] = (0.1, 0.2, 0.3)) -> list[dict]:
    """For each cap on the tuning false-fire rate: the candidate that fires at or before the most
    drift events under it (ties to the lower end score). What firing earlier costs in false alarms."""
    out = []
    for cap in caps:
        ok = [t for t in table if t["false_rate"] <= cap]
        if ok:
            best = max(ok, key=lambda t: (t["early"], -t["mean_log_end_vs_best"]))
            out.append({"false_rate_cap": cap, "params": {k: best[k] for k in (*GUARD_GRID, "action")}})
    return out


def no_guard_mean_log(entries: list[dict]) -> float:
    return statistics.fmean(math.log(e["curve"][-1]["fd"] / best_fd(e)) for e in entries)


class GuardRound(Study):
    def write_protocol(self) -> dict:
        path = self.out / "protocol-guard.json"
        if not path.exists():
            path.write_text(json.dumps({
                "written_at": time.strftime("%Y-%m-%d %H:%M:%S"), "amends": "protocol.json, protocol-r2.json",
                "why": __doc__.split("\n\n")[1].replace("\n", " "), "candidates": GUARD_GRID, "rule": GUARD_RULE,
                "live": {"variant": LIVE_VARIANT, "recipes": "selection-r2.json", "problems": list(self.test),
                         "seeds": self.seeds, "acts": False}}, indent=2))
        return json.loads(path.read_text())

    def recorded(self, split: str) -> list[dict]:
        """Every finished DMD-family run of ``split`` with a trace, both rounds, live re-runs excluded."""
        return [e for e in self.cache.values() if "row" in e and e["row"]["split"] == split
                and e["row"]["method"] in DMD_FAMILY and e.get("trace") and e["row"]["variant"] != LIVE_VARIANT]

    def live_runs(self, guard: dict) -> list[dict]:
        """The second round's DMD-family recipes on every test problem and seed, the guard watching."""
        recipes = json.loads((self.out / "selection-r2.json").read_text())["recipes"]
        entries = []
        for problem, seed in itertools.product(self.test, self.seeds):
            for method, steps in itertools.product(DMD_FAMILY, STEPS):
                pick = recipes[f"{method}-{steps}"]
                run = Run(method, steps, LIVE_VARIANT, pick["settings"])
                entries.append(self.run(problem, seed, run, pick["config"], guard))
        return entries

    def main(self, live: bool = True) -> dict:
        t0 = time.perf_counter()
        protocol = self.write_protocol()
        tuning, test = self.recorded("tuning"), self.recorded("test")
        guard, table = choose(tuning)
        self.log(f"guard (round 3): {guard}")
        earlier = {"round 1 (selection.json)": json.loads((self.out / "selection.json").read_text())["guard"]}
        posthoc = self.out / "guard_posthoc.json"
        if posthoc.exists():
            earlier["post-hoc Youden (guard_posthoc.json)"] = json.loads(posthoc.read_text())["guard"]
        replays = {"round 3": guard, **earlier,
                   **{f"most early, false <= {t['false_rate_cap']:g}": t["params"] for t in early_tradeoff(table)}}
        result = {"rule": protocol["rule"], "guard": guard, "chosen_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "tuning_runs": len(tuning), "test_runs": len(test),
                  "no_guard": {"tuning": no_guard_mean_log(tuning), "test": no_guard_mean_log(test)},
                  "replays": {name: {"params": p, "tuning": score(tuning, p), "test": score(test, p)}
                              for name, p in replays.items()},
                  "by_method_steps": {f"{m}-{k}": {"no_guard": no_guard_mean_log(sub),
                                                   "round 3": score(sub, guard), "runs": len(sub)}
                                      for m, k in itertools.product(DMD_FAMILY, STEPS)
                                      if (sub := [e for e in test if e["row"]["method"] == m and e["row"]["steps"] == k])},
                  "top_of_grid": sorted(table, key=lambda t: t["mean_log_end_vs_best"])[:10]}
        if live:
            result["live"] = [{k: e["row"][k] for k in ("problem", "seed", "method", "steps", "fd", "fd_best_on_curve",
                                                         "guard_fired_at", "fd_guard_kept", "guard_kept_at", "event_at",
                                                         "guard_outcome")}
                              for e in self.live_runs(guard)]
        (self.out / "guard.json").write_text(json.dumps(result, indent=2))
        summary = summarize_guard(result)
        (self.out / "summary-guard.md").write_text(summary)
        plot_guard(result, test, self.out / "guard.png")
        self.log(summary)
        self.log(f"guard round done in {time.perf_counter() - t0:.0f} s")
        return result


def _ratio(mean_log: float) -> str:
    return f"{math.exp(mean_log):.3f}x"


def summarize_guard(result: dict) -> str:
    out = ["# Drift guard, third round", "", f"Rule: {result['rule']}", "", f"Chosen: `{result['guard']}`", "",
           "Geometric mean of (Fréchet a run ends with / best on its curve); without a guard the run ends "
           "with its final state. Outcomes per run: early / late (fires at or before / after the drift event), "
           "missed, false (fires, no event), quiet.", "",
           "| guard | split | runs | end / best | false-fire rate | early | late | missed | false | quiet |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for split in ("tuning", "test"):
        out.append(f"| none | {split} | {result[f'{split}_runs']} | {_ratio(result['no_guard'][split])} | – | – | – | – | – | – |")
        for name, r in result["replays"].items():
            s = r[split]
            out.append(f"| {name} | {split} | {result[f'{split}_runs']} | {_ratio(s['mean_log_end_vs_best'])} | "
                       f"{s['false_rate']:.2f} | {s['early']} | {s['late']} | {s['missed']} | {s['false']} | {s['quiet']} |")
    out += ["", "Test runs by method and steps (round 3 guard, offline replay):", "",
            "| runs | n | end / best, no guard | end / best, guard | false | early + late | missed |", "|---|---|---|---|---|---|---|"]
    for name, r in result["by_method_steps"].items():
        g = r["round 3"]
        out.append(f"| {name} | {r['runs']} | {_ratio(r['no_guard'])} | {_ratio(g['mean_log_end_vs_best'])} | {g['false']} | "
                   f"{g['early'] + g['late']} | {g['missed']} |")
    live = result.get("live")
    if live:
        ends = [r["fd_guard_kept"] if r["guard_fired_at"] is not None else r["fd"] for r in live]
        fired = [r for r in live if r["guard_fired_at"] is not None]
        false = [r for r in fired if r["event_at"] is None]
        out += ["", f"Live, exact ({len(live)} test runs of the second round's recipes, the guard recording):", "",
                f"- end / best: {geo_mean([e / r['fd_best_on_curve'] for e, r in zip(ends, live)]):.3f}x with the guard, "
                f"{geo_mean([r['fd'] / r['fd_best_on_curve'] for r in live]):.3f}x without",
                f"- fired on {len(fired)} runs ({len(false)} without a drift event); where it fired, kept / final = "
                f"{geo_mean([r['fd_guard_kept'] / r['fd'] for r in fired]) if fired else math.nan:.3f}x" +
                (f"; on the false firings {geo_mean([r['fd_guard_kept'] / r['fd'] for r in false]):.3f}x" if false else ""),
                "- outcomes: " + ", ".join(f"{k} {sum(r['guard_outcome'] == k for r in live)}"
                                          for k in ("early", "late", "missed", "false", "quiet"))]
    return "\n".join(out) + "\n"


def plot_guard(result: dict, test: list[dict], path: Path) -> None:
    """Left: final vs end (guarded) over best, per test run. Right: four test runs' curves and firings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    guard = result["guard"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, marker in zip(DMD_FAMILY, "os"):
        pts = []
        for e in (e for e in test if e["row"]["method"] == method):
            best = best_fd(e)
            pts.append((e["curve"][-1]["fd"] / best, end_fd(e, guard)[0] / best))
        ax.scatter(*zip(*pts), s=10, marker=marker, alpha=0.6, label=method)
    lim = max(ax.get_xlim()[1], ax.get_ylim()[1])
    ax.plot([1, lim], [1, lim], "k:", lw=0.8)
    ax.axhline(1.25, color="grey", lw=0.8, ls="--", label="1.25 x best")
    ax.set(xscale="log", yscale="log", xlabel="final / best on curve (no guard)",
           ylabel="end / best on curve (guard, stop)", title="test runs, offline replay")
    ax.legend(fontsize=8)
    drifting = sorted((e for e in test if drift_event(e["curve"]) is not None),
                      key=lambda e: -e["curve"][-1]["fd"] / best_fd(e))[:4]
    for e in drifting:
        xs, ys = [p["gen_updates"] for p in e["curve"]], [p["fd"] for p in e["curve"]]
        line, = ax2.plot(xs, ys, lw=1, label=f"{e['row']['problem']} {e['row']['method']}-{e['row']['steps']} {e['row']['variant']} s{e['row']['seed']}")
        fired, kept = replay_guard_kept(e["trace"], guard)
        if fired is not None:
            ax2.axvline(fired, color=line.get_color(), ls="--", lw=0.8)
            ax2.plot([kept], [fd_at(e["curve"], kept)], "o", color=line.get_color())
    ax2.set(yscale="log", xlabel="generator updates", ylabel="Fréchet to truth",
            title="most-drifting test runs: firing (dashed), kept state (dot)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="w2svd bench toy-family-guard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="the study's folder (runs.jsonl, selection-r2.json)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="test seeds of the live runs")
    parser.add_argument("--no-live", action="store_true", help="offline replays only (no training)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if not (args.out / "runs.jsonl").exists() or not (args.out / "selection-r2.json").exists():
        parser.error(f"{args.out} holds no finished second round (runs.jsonl, selection-r2.json): run "
                     "`w2svd bench toy-family` and `w2svd bench toy-family-r2` with this --out first")
    import torch

    torch.set_num_threads(args.threads)
    GuardRound(args.out, FAMILY_SETTINGS, 0, args.seeds, TUNING, TEST, ()).main(live=not args.no_live)
    return 0


if __name__ == "__main__":
    sys.exit(main())
