"""The paper's table at portrait-world scale, and the collapse study, on the project's real path.

    w2svd bench portrait --out DIR [--fast] [--study table|start|collapse|all] [--docs FOLDER]
    python bench/portrait.py --out DIR …                     # the same program

The world (``pipelines/world.py``: a self-trained tiny HunyuanVideo VAE, word-level text
encoders, the teacher fine-tuned by the ``finetune`` job on pre-encoded synthetic portraits) is
built or taken from the cache first. Then every method is distilled from that teacher, on the
world's shards, by the ``distill`` job (Ray Train + DeepSpeed) with the same number of
iterations, and every model is scored by the evaluation job (``pipelines/evaluate.py``: domain
FVD, VBench-style dimensions, face detection rate, caption-factor agreement) beside real clips.

Tuning protocol (fixed before any run): each trained family (LCM, DMD2, W2SVD, and W2SVD's
shared-base mode, whose generator is a LoRA on the one base copy and so trains at rates of its
own) is trained at ``tune_steps`` steps once per candidate learning rate of ``lrs`` (the
generator's; LCM's student), and the candidate with the lowest domain FVD on the *tuning set*
(the evaluation set drawn with ``eval.factor_seed`` and ``eval.seed`` + ``TUNE_OFFSET``: other
prompts, other noise) is kept. Every reported number comes from the *report set* (the config's
evaluation set). The other rows of a family (1 step, reg term, the α_weak sweep) use the
family's chosen rate without tuning of their own, so no row is tuned more than another.

Outputs: ``DIR/portrait.json`` (rows: ``method``, ``steps``, ``variant``, ``fvd_domain``,
``fvd_floor``, ``face_rate``, ``dynamic_degree``, ``seconds``, …, and the paper's numbers),
``DIR/portrait.md`` (the table), ``DIR/bars-<metric>.png``, ``DIR/strip-<row>.png`` and
``DIR/samples.png``; the starting-point study (the teacher's weights under the students' sampler)
adds ``DIR/start.json``, the collapse study ``DIR/collapse.json`` and ``DIR/collapse.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TUNE_OFFSET = 500
FVD, FACE, FACTOR = "fvd/domain", "face_detection_rate", "factor_agreement"
I2V, I2V_FIRST = "i2v_consistency", "i2v_first_frame_ssim"
# The paper's six VBench dimensions that a text-to-video world can score (its seventh, "i2v", is
# scored for image-to-video models: --config portrait-i2v), paired with the evaluation's names.
DIMS = {"subject": "subject_consistency", "motion_smooth": "motion_smoothness", "dynamic": "dynamic_degree",
        "aesthetic": "aesthetic_quality", "imaging": "imaging_quality", "flicker": "temporal_flickering"}
# ../shared/reference/paper-numbers.md, Table 1 (HunyuanVideo I2V, portrait clips).
PAPER = {
    ("euler", 28, ""): dict(i2v=.9578, subject=.8933, motion_smooth=.9947, dynamic=.7000, aesthetic=.5278,
                            imaging=.6106, flicker=.9906, avg=.8107),
    ("euler", 4, ""): dict(i2v=.9738, subject=.8773, motion_smooth=.9967, dynamic=.0448, aesthetic=.4574,
                           imaging=.3902, flicker=.9971, avg=.6768),
    ("lcm", 4, ""): dict(i2v=.8809, subject=.9313, motion_smooth=.9897, dynamic=.0551, aesthetic=.4729,
                         imaging=.5250, flicker=.9855, avg=.6915),
    ("dmd2", 4, ""): dict(i2v=.9613, subject=.9111, motion_smooth=.9932, dynamic=.7586, aesthetic=.4643,
                          imaging=.5725, flicker=.9832, avg=.8063),
    ("w2svd", 4, ""): dict(i2v=.9763, subject=.9533, motion_smooth=.9954, dynamic=.7683, aesthetic=.4899,
                           imaging=.5708, flicker=.9993, avg=.8219),
    ("w2svd", 4, "reg"): dict(i2v=.9735, subject=.9478, motion_smooth=.9955, dynamic=.0379, aesthetic=.5732,
                              imaging=.7103, flicker=.9939, avg=.7474),
    ("euler", 1, ""): dict(i2v=.8729, subject=.8177, motion_smooth=.9964, dynamic=.0000, aesthetic=.3906,
                           imaging=.2441, flicker=.9968, avg=.6169),
    ("lcm", 1, ""): dict(i2v=.9662, subject=.9236, motion_smooth=.9963, dynamic=.0310, aesthetic=.4465,
                         imaging=.4125, flicker=.9959, avg=.6817),
    ("dmd2", 1, ""): dict(i2v=.9742, subject=.9590, motion_smooth=.9963, dynamic=.0054, aesthetic=.5090,
                          imaging=.5922, flicker=.9964, avg=.7189),
    ("w2svd", 1, ""): dict(i2v=.9620, subject=.9656, motion_smooth=.9961, dynamic=.0523, aesthetic=.5512,
                           imaging=.6909, flicker=.9953, avg=.7448),
}
# Weak-weight ablation at 4 steps (average only, read off the paper's figure; α 0 is DMD2's row).
PAPER_ALPHA_AVG = {"alpha0": .8063, "alpha0.25": .8219, "alpha0.5": .8154, "alpha0.75": .7425}
# Tuning families that are a mode of a method rather than a method: (method, variant, overrides).
MODE_FAMILIES = {"w2svd-shared-base": ("w2svd", "shared-base", ("method.generator=lora",))}


@dataclass(frozen=True)
class Spec:
    """One distillation run: ``method`` at ``steps`` student steps, plus config overrides."""

    method: str
    steps: int
    variant: str = ""
    overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.method}-{self.steps}step" + (f"-{self.variant}" if self.variant else "")

    @property
    def family(self) -> str:
        """The tuning family whose chosen learning rate this run takes."""
        mode = f"{self.method}-{self.variant}"
        return mode if mode in MODE_FAMILIES else self.method

    @classmethod
    def of_family(cls, family: str, steps: int) -> Spec:
        method, variant, overrides = MODE_FAMILIES.get(family, (family, "", ()))
        return cls(method, steps, variant, overrides)


@dataclass
class Settings:
    config: str = "portrait"
    # Iterations (optim.steps: critic updates for DMD2/W2SVD, student updates for LCM) of every run.
    budget: int = 120
    lrs: tuple[float, ...] = (1e-4, 3e-4)
    tune_methods: tuple[str, ...] = ("lcm", "dmd2", "w2svd", "w2svd-shared-base")
    tune_steps: int = 4
    euler_steps: tuple[int, ...] = (1, 4, 28)
    # The LCM student (a consistency model: one run) is also sampled at these step counts.
    lcm_steps: tuple[int, ...] = (1,)
    # The rows beyond each family's tuning run: 1 step, the reg term, the α_weak sweep (the
    # default, method.alpha_weak, is the plain W2SVD row), the shared-base mode at 1 step.
    extra: tuple[Spec, ...] = (
        Spec("dmd2", 1), Spec("w2svd", 1),
        *(Spec("w2svd", n, "reg", ("method.lambda_reg=0.5",)) for n in (4, 1)),
        *(Spec("w2svd", n, f"alpha{a:g}", (f"method.alpha_weak={a}",)) for n in (4, 1) for a in (0.0, 0.25, 0.5, 0.75)),
        Spec.of_family("w2svd-shared-base", 1),
    )
    overrides: tuple[str, ...] = ()
    # Collapse study: these methods at collapse_steps, collapse_factor × budget iterations at the
    # same learning rate for both, exported and evaluated collapse_points times along the way.
    collapse_methods: tuple[str, ...] = ("dmd2", "w2svd")
    collapse_steps: int = 4
    collapse_factor: int = 3
    collapse_points: int = 6
    collapse_lr: float = 3e-4
    strip_clips: int = 3

    @classmethod
    def fast(cls) -> Settings:
        """The smoke check the tests run: one tuned method, one rate, a handful of iterations."""
        return cls(config="portrait-fast", budget=4, lrs=(3e-4,), tune_methods=("w2svd",), euler_steps=(1, 28),
                   lcm_steps=(), extra=(), collapse_factor=2, collapse_points=2, strip_clips=2)


# ---------------------------------------------------------------------------------------------
# Runs and evaluations (each cached in DIR, so a killed benchmark resumes where it stopped)


def distill_run(settings: Settings, spec: Spec, lr: float, latents: str, run_dir: Path, steps: int,
                checkpoint_every: int | None = None, log=print) -> dict:
    from pipelines import distill
    from pipelines.training import train
    from w2svd.config import load_config

    lr_key = "optim.generator_lr"
    cfg = load_config(settings.config, [
        *settings.overrides, f"method.name={spec.method}", f"method.student_steps={spec.steps}",
        f"optim.steps={steps}", f"{lr_key}={lr}", f"optim.checkpoint_every={checkpoint_every or steps}",
        f"optim.log_every={max(1, steps // 10)}", *spec.overrides])
    distill.check(cfg)
    t0 = time.time()
    log(f"[portrait] distill {spec.name} lr {lr:g}: {steps} iterations → {run_dir}")
    result = train("distill", distill.train_loop_per_worker, cfg, latents, str(run_dir))
    if result.get("status") != "finished" or not result.get("export"):
        raise RuntimeError(f"distillation {spec.name} did not finish: {result}")
    timing = run_dir / "bench-seconds.json"
    if not timing.exists() or result.get("steps", 0) > json.loads(timing.read_text()).get("steps", 0):
        previous = json.loads(timing.read_text())["seconds"] if timing.exists() else 0.0
        timing.write_text(json.dumps({"steps": result["steps"], "seconds": previous + time.time() - t0}))
    return {**result, "seconds": json.loads(timing.read_text())["seconds"]}


def evaluate_cached(sources: dict[str, dict], cfg, folder: Path, log=print) -> dict[str, dict]:
    """``evaluate_sources`` for the sources without a stored report in ``folder``; all reports."""
    from pipelines.evaluate import evaluate_sources

    folder.mkdir(parents=True, exist_ok=True)
    todo = {k: v for k, v in sources.items() if not (folder / f"{k}.json").is_file()}
    if todo:
        for label, report in evaluate_sources(todo, cfg, log=log).items():
            (folder / f"{label}.json").write_text(json.dumps(report, indent=2))
    return {k: json.loads((folder / f"{k}.json").read_text()) for k in sources}


def tuning_config(settings: Settings):
    from w2svd.config import load_config

    base = load_config(settings.config)
    return load_config(settings.config, [*settings.overrides, f"eval.factor_seed={base.eval.factor_seed + TUNE_OFFSET}",
                                         f"eval.seed={base.eval.seed + TUNE_OFFSET}"])


def row_from(method: str, steps: int, variant: str, metrics: dict, floor: dict, **extra) -> dict:
    dims = {k: float(metrics[v]) for k, v in DIMS.items()}
    paper = PAPER.get((method, steps, variant))
    if paper is None and method == "w2svd" and variant in PAPER_ALPHA_AVG and steps == 4:
        paper = {"avg": PAPER_ALPHA_AVG[variant]}
    row = {"method": method, "steps": steps, "variant": variant,
           "fvd_domain": float(metrics[FVD]), "fvd_floor": float(floor[FVD]),
           "face_rate": float(metrics[FACE]), "face_rate_real": float(floor[FACE]),
           "dynamic_degree": float(metrics["dynamic_degree"]), "factor_agreement": float(metrics.get(FACTOR, np.nan)),
           **{f"factor/{k.split('/', 1)[1]}": float(v) for k, v in metrics.items() if k.startswith("factor/")},
           **{v: float(metrics[v]) for v in DIMS.values()},
           "avg6": float(np.mean(list(dims.values()))), **extra}
    if I2V in metrics:  # an image-to-video model: the paper's seventh column and its 7-dim average
        row |= {"i2v": float(metrics[I2V]), "i2v_first_frame_ssim": float(metrics[I2V_FIRST]),
                "avg7": float(np.mean([*dims.values(), metrics[I2V]]))}
    if paper:
        row["paper"] = paper
        if all(k in paper for k in DIMS):
            row["paper_avg6"] = float(np.mean([paper[k] for k in DIMS]))
    return row


# ---------------------------------------------------------------------------------------------
# The table


def run_table(settings: Settings, out: Path, latents: str, log=print) -> dict:
    from pipelines.evaluate import model_source, real_clips_report, teacher_source
    from w2svd.config import load_config

    t_start = time.time()
    report_cfg = load_config(settings.config, list(settings.overrides))
    tune_cfg = tuning_config(settings)
    floor = real_clips_report(report_cfg, log=log)["metrics"]
    tune_floor = real_clips_report(tune_cfg, log=log)["metrics"]

    # 1. Tuning: every family × every candidate rate at tune_steps, scored on the tuning set.
    runs: dict[str, dict] = {}
    tuning = {}
    for family in settings.tune_methods:
        spec = Spec.of_family(family, settings.tune_steps)
        for lr in settings.lrs:
            name = f"{spec.name}-lr{lr:g}"
            runs[name] = distill_run(settings, spec, lr, latents, out / "runs" / name, settings.budget, log=log)
    tune_reports = evaluate_cached({name: model_source(r["export"]) for name, r in runs.items()}, tune_cfg,
                                   out / "evals" / "tuning", log)
    chosen = {}
    for family in settings.tune_methods:
        spec = Spec.of_family(family, settings.tune_steps)
        candidates = {lr: tune_reports[f"{spec.name}-lr{lr:g}"]["metrics"][FVD] for lr in settings.lrs}
        chosen[family] = min(candidates, key=candidates.get)
        tuning[family] = {"fvd_domain_on_tuning_set": {f"{lr:g}": v for lr, v in candidates.items()},
                          "chosen_lr": chosen[family], "tuning_floor": tune_floor[FVD]}
        log(f"[portrait] tuning {family}: {tuning[family]}")

    # 2. The other rows of each family, at its chosen rate.
    rows_runs: dict[str, tuple[Spec, dict]] = {}
    for family in settings.tune_methods:
        spec = Spec.of_family(family, settings.tune_steps)
        rows_runs[spec.name] = (spec, runs[f"{spec.name}-lr{chosen[family]:g}"] | {"lr": chosen[family]})
    for spec in settings.extra:
        lr = chosen.get(spec.family, settings.lrs[0])
        result = distill_run(settings, spec, lr, latents, out / "runs" / f"{spec.name}-lr{lr:g}", settings.budget,
                             log=log)
        rows_runs[spec.name] = (spec, result | {"lr": lr})

    # 3. Everything on the report set, in one evaluation.
    sources = {f"euler-{n}step": teacher_source(settings.config, n, settings.config, list(settings.overrides))
               for n in settings.euler_steps}
    sources |= {name: model_source(r["export"]) for name, (_, r) in rows_runs.items()}
    lcm_name = f"lcm-{settings.tune_steps}step"
    if lcm_name in rows_runs:
        sources |= {f"lcm-{n}step": model_source(rows_runs[lcm_name][1]["export"], steps=n) for n in settings.lcm_steps}
    reports = evaluate_cached(sources, report_cfg, out / "evals" / "report", log)

    rows = [row_from("real", 0, "", floor, floor, seconds=0.0, note="second draw of real clips: the floor")]
    for n in settings.euler_steps:
        rows.append(row_from("euler", n, "", reports[f"euler-{n}step"]["metrics"], floor, seconds=0.0, lr=None))
    for name, (spec, result) in rows_runs.items():
        rows.append(row_from(spec.method, spec.steps, spec.variant, reports[name]["metrics"], floor,
                             seconds=round(result["seconds"], 1), lr=result["lr"], iterations=result["steps"],
                             rollbacks=result.get("rollbacks", 0), overrides=list(spec.overrides)))
    for n in settings.lcm_steps:
        result = rows_runs[lcm_name][1]
        rows.append(row_from("lcm", n, "", reports[f"lcm-{n}step"]["metrics"], floor, seconds=round(result["seconds"], 1),
                             lr=result["lr"], iterations=result["steps"], note=f"the {settings.tune_steps}-step LCM "
                             f"run sampled at {n} step(s)"))
    rows.sort(key=lambda r: (r["method"] != "real", -r["steps"], r["method"], r["variant"]))
    result = {"settings": _jsonable(settings), "tuning": tuning, "rows": rows,
              "evalset": reports[next(iter(reports))]["evalset"], "seconds": round(time.time() - t_start, 1)}
    (out / "portrait.json").write_text(json.dumps(result, indent=2))
    (out / "portrait.md").write_text(format_table(rows))
    plot_bars(rows, out)
    write_strips(sources, report_cfg, out, settings.strip_clips)
    return result


def _jsonable(settings: Settings) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(settings), default=str))


def format_table(rows: list[dict]) -> str:
    """The table in the paper's shape (its six t2v-scorable dimensions) with its numbers beside ours."""
    i2v = any("i2v" in r for r in rows)
    head = ["steps", "method", "variant", "FVD dom. (floor)", "face rate (real)", "factors", "dynamic", "subject",
            "smooth", "flicker", "aesth.", "imaging", "avg6", "paper avg6", "paper dynamic", "train s"]
    if i2v:
        head[-1:-1] = ["i2v", "first-frame SSIM", "avg7", "paper i2v", "paper avg7"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        paper = r.get("paper", {})
        paper_avg = (f"{r['paper_avg6']:.3f}" if "paper_avg6" in r else
                     f"{paper['avg']:.3f} (7-dim)" if "avg" in paper else "—")
        cells = [str(r["steps"] or "—"), r["method"], r["variant"] or "—",
                 f"{r['fvd_domain']:.2f} ({r['fvd_floor']:.2f})", f"{r['face_rate']:.2f} ({r['face_rate_real']:.2f})",
                 f"{r['factor_agreement']:.2f}", f"{r['dynamic_degree']:.2f}",
                 *(f"{r[k]:.3f}" for k in ("subject_consistency", "motion_smoothness", "temporal_flickering",
                                            "aesthetic_quality", "imaging_quality", "avg6")),
                 paper_avg, f"{paper['dynamic']:.3f}" if "dynamic" in paper else "—"]
        if i2v:
            cells += [*(f"{r[k]:.3f}" if k in r else "—" for k in ("i2v", "i2v_first_frame_ssim", "avg7")),
                      *(f"{paper[k]:.3f}" if k in paper else "—" for k in ("i2v", "avg"))]
        lines.append("| " + " | ".join(cells + [f"{r['seconds']:.0f}"]) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Pictures


def _label(r: dict) -> str:
    return "real" if r["method"] == "real" else f"{r['method']} {r['steps']}" + (f" {r['variant']}" if r["variant"] else "")


def plot_bars(rows: list[dict], out: Path) -> list[Path]:
    """One bar chart per metric; the real clips' value (FVD: the real-vs-real floor) as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = {"fvd_domain": "domain FVD (lower is better)", "face_rate": "face detection rate",
               "dynamic_degree": "dynamic degree", "factor_agreement": "caption-factor agreement",
               "avg6": "mean of the six VBench-style dimensions", **{v: v.replace("_", " ") for v in DIMS.values()}}
    if any("i2v" in r for r in rows):
        metrics |= {"i2v": "i2v consistency (the paper's i2v column; SSIM proxy)", "avg7": "mean of the seven dimensions"}
    real = next(r for r in rows if r["method"] == "real")
    shown = [r for r in rows if r["method"] != "real"]
    paths = []
    for key, title in metrics.items():
        fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(shown)), 3.4))
        colours = ["#888888" if r["method"] == "euler" else "#4c72b0" if r["method"] == "w2svd" else "#dd8452"
                   if r["method"] == "dmd2" else "#55a868" for r in shown]
        ax.bar(range(len(shown)), [r[key] for r in shown], color=colours)
        if key in real:
            ax.axhline(real[key], color="k", ls="--", lw=1,
                       label="real clips" + (" (floor)" if key == "fvd_domain" else ""))
        ax.set_xticks(range(len(shown)), [_label(r) for r in shown], rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        if key in real:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"bars-{key.replace('/', '-')}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def write_strips(sources: dict[str, dict], cfg, out: Path, count: int) -> None:
    """Per source a strip (real clips above its samples for the same prompts and noise) and one
    overview of all, on the first ``count`` items of the report set."""
    from pipelines.sample_strips import sample_clips, write_sample_strip

    real, clips = sample_clips(sources, cfg, count)
    for label, c in clips.items():
        write_sample_strip(out / f"strip-{label}.png", real, {label: c})
    write_sample_strip(out / "samples.png", real, clips, scale=1)


# ---------------------------------------------------------------------------------------------
# Where the students start


def export_start(settings: Settings, out: Path, steps: int) -> Path:
    """The teacher's weights exported as a ``steps``-step generator: the students' sampler
    (re-noising at the student sigmas, guidance-free as a distilled CFG model runs), which every
    DMD2 and W2SVD student starts from before its first update."""
    from w2svd.config import load_config
    from w2svd.export import SAMPLER_FILE, sampler_settings_for, save_generator_export
    from w2svd.models.hunyuan import build_backbone

    folder = out / "start" / f"start-{steps}step"
    if not (folder / SAMPLER_FILE).is_file():
        cfg = load_config(settings.config, [*settings.overrides, f"method.student_steps={steps}"])
        save_generator_export(build_backbone(cfg.model), folder, sampler_settings_for(cfg), cfg)
    return folder


def run_start(settings: Settings, out: Path, log=print) -> dict:
    """The students' starting point at the table's student step counts, scored on the report set
    beside the table's rows (``DIR/start.json``): what a student's row gained or lost in training."""
    from pipelines.evaluate import model_source, real_clips_report
    from w2svd.config import load_config

    t0 = time.time()
    cfg = load_config(settings.config, list(settings.overrides))
    floor = real_clips_report(cfg, log=log)["metrics"]
    step_counts = sorted({settings.tune_steps, *(s.steps for s in settings.extra)}, reverse=True)
    sources = {f"start-{n}step": model_source(str(export_start(settings, out, n))) for n in step_counts}
    reports = evaluate_cached(sources, cfg, out / "evals" / "report", log)
    rows = [row_from("start", n, "teacher weights, student sampler", reports[f"start-{n}step"]["metrics"], floor,
                     seconds=0.0, iterations=0) for n in step_counts]
    result = {"settings": _jsonable(settings), "rows": rows, "seconds": round(time.time() - t0, 1)}
    (out / "start.json").write_text(json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------------------------------------
# The collapse study


def collapse_spec(settings: Settings, method: str) -> Spec:
    """A collapse run: the guard only records where it fires (a stop would cut the curve it is
    judged against), and the generator's rate is constant, because the run is resumed with a
    longer ``optim.steps`` at every point and a cosine schedule's length is ``optim.steps``: each
    point would end its own annealed segment instead of lying on one run at one rate."""
    return Spec(method, settings.collapse_steps,
                overrides=("health.drift_action=log", "optim.generator_lr_schedule=constant"))


def run_collapse(settings: Settings, out: Path, latents: str, log=print) -> dict:
    """DMD2 and W2SVD trained ``collapse_factor`` × the table's budget, exported and scored on the
    report set ``collapse_points`` times along the way (the run resumes from its checkpoint
    between points, so the curve is one training run)."""
    from pipelines.evaluate import real_clips_report
    from w2svd.config import load_config

    t0 = time.time()
    cfg = load_config(settings.config, list(settings.overrides))
    total = settings.budget * settings.collapse_factor
    every = max(1, total // settings.collapse_points)
    floor = real_clips_report(cfg, log=log)["metrics"]
    sources, points = {}, {}
    for method in settings.collapse_methods:
        spec = collapse_spec(settings, method)
        run_dir = out / "collapse" / method
        for k in range(1, settings.collapse_points + 1):
            result = distill_run(settings, spec, settings.collapse_lr, latents, run_dir, k * every,
                                 checkpoint_every=every, log=log)
            keep = out / "collapse" / "exports" / f"{method}-{k * every:05d}"
            if not keep.exists():
                shutil.copytree(result["export"], keep)
            label = f"{method}-{k * every:05d}"
            sources[label] = {"kind": "model", "uri": str(keep), "tracking_uri": None}
            points[label] = {"method": method, "iterations": k * every,
                             "generator_updates": k * every // cfg.method.gen_update_every,
                             "rollbacks": result.get("rollbacks", 0), "train_seconds": round(result["seconds"], 1)}
    reports = evaluate_cached(sources, cfg, out / "evals" / "collapse", log)
    curves: dict[str, list[dict]] = {}
    for label, point in points.items():
        m = reports[label]["metrics"]
        curves.setdefault(point["method"], []).append(
            {**point, "fvd_domain": m[FVD], "face_rate": m[FACE], "dynamic_degree": m["dynamic_degree"],
             "factor_agreement": m.get(FACTOR, float("nan")), "avg6": float(np.mean([m[v] for v in DIMS.values()]))})
    guard = drift_guard_record(out, settings.collapse_methods, cfg.method.gen_update_every)
    for method, record in guard.items():
        record["stop_would_keep"] = stop_would_keep(curves.get(method, []), record)
    result = {"settings": _jsonable(settings), "every": every, "total_iterations": total, "lr": settings.collapse_lr,
              "floor": {"fvd_domain": floor[FVD], "face_rate": floor[FACE], "dynamic_degree": floor["dynamic_degree"],
                        "factor_agreement": floor.get(FACTOR)},
              "drift_guard": guard, "curves": curves, "seconds": round(time.time() - t0, 1)}
    (out / "collapse.json").write_text(json.dumps(result, indent=2))
    plot_collapse(result, out / "collapse.png")
    return result


def drift_guard_record(out: Path, methods, gen_update_every: int) -> dict:
    """Where the distill job's drift guard (``health.*``, set to log only here) fired in each
    collapse run and its signal check by check, from the run's ``drift.json`` (absent: the
    guard never checked), in the curves' units."""
    from pipelines.guards import DRIFT_FILE

    record = {}
    for method in methods:
        path = out / "collapse" / method / DRIFT_FILE
        drift = json.loads(path.read_text()) if path.is_file() else {}
        fired = drift.get("fired_at")
        record[method] = {"signal": drift.get("signal"), "fired_at_iteration": fired,
                          "fired_at_generator_update": None if fired is None else fired // gen_update_every,
                          "best": drift.get("best"), "rise": drift.get("rise"), "margin": drift.get("margin"),
                          "trace": [{"generator_updates": step / gen_update_every, "value": value, "signal": signal}
                                    for step, value, signal in drift.get("trace", [])]}
    return record


def stop_would_keep(curve: list[dict], guard: dict) -> dict | None:
    """The scored point a drift stop would have exported, or None where the guard never fired.

    A collapse run checkpoints at every scored point, and a stop at the firing exports the
    checkpoint written by then with the lowest signal (``checkpoint.best_by_drift``; the earliest
    of equals); a checkpoint holds the signal of the last check at or before its step."""
    fired = guard.get("fired_at_generator_update")
    if fired is None:
        return None

    def signal_at(updates: float) -> float | None:
        checked = [p["signal"] for p in guard.get("trace", []) if p["generator_updates"] <= updates]
        return checked[-1] if checked else None

    scored = [(signal_at(p["generator_updates"]), p) for p in curve if p["generator_updates"] <= fired]
    scored = [(signal, p) for signal, p in scored if signal is not None]
    if not scored:
        return None
    signal, point = min(scored, key=lambda sp: sp[0])
    return {"signal": signal, **{k: point[k] for k in ("generator_updates", "fvd_domain", "face_rate")}}


def plot_collapse(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("fvd_domain", "domain FVD (lower is better)"), ("face_rate", "face detection rate"),
            ("dynamic_degree", "dynamic degree"), ("factor_agreement", "caption-factor agreement")]
    guard = result.get("drift_guard", {})
    traced = any(g.get("trace") for g in guard.values())
    fig, axes = plt.subplots(1, len(keys) + traced, figsize=(4 * (len(keys) + traced), 3.3))
    for ax, (key, title) in zip(axes, keys, strict=False):
        for method, curve in result["curves"].items():
            ax.plot([p["generator_updates"] for p in curve], [p[key] for p in curve], marker="o", label=method)
            fired = guard.get(method, {}).get("fired_at_generator_update")
            if fired is not None:  # where the guard fired, on every curve of its run
                ax.axvline(fired, color=ax.lines[-1].get_color(), ls=":", lw=1.5)
            kept = guard.get(method, {}).get("stop_would_keep")
            if kept is not None and key in kept:  # what a stop at the firing would have exported
                ax.plot([kept["generator_updates"]], [kept[key]], marker="*", ms=14, mfc="none",
                        color=ax.lines[-1].get_color(), ls="none")
        if result["floor"].get(key) is not None:
            ax.axhline(result["floor"][key], color="k", ls="--", lw=1, label="real clips")
        ax.set(title=title, xlabel="generator updates")
        ax.legend(fontsize=8)
    if traced:
        ax = axes[-1]
        for method, g in guard.items():
            if not g.get("trace"):
                continue
            x = [p["generator_updates"] for p in g["trace"]]
            line, = ax.plot(x, [p["signal"] for p in g["trace"]], label=f"{method} signal")
            ax.plot(x, [p["value"] for p in g["trace"]], color=line.get_color(), alpha=0.3, lw=0.8)
            if g.get("best") is not None:
                ax.axhline(g["best"] * (1 + g["rise"]) + g["margin"], color=line.get_color(), ls="--", lw=1,
                           label=f"{method} band (final best)")
            if g.get("fired_at_generator_update") is not None:
                ax.axvline(g["fired_at_generator_update"], color=line.get_color(), ls=":", lw=1.5)
        kind = next(g["signal"] for g in guard.values() if g.get("trace"))
        ax.set(title=f"guard {kind} (dotted: fired, star: kept)", xlabel="generator updates")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv):
    p = argparse.ArgumentParser(prog="w2svd bench portrait", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--fast", action="store_true", help="the smoke check the tests run (the portrait-fast world)")
    p.add_argument("--study", choices=["table", "start", "collapse", "all"], default="table",
                   help="all: the table, the students' starting point, then the collapse study")
    p.add_argument("--config", help="the world's config (default: portrait, or portrait-fast with --fast)")
    p.add_argument("--budget", type=int, help="iterations of every distillation run")
    p.add_argument("--collapse-factor", type=int, help="the collapse study's length in table budgets (default 3)")
    p.add_argument("--collapse-points", type=int, help="how many times the collapse runs are exported and scored (default 6)")
    p.add_argument("--collapse-lr", type=float, help="the collapse runs' generator rate, both methods (default 3e-4)")
    p.add_argument("--docs", type=Path, help="also copy the PNGs into this folder")
    p.add_argument("--threads", type=int, default=2, help="torch threads of this process")
    p.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. optim.batch_size=2")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch

    from pipelines.errors import run_main
    from pipelines.startup import set_local_env_defaults
    from pipelines.world import build

    set_local_env_defaults()
    args = parse_args(argv)

    def body() -> int:
        torch.set_num_threads(max(1, args.threads))
        counts = {k: getattr(args, k) for k in ("budget", "collapse_factor", "collapse_points")
                  if getattr(args, k) is not None}
        for flag, value in counts.items():
            if value < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
        if args.collapse_lr is not None:
            if not args.collapse_lr > 0:
                raise ValueError(f"--collapse-lr must be positive, got {args.collapse_lr}")
            counts["collapse_lr"] = args.collapse_lr
        settings = Settings.fast() if args.fast else Settings()
        settings = dataclasses.replace(settings, overrides=tuple(args.overrides), **counts,
                                       **({"config": args.config} if args.config else {}))
        out = args.out.absolute()
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        built = build(settings.config)
        (out / "world.json").write_text(json.dumps(built, indent=2))
        latents = built["latents"]
        if (Path(built["teacher"]["path"]) / "samples.png").is_file():
            shutil.copyfile(Path(built["teacher"]["path"]) / "samples.png", out / "world-samples.png")
        if args.study in ("table", "all"):
            table = run_table(settings, out, latents)
            print(format_table(table["rows"]))
        if args.study in ("start", "all"):
            start = run_start(settings, out)
            print(format_table(start["rows"]))
        if args.study in ("collapse", "all"):
            collapse = run_collapse(settings, out, latents)
            print(json.dumps(collapse["curves"], indent=1))
        if args.docs:
            args.docs.mkdir(parents=True, exist_ok=True)
            for png in out.glob("*.png"):
                shutil.copyfile(png, args.docs / png.name)
        print(f"[portrait] done in {time.time() - t0:.0f} s; results in {out}")
        return 0

    return run_main("w2svd bench portrait", body)


if __name__ == "__main__":
    sys.exit(main())
