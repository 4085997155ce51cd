"""The toy training program: a flow-matching teacher on a known ``Problem``, then W2SVD, vanilla
DMD2 and LCM distilled from it and teacher Euler sampling, every number exact (``w2svd.toy``).

The DMD family runs ``w2svd.iteration.train_iteration``, the iteration the distributed job runs,
over ``TorchTrainable`` roles. Used by ``bench/toy.py`` (one problem) and ``bench/toy_family.py``
(the family study); ``run_toy(problem, settings, runs)`` is the entry point.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from w2svd.baselines import ema_update, flow_matching_step, lcm_step
from w2svd.distill import StepSettings
from w2svd.drift import SIGNALS, DriftGuard
from w2svd.health import HealthMonitor
from w2svd.iteration import Cadence, GeneratorEMA, TorchTrainable, lr_factor, train_iteration
from w2svd.models.toy import TOY_LORA_TARGETS, ToyDenoiser
from w2svd.roles import Guidance, View, build_roles
from w2svd.sampling import sample_student, sample_teacher_euler
from w2svd.schedule import sample_logit_normal_sigmas
from w2svd.toy.metrics import eval_labels, evaluate_samples, true_sample_reference
from w2svd.toy.problems import Problem, default_problem

# Noise seeds of the two evaluation sets: "report" (curves and every reported number) and
# "validation" (only what the tuning protocol reads). Disjoint, so selection never sees the report.
REPORT_SEED, VALIDATION_SEED, FLOOR_SEED = 10_000, 30_000, 50_000


@dataclass
class ToySettings:
    """One budget and one set of knobs; a ``Run``'s overrides change them for that run only."""

    # Teacher (the students start as copies of it).
    teacher_steps: int = 3000
    teacher_lr: float = 1e-3
    teacher_batch: int = 256
    hidden: int = 128
    depth: int = 3
    # Distillation batch.
    batch: int = 256
    # Budget: updates of the evaluated network (DMD family: generator; LCM: student).
    generator_updates: int = 400
    # Cadence (w2svd.iteration.Cadence).
    gen_update_every: int = 5
    critic_warmup: int = 0
    generator_lr_schedule: str = "cosine"
    # Rates: the critic's is the fake score's (a LoRA for W2SVD, a full copy for DMD2).
    generator_lr: float = 3e-5
    critic_lr: float = 1e-3
    disc_lr: float = 1e-4
    grad_clip: float = 1.0
    # The method.
    lora_rank: int = 32
    alpha_weak: float = 0.25
    lambda_reg: float = 0.0
    reg_target: str = "paper"
    lambda_gan_gen: float = 5e-3
    lambda_gan_disc: float = 1e-2
    backward_simulation: bool = True
    generator_ema: float = 0.0
    lcm_teacher_steps: int = 28
    lcm_target_ema: float = 0.95
    # Evaluation: samples per caption of each evaluation set, curve point spacing.
    eval_per_caption: int = 8000
    eval_every: int = 20
    # Guards: training-batch health (NaN, sample std band) acts; the drift guard acts only when
    # ``drift_act`` (else it records when it would have fired, and what it would have kept).
    health: bool = True
    guard_every: int = 5
    guard_window: int = 8  # training batches the projection statistic compares against
    drift_guard: dict | None = None
    drift_act: bool = False
    seed: int = 0

    @classmethod
    def fast(cls) -> ToySettings:
        """The size the tests run: a smaller teacher and evaluation, the same budget."""
        return cls(teacher_steps=2000, eval_per_caption=2000, eval_every=20)


@dataclass
class Run:
    method: str
    steps: int
    variant: str = ""
    overrides: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.method}{'-' + self.variant if self.variant else ''}-{self.steps}step"


def _quiet(*_args) -> None:
    pass


# ---------------------------------------------------------------------------------------------
# Teacher


def train_teacher(problem: Problem, s: ToySettings, log=print) -> ToyDenoiser:
    torch.manual_seed(s.seed)
    g = torch.Generator().manual_seed(s.seed + 1)
    model = ToyDenoiser(problem.dim, problem.num_captions, s.hidden, s.depth)
    opt = torch.optim.AdamW(model.parameters(), lr=s.teacher_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, s.teacher_steps)
    view = View(model)
    for step in range(s.teacher_steps):
        labels = torch.randint(problem.num_captions, (s.teacher_batch,), generator=g)
        x0 = problem.sample(labels, g)
        sigma = sample_logit_normal_sigmas(s.teacher_batch, 0.0, 1.0, g)
        opt.zero_grad(set_to_none=True)
        metrics = flow_matching_step(view, x0, problem.cond(labels), sigma, uncond_prob=0.1, generator=g)
        opt.step()
        sched.step()
        if step % 1000 == 0 or step == s.teacher_steps - 1:
            log(f"  teacher step {step:5d}  loss {metrics['fm/loss']:.4f}")
    return model.requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------------
# Evaluation on fixed noise


def eval_set(problem: Problem, s: ToySettings, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and initial noise of the ``report`` or ``validation`` set (fixed by the run's seed)."""
    base = {"report": REPORT_SEED, "validation": VALIDATION_SEED}[which]
    labels = eval_labels(problem, s.eval_per_caption * problem.num_captions)
    return labels, torch.randn(len(labels), problem.dim, generator=torch.Generator().manual_seed(base + s.seed))


@torch.no_grad()
def evaluate_net(problem: Problem, net, steps: int, s: ToySettings, which: str = "report",
                 teacher_euler: bool = False) -> dict:
    labels, noise = eval_set(problem, s, which)
    cond = problem.cond(labels)

    def v(x, sigma_B):
        return net(x, sigma_B, cond)

    if teacher_euler:
        out = sample_teacher_euler(v, noise, steps, shift=1.0)
    else:
        out = sample_student(v, noise, steps, shift=1.0, mode="renoise",
                             generator=torch.Generator().manual_seed(20_000 + s.seed))
    return evaluate_samples(problem, out, labels)


def floor(problem: Problem, s: ToySettings) -> dict:
    """The metrics of true samples at the evaluation size: every reported number's floor."""
    return true_sample_reference(problem, eval_labels(problem, s.eval_per_caption * problem.num_captions),
                                 FLOOR_SEED + s.seed)


# ---------------------------------------------------------------------------------------------
# Distillation runs


def adam(*groups: tuple) -> torch.optim.AdamW:
    """DMD2's AdamW (β1 = 0, no decay) over ``(params, lr)`` groups, shared by every method."""
    groups = [(list(p), lr) for p, lr in groups]  # parameters() is an iterator: read it once
    return torch.optim.AdamW([{"params": p, "lr": lr} for p, lr in groups if p], betas=(0.0, 0.999),
                             weight_decay=0.0)


class _Snapshots:
    """In-memory states: the last in-band one (rollback target) and the best by the drift signal."""

    def __init__(self, modules: dict):
        self.modules = modules
        self.last_good = self.take()
        self.best = None

    def take(self) -> dict:
        return copy.deepcopy({k: m.state_dict() for k, m in self.modules.items()})

    def restore(self, state: dict) -> None:
        for k, m in self.modules.items():
            m.load_state_dict(copy.deepcopy(state[k]))


def distill_dmd_family(problem: Problem, teacher: ToyDenoiser, run: Run, s: ToySettings, log=print) -> dict:
    """W2SVD (critic LoRA at two strengths) or vanilla DMD2 (full fake copy): the same iteration."""
    torch.manual_seed(s.seed)
    g = torch.Generator().manual_seed(s.seed + 2)
    # The guard's samples have their own stream, so watching a run never changes its training.
    g_guard = torch.Generator().manual_seed(s.seed + 4)
    roles = build_roles(copy.deepcopy(teacher), method=run.method, generator="full",
                        alpha_weak=s.alpha_weak, lora_rank=s.lora_rank, lora_alpha=float(s.lora_rank),
                        lora_targets=TOY_LORA_TARGETS, guidance=Guidance("none"),
                        discriminator=s.lambda_gan_gen > 0 or s.lambda_gan_disc > 0, disc_hidden=128)
    st = StepSettings(student_steps=run.steps, shift=1.0, lambda_reg=s.lambda_reg, reg_target=s.reg_target,
                      lambda_gan_gen=s.lambda_gan_gen, lambda_gan_disc=s.lambda_gan_disc,
                      backward_simulation=s.backward_simulation)
    critic = TorchTrainable(adam((roles.fake_score_parameters(), s.critic_lr), (roles.disc_parameters(), s.disc_lr)),
                            s.grad_clip)
    generator = TorchTrainable(adam((roles.generator_parameters(), s.generator_lr)), s.grad_clip)
    cadence = Cadence(s.gen_update_every, s.critic_warmup, s.generator_updates, s.generator_lr_schedule)
    ema = GeneratorEMA(roles.generator.backbone, s.generator_ema) if s.generator_ema > 0 else None
    eval_net = ema.module if ema is not None else roles.generator.backbone

    def evaluate(which="report"):
        return evaluate_net(problem, eval_net, run.steps, s, which)

    # Every candidate signal is recorded at every check (the guard's calibration replays them);
    # ``drift_guard`` is the one guard that decides (acting or only recording).
    probes = {name: DriftGuard(signal=name, seed=s.seed, window=s.guard_window * s.batch) for name in SIGNALS}
    recent: deque = deque(maxlen=s.guard_window)  # the last training batches: the guard's data
    guard = DriftGuard(**s.drift_guard) if s.drift_guard else None
    monitor = HealthMonitor(enabled=s.health)
    trained = {"roles": roles, "opt_critic": critic.optimizer, "opt_gen": generator.optimizer}
    if ema is not None:
        trained["ema"] = ema
    snaps = _Snapshots(trained)
    pending: list = []
    drift_in_band = [True]

    def health_check(metrics: dict) -> bool:
        if "gen/dmd" not in metrics:
            return True
        decision = monitor.check(it, {**metrics, "data/std": x_gt.std().item()})
        if not decision.ok:
            pending.append(decision)
            return False
        # The rollback target is the state these metrics were just measured on (before its update),
        # and only when every guard has it in band.
        if not decision.reason and drift_in_band[0] and updates % s.guard_every == 0:
            snaps.last_good = snaps.take()
        return True

    curve = [{"gen_updates": 0, **evaluate()}]
    trace: list[dict] = []
    guard_result: dict = {"fired_at": None, "fd_kept": None, "kept_at": None, "best_state": None}
    lr_scale, updates, it = 1.0, 0, 0
    t0 = time.perf_counter()
    while it < cadence.total_iterations:
        labels = torch.randint(problem.num_captions, (s.batch,), generator=g)
        x_gt, cond = problem.sample(labels, g), problem.cond(labels)
        recent.append((x_gt, labels))
        out = train_iteration(it, roles, x_gt, cond, st, cadence, critic, generator, rng=g, ema=ema,
                              lr_scale=lr_scale, check=health_check)
        if out.stopped:
            decision = pending.pop()
            log(f"  health: {decision.reason}")
            if decision.action == "stop":  # the result is the last good state, as a job's last checkpoint
                snaps.restore(snaps.last_good)
                break
            # A rollback spends budget: the iteration count goes on from where it was.
            snaps.restore(snaps.last_good)
            lr_scale = decision.lr_scale * (guard.lr_scale if guard else 1.0)
            critic.set_lr_scale(lr_scale)
            it += 1
            continue
        it += 1
        for probe in probes.values():
            probe.observe(out.metrics)
        if not out.generator_updated:
            continue
        updates += 1
        if updates % s.guard_every == 0:
            data_x = torch.cat([x for x, _ in recent])
            cond_w = problem.cond(torch.cat([lab for _, lab in recent]))
            with torch.no_grad():
                gen_x = sample_student(lambda x, sg, c=cond_w: eval_net(x, sg, c),
                                       torch.randn(data_x.shape, generator=g_guard), run.steps, shift=1.0,
                                       generator=g_guard)
            values = {}
            for name, probe in probes.items():
                probe.observe({}, gen_x=gen_x, data_x=data_x, cond_x=cond_w.text)
                values[name] = probe.value()
            trace.append({"gen_updates": updates, **values})
            if guard is not None:
                decision = guard.decide(updates, values[guard.kind])
                drift_in_band[0] = decision.in_band
                if decision.is_best:
                    guard_result["best_state"] = copy.deepcopy(eval_net.state_dict())
                    guard_result["kept_at"] = updates
                if decision.action != "ok" and guard_result["fired_at"] is None:
                    guard_result["fired_at"] = updates
                    guard_result["fd_kept"] = _evaluate_state(eval_net, guard_result["best_state"], evaluate)["fd"]
                    log(f"  drift guard: {decision.reason}")
                if s.drift_act and decision.action == "rollback":
                    snaps.restore(snaps.last_good)
                    lr_scale = monitor.lr_scale * decision.lr_scale
                    critic.set_lr_scale(lr_scale)
                    continue
                if s.drift_act and decision.action == "stop":
                    eval_net.load_state_dict(guard_result["best_state"])
                    break
        if updates % s.eval_every == 0:
            curve.append({"gen_updates": updates, **evaluate(), **_scalars(out.metrics)})
    final = curve[-1] if curve[-1]["gen_updates"] == updates else {"gen_updates": updates, **evaluate()}
    guard_result.pop("best_state")
    return {"final": final, "validation": evaluate("validation"), "curve": curve, "trace": trace,
            "guard": guard_result, "seconds": time.perf_counter() - t0, "rollbacks": monitor.state.rollbacks,
            "generator_updates": updates, "critic_updates": it}


def _evaluate_state(net, state, evaluate) -> dict:
    live = copy.deepcopy(net.state_dict())
    net.load_state_dict(state)
    try:
        return evaluate()
    finally:
        net.load_state_dict(live)


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, float)}


def distill_lcm(problem: Problem, teacher: ToyDenoiser, run: Run, s: ToySettings, log=print) -> dict:
    """LCM with as many student updates as the DMD family's generator updates."""
    torch.manual_seed(s.seed)
    g = torch.Generator().manual_seed(s.seed + 3)
    student_net = copy.deepcopy(teacher).requires_grad_(True)
    target_net = copy.deepcopy(teacher)
    student, target, teacher_view = View(student_net), View(target_net), View(teacher)
    trainable = TorchTrainable(adam((student_net.parameters(), s.generator_lr)), s.grad_clip)
    ema = GeneratorEMA(student_net, s.generator_ema) if s.generator_ema > 0 else None
    eval_net = ema.module if ema is not None else student_net

    def evaluate(which="report"):
        return evaluate_net(problem, eval_net, run.steps, s, which)

    curve = [{"gen_updates": 0, **evaluate()}]
    t0 = time.perf_counter()
    for update in range(1, s.generator_updates + 1):
        labels = torch.randint(problem.num_captions, (s.batch,), generator=g)
        x_gt, cond = problem.sample(labels, g), problem.cond(labels)
        trainable.set_lr_scale(lr_factor(s.generator_lr_schedule, update - 1, s.generator_updates))
        trainable.zero_grad()
        metrics = lcm_step(student, target, teacher_view, x_gt, cond, teacher_steps=s.lcm_teacher_steps,
                           shift=1.0, backward=trainable.backward, generator=g)
        trainable.step()
        ema_update(target_net, student_net, s.lcm_target_ema)
        if ema is not None:
            ema.update()
        if update % s.eval_every == 0:
            curve.append({"gen_updates": update, **evaluate(), **metrics})
    return {"final": curve[-1], "validation": evaluate("validation"), "curve": curve, "trace": [],
            "guard": {"fired_at": None, "fd_kept": None, "kept_at": None}, "seconds": time.perf_counter() - t0,
            "rollbacks": 0, "generator_updates": s.generator_updates, "critic_updates": 0}


def distill(problem: Problem, teacher: ToyDenoiser, run: Run, s: ToySettings, log=print) -> dict:
    """``run`` with ``s`` updated by its overrides."""
    rs = dataclasses.replace(s, **run.overrides)
    fn = distill_lcm if run.method == "lcm" else distill_dmd_family
    return fn(problem, teacher, run, rs, log)


def result_row(run: Run, result: dict) -> dict:
    best = min(result["curve"], key=lambda p: p["fd"])
    final = result["final"]
    return {"method": run.method, "steps": run.steps, "variant": run.variant,
            **{k: final[k] for k in ("fd", "modes_lost", "mode_tv", "on_mode", "modes_empty_nearest", "spread")},
            "fd_best_on_curve": best["fd"], "best_at": best["gen_updates"],
            "val_fd": result["validation"]["fd"], "val_modes_lost": result["validation"]["modes_lost"],
            "guard_fired_at": result["guard"]["fired_at"], "fd_guard_kept": result["guard"]["fd_kept"],
            "guard_kept_at": result["guard"]["kept_at"], "rollbacks": result["rollbacks"],
            "generator_updates": result["generator_updates"], "critic_updates": result["critic_updates"],
            "seconds": round(result["seconds"], 1)}


# ---------------------------------------------------------------------------------------------
# One problem, every method


# Each method's settings before the family study (its config 0), and where the study's chosen
# recipes are kept (``w2svd bench toy-family`` writes them in DIR/selection.json; the chosen ones
# are copied here by hand, with the run that chose them named in the file).
BASELINE = {
    "w2svd": {"generator_lr": 3e-5, "critic_lr": 1e-3, "gen_update_every": 5, "critic_warmup": 0,
              "generator_lr_schedule": "cosine", "generator_ema": 0.0, "lambda_gan_gen": 5e-3,
              "backward_simulation": True, "lambda_reg": 0.0, "reg_target": "paper", "lora_rank": 32},
    "dmd2": {"generator_lr": 3e-5, "critic_lr": 1e-4, "gen_update_every": 5, "critic_warmup": 0,
             "generator_lr_schedule": "cosine", "generator_ema": 0.0, "lambda_gan_gen": 5e-3,
             "backward_simulation": True, "lambda_reg": 0.0, "reg_target": "paper"},
    "lcm": {"generator_lr": 3e-5, "generator_lr_schedule": "cosine", "lcm_target_ema": 0.95,
            "lcm_teacher_steps": 28, "generator_ema": 0.0},
}
RECIPES_FILE = Path(__file__).with_name("toy_recipes.json")


def recipe(method: str, steps: int) -> dict:
    """The chosen recipe of ``method`` at ``steps`` (``RECIPES_FILE``), else its baseline."""
    if RECIPES_FILE.exists():
        chosen = json.loads(RECIPES_FILE.read_text())["recipes"]
        if f"{method}-{steps}" in chosen:
            return dict(chosen[f"{method}-{steps}"]["settings"])
    return dict(BASELINE[method])


def default_runs() -> list[Run]:
    """``w2svd bench toy``'s runs: every method at its recipe, then the W2SVD ablations at 4 steps."""
    runs = [Run(m, n, "", recipe(m, n)) for n in (1, 4) for m in ("dmd2", "w2svd", "lcm")]
    w4 = recipe("w2svd", 4)
    runs += [Run("w2svd", 4, "reg", {**w4, "lambda_reg": 0.25, "reg_target": "paper"})]
    runs += [Run("w2svd", 4, f"alpha{a:g}", {**w4, "alpha_weak": a}) for a in (0.0, 0.1, 0.5)]
    return runs


def euler_rows(problem: Problem, teacher: ToyDenoiser, s: ToySettings, steps=(1, 4, 28), which="report") -> list:
    rows = []
    for n in steps:
        metrics = evaluate_net(problem, teacher, n, s, which, teacher_euler=True)
        rows.append({"method": "euler", "steps": n, "variant": "", **metrics})
    return rows


def run_toy(settings: ToySettings | None = None, runs: list[Run] | None = None, euler_steps=(1, 4, 28),
            problem: Problem | None = None, teacher: ToyDenoiser | None = None, log=print) -> dict:
    """Teacher (unless given), Euler baselines and ``runs`` on ``problem`` (default: the iso-4x4 mixture)."""
    s = settings or ToySettings()
    problem = problem or default_problem()
    t0 = time.perf_counter()
    log(f"toy {getattr(problem, 'name', type(problem).__name__)}: {problem.num_captions} captions, dim {problem.dim}")
    teacher = teacher or train_teacher(problem, s, log)
    ref = floor(problem, s)
    rows = []
    for row in euler_rows(problem, teacher, s, euler_steps):
        rows.append({**row, "fd_floor": ref["fd"], "mode_tv_true": ref["mode_tv"]})
        log(f"  euler {row['steps']:2d} steps: fd {row['fd']:.3f}  modes_lost {row['modes_lost']}")
    curves, traces = {}, {}
    for run in runs if runs is not None else default_runs():
        result = distill(problem, teacher, run, s, log)
        curves[run.name], traces[run.name] = result["curve"], result["trace"]
        row = {**result_row(run, result), "fd_floor": ref["fd"], "mode_tv_true": ref["mode_tv"]}
        rows.append(row)
        log(f"  {run.name:24s} fd {row['fd']:.3f}  modes_lost {row['modes_lost']}  tv {row['mode_tv']:.3f}"
            f"  (curve min {row['fd_best_on_curve']:.3f} at {row['best_at']})  {row['seconds']:.0f}s")
    return {"settings": dataclasses.asdict(s), "floor": ref, "rows": rows, "curves": curves, "traces": traces,
            "seconds": time.perf_counter() - t0}


def format_table(rows: list[dict]) -> str:
    head = ("| method | variant | steps | Fréchet ↓ (floor) | modes lost ↓ | mode TV ↓ (true) | on-mode ↑ "
            "| curve min (at gen upd.) |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        best = f"{r['fd_best_on_curve']:.3f} ({r['best_at']})" if "fd_best_on_curve" in r else "—"
        lines.append(f"| {r['method']} | {r.get('variant') or '—'} | {r['steps']} | {r['fd']:.3f} ({r['fd_floor']:.3f}) "
                     f"| {r['modes_lost']} | {r['mode_tv']:.3f} ({r['mode_tv_true']:.3f}) | {r['on_mode']:.3f} | {best} |")
    return "\n".join(lines)


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result["rows"], indent=2))
    (out / "curves.json").write_text(json.dumps({"settings": result["settings"], "curves": result["curves"],
                                                 "traces": result["traces"]}, indent=1))


def finite(x: float) -> float:
    return x if x is not None and math.isfinite(x) else math.inf
