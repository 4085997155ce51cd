"""The proof on a known distribution: every method distilled from one teacher, exact distances.

The data is a caption-conditioned Gaussian mixture over a tiny "video" (frames × numbers):
for caption ``k`` a clip is drawn from one of ``M`` motion modes (a start vector plus a
per-frame drift) with isotropic noise. Its moments are known in closed form, so the Fréchet
distance of a generator's samples to the truth, and which modes it dropped, are exact — no
feature network stands between the method and the number.

Everything a video run does happens here at toy size: a flow-matching teacher, then W2SVD,
vanilla DMD2, LCM and teacher Euler sampling with the same budget, evaluated on fixed seeds,
with curves recorded along the way.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from w2svd.baselines import ema_update, flow_matching_step, lcm_step
from w2svd.distill import StepSettings, critic_step, generator_step
from w2svd.health import HealthMonitor
from w2svd.models.base import Cond
from w2svd.models.toy import TOY_LORA_TARGETS, ToyDenoiser
from w2svd.roles import Guidance, View, build_roles
from w2svd.sampling import sample_student, sample_teacher_euler
from w2svd.schedule import sample_logit_normal_sigmas

# ---------------------------------------------------------------------------------------------
# The known distribution


@dataclass
class ToyProblem:
    num_classes: int = 4
    modes_per_class: int = 4
    frames: int = 4
    numbers: int = 8
    mode_std: float = 0.25
    seed: int = 0

    def __post_init__(self):
        g = torch.Generator().manual_seed(self.seed)
        K, M, F, N = self.num_classes, self.modes_per_class, self.frames, self.numbers
        start_KMN = 1.5 * torch.randn(K, M, N, generator=g)
        drift_KMN = 0.6 * torch.randn(K, M, N, generator=g)
        t_F = torch.arange(F, dtype=torch.float32)
        self.means_KMD = (start_KMN[:, :, None, :] + t_F[None, None, :, None] * drift_KMN[:, :, None, :]
                          ).reshape(K, M, F * N)

    @property
    def dim(self) -> int:
        return self.frames * self.numbers

    def cond(self, labels_B: torch.Tensor) -> Cond:
        return Cond(text=torch.nn.functional.one_hot(labels_B, self.num_classes).float())

    def sample(self, labels_B: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
        modes_B = torch.randint(self.modes_per_class, labels_B.shape, generator=g)
        noise = torch.randn(len(labels_B), self.dim, generator=g)
        return self.means_KMD[labels_B, modes_B] + self.mode_std * noise

    def true_moments(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixture of equal-weight ``N(μ_m, σ²I)``: mean ``μ̄``, cov ``σ²I + (1/M)Σ μ_mμ_mᵀ − μ̄μ̄ᵀ``."""
        mu_MD = self.means_KMD[k].double()
        mean = mu_MD.mean(0)
        cov = self.mode_std**2 * torch.eye(self.dim, dtype=torch.float64) + mu_MD.T @ mu_MD / len(mu_MD)
        return mean, cov - torch.outer(mean, mean)


def frechet_to_moments(samples_ND: torch.Tensor, mean_D: torch.Tensor, cov_DD: torch.Tensor) -> float:
    """``‖μ − μ̂‖² + Tr(Σ + Σ̂ − 2(Σ^½ Σ̂ Σ^½)^½)`` between samples and exact moments."""
    x = samples_ND.double()
    mu = x.mean(0)
    sig = torch.cov(x.T)
    evals, evecs = torch.linalg.eigh(cov_DD)
    root = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
    cross = torch.linalg.eigvalsh(root @ sig @ root).clamp_min(0).sqrt().sum()
    return float(((mu - mean_D) ** 2).sum() + torch.trace(cov_DD) + torch.trace(sig) - 2 * cross)


def evaluate_samples(problem: ToyProblem, samples_ND: torch.Tensor, labels_N: torch.Tensor) -> dict:
    """Mean per-caption Fréchet distance, modes lost, and the share of samples on a mode.

    A mode is lost when it receives under a quarter of its fair share of its caption's samples
    (nearest-mean assignment). A sample is "on a mode" when its squared distance to the nearest
    mean is within the 99.9 % quantile of ``σ²·χ²_D`` (≈ D + 3.1·sqrt(2D)).
    """
    fds, lost, on_mode, spread = [], 0, [], []
    threshold = problem.mode_std**2 * (problem.dim + 3.1 * math.sqrt(2 * problem.dim))
    for k in range(problem.num_classes):
        x = samples_ND[labels_N == k].double()
        mean_true, cov_true = problem.true_moments(k)
        fds.append(frechet_to_moments(x, mean_true, cov_true))
        spread.append(float(torch.cov(x.T).trace() / cov_true.trace()))
        d2 = torch.cdist(x, problem.means_KMD[k].double()) ** 2
        nearest, dist2 = d2.argmin(1), d2.min(1).values
        share = torch.bincount(nearest, minlength=problem.modes_per_class).double() / len(x)
        lost += int((share < 0.25 / problem.modes_per_class).sum())
        on_mode.append((dist2 <= threshold).double().mean().item())
    return {"fd": sum(fds) / len(fds), "modes_lost": lost, "on_mode": sum(on_mode) / len(on_mode),
            "spread": sum(spread) / len(spread)}


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass
class ToySettings:
    """One budget and one set of knobs for every method (the fairness of the comparison)."""

    teacher_steps: int = 3000
    teacher_lr: float = 1e-3
    hidden: int = 256
    depth: int = 4
    batch: int = 256
    iterations: int = 4000  # critic updates for DMD-family; student updates for LCM
    gen_update_every: int = 5
    generator_lr: float = 3e-5
    critic_lr: float = 1e-4  # the full fake copy's rate
    lora_critic_lr_mult: float = 10.0  # a LoRA critic needs a higher rate (DESIGN §2)
    lora_rank: int = 32
    alpha_weak: float = 0.25
    lambda_reg: float = 0.0
    lambda_gan_gen: float = 5e-3
    lambda_gan_disc: float = 1e-2
    disc_lr: float = 1e-4
    backward_simulation: bool = True
    generator_ema: float = 0.0
    grad_clip: float = 1.0
    # "cosine" decays every trained network's rate to 0 over the run, the same for all methods.
    lr_schedule: str = "cosine"
    lcm_teacher_steps: int = 28
    lcm_target_ema: float = 0.95
    eval_samples: int = 4096
    eval_every: int = 20  # generator updates between curve points
    # The training-health guard (w2svd.health) on training-batch signals only — NaN/inf, the
    # generator's sample std against the data's, exploding losses — never on the reported metric.
    health: bool = True
    seed: int = 0

    @classmethod
    def fast(cls) -> ToySettings:
        return cls(teacher_steps=2000, hidden=128, depth=3, iterations=2000, eval_samples=2048, eval_every=20)


@dataclass
class Run:
    method: str
    steps: int
    variant: str = ""
    overrides: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Teacher


def train_teacher(problem: ToyProblem, s: ToySettings, log=print) -> ToyDenoiser:
    torch.manual_seed(s.seed)
    g = torch.Generator().manual_seed(s.seed + 1)
    model = ToyDenoiser(problem.dim, problem.num_classes, s.hidden, s.depth)
    opt = torch.optim.AdamW(model.parameters(), lr=s.teacher_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, s.teacher_steps)
    view = View(model)
    for step in range(s.teacher_steps):
        labels = torch.randint(problem.num_classes, (s.batch,), generator=g)
        x0 = problem.sample(labels, g)
        sigma = sample_logit_normal_sigmas(s.batch, 0.0, 1.0, g)
        opt.zero_grad(set_to_none=True)
        metrics = flow_matching_step(view, x0, problem.cond(labels), sigma, uncond_prob=0.1, generator=g)
        opt.step()
        sched.step()
        if step % 500 == 0 or step == s.teacher_steps - 1:
            log(f"  teacher step {step:5d}  loss {metrics['fm/loss']:.4f}")
    return model.requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------------
# Evaluation on fixed seeds


def eval_batch(problem: ToyProblem, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + seed)
    labels = torch.arange(n) % problem.num_classes
    return labels, torch.randn(n, problem.dim, generator=g)


def evaluate_velocity(problem: ToyProblem, velocity, steps: int, s: ToySettings, teacher_euler: bool) -> dict:
    labels, noise = eval_batch(problem, s.eval_samples, s.seed)
    cond = problem.cond(labels)

    def v(x, sigma_B):
        return velocity(x, sigma_B, cond)

    if teacher_euler:
        out = sample_teacher_euler(v, noise, steps, shift=1.0)
    else:
        out = sample_student(v, noise, steps, shift=1.0, mode="renoise",
                             generator=torch.Generator().manual_seed(20_000 + s.seed))
    return evaluate_samples(problem, out, labels)


# ---------------------------------------------------------------------------------------------
# Distillation runs


def _adam(*groups: tuple) -> torch.optim.AdamW:
    """DMD2's AdamW (β1 = 0, no decay) over ``(params, lr)`` groups, shared by every method."""
    return torch.optim.AdamW([{"params": list(p), "lr": lr} for p, lr in groups], betas=(0.0, 0.999),
                             weight_decay=0.0)


def _schedule(opt, total: int, s: ToySettings):
    if s.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    assert s.lr_schedule == "constant", s.lr_schedule
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def _clip(params, max_norm):
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def distill_dmd_family(problem: ToyProblem, teacher: ToyDenoiser, run: Run, s: ToySettings, log=print) -> dict:
    """W2SVD (critic LoRA at two strengths) or vanilla DMD2 (full fake copy): the same loop."""
    torch.manual_seed(s.seed)
    g = torch.Generator().manual_seed(s.seed + 2)
    lora = run.method == "w2svd"
    roles = build_roles(copy.deepcopy(teacher), method=run.method, generator="full",
                        alpha_weak=s.alpha_weak, lora_rank=s.lora_rank, lora_alpha=float(s.lora_rank),
                        lora_targets=TOY_LORA_TARGETS, guidance=Guidance("none"),
                        discriminator=s.lambda_gan_gen > 0 or s.lambda_gan_disc > 0, disc_hidden=128)
    st = StepSettings(student_steps=run.steps, shift=1.0, lambda_reg=s.lambda_reg,
                      lambda_gan_gen=s.lambda_gan_gen, lambda_gan_disc=s.lambda_gan_disc,
                      backward_simulation=s.backward_simulation)
    critic_lr = s.critic_lr * (s.lora_critic_lr_mult if lora else 1.0)
    opt_critic = _adam((roles.fake_score_parameters(), critic_lr), (roles.disc_parameters(), s.disc_lr))
    gen_params = roles.generator_parameters()
    opt_gen = _adam((gen_params, s.generator_lr))
    sched_critic = _schedule(opt_critic, s.iterations, s)
    sched_gen = _schedule(opt_gen, math.ceil(s.iterations / s.gen_update_every), s)
    ema = copy.deepcopy(roles.generator.backbone) if s.generator_ema > 0 else None
    eval_net = ema if ema is not None else roles.generator.backbone

    def evaluate():
        return evaluate_velocity(problem, lambda x, sg, c: eval_net(x, sg, c), run.steps, s, False)

    curve = [{"gen_updates": 0, **evaluate()}]
    monitor = HealthMonitor(enabled=s.health)
    trained = {"roles": roles, "opt_critic": opt_critic, "opt_gen": opt_gen}
    last_good = copy.deepcopy({k: v.state_dict() for k, v in trained.items()})
    lr_scale = 1.0
    gen_updates = 0
    t0 = time.perf_counter()
    for it in range(s.iterations):
        labels = torch.randint(problem.num_classes, (s.batch,), generator=g)
        x_gt, cond = problem.sample(labels, g), problem.cond(labels)

        opt_critic.zero_grad(set_to_none=True)
        critic_metrics = critic_step(roles, x_gt, cond, st, generator=g)
        _clip(roles.critic_parameters(), s.grad_clip)
        opt_critic.step()
        sched_critic.step()

        if it % s.gen_update_every == 0:
            opt_gen.zero_grad(set_to_none=True)
            gen_metrics = generator_step(roles, x_gt, cond, st, generator=g)
            grad_norm = _clip(gen_params, s.grad_clip)
            decision = monitor.check(it, {**critic_metrics, **gen_metrics, "data/std": x_gt.std().item()},
                                     {"generator": grad_norm})
            if decision.action == "stop":
                log(f"  health: {decision.reason}")
                break
            if decision.action == "rollback":
                log(f"  health: {decision.reason}")
                for key, module in trained.items():
                    module.load_state_dict(copy.deepcopy(last_good[key]))
                # The restored optimizers carry the old rate; both schedules scale from it.
                change, lr_scale = decision.lr_scale / lr_scale, decision.lr_scale
                for opt, sched in ((opt_critic, sched_critic), (opt_gen, sched_gen)):
                    sched.base_lrs = [lr * change for lr in sched.base_lrs]
                    for group in opt.param_groups:
                        group["lr"] *= change
                continue
            opt_gen.step()
            sched_gen.step()
            if ema is not None:
                ema_update(ema, roles.generator.backbone, s.generator_ema)
            gen_updates += 1
            if gen_updates % s.eval_every == 0:
                point = {"gen_updates": gen_updates, **evaluate(), **gen_metrics, **critic_metrics}
                curve.append(point)
                if not decision.reason:  # in band now, not merely within patience
                    last_good = copy.deepcopy({k: v.state_dict() for k, v in trained.items()})
    elapsed = time.perf_counter() - t0
    final = curve[-1] if curve[-1]["gen_updates"] == gen_updates else {"gen_updates": gen_updates, **evaluate()}
    return {"final": {k: final[k] for k in ("fd", "modes_lost", "on_mode")}, "curve": curve,
            "seconds": elapsed, "rollbacks": monitor.state.rollbacks}


def distill_lcm(problem: ToyProblem, teacher: ToyDenoiser, run: Run, s: ToySettings, log=print) -> dict:
    torch.manual_seed(s.seed)
    g = torch.Generator().manual_seed(s.seed + 3)
    student_net = copy.deepcopy(teacher).requires_grad_(True)
    target_net = copy.deepcopy(teacher)
    student, target, teacher_view = View(student_net), View(target_net), View(teacher)
    opt = _adam((student_net.parameters(), s.generator_lr))
    sched = _schedule(opt, s.iterations, s)

    def evaluate():
        return evaluate_velocity(problem, lambda x, sg, c: student_net(x, sg, c), run.steps, s, False)

    curve = [{"gen_updates": 0, **evaluate()}]
    t0 = time.perf_counter()
    # Same number of student updates as the DMD family's critic iterations: LCM has no critic,
    # so it gets gen_update_every× more updates of the network that is evaluated.
    for it in range(1, s.iterations + 1):
        labels = torch.randint(problem.num_classes, (s.batch,), generator=g)
        x_gt, cond = problem.sample(labels, g), problem.cond(labels)
        opt.zero_grad(set_to_none=True)
        metrics = lcm_step(student, target, teacher_view, x_gt, cond, teacher_steps=s.lcm_teacher_steps,
                           shift=1.0, generator=g)
        _clip(list(student_net.parameters()), s.grad_clip)
        opt.step()
        sched.step()
        ema_update(target_net, student_net, s.lcm_target_ema)
        if it % (s.eval_every * s.gen_update_every) == 0:
            curve.append({"gen_updates": it // s.gen_update_every, **evaluate(), **metrics})
    return {"final": {k: curve[-1][k] for k in ("fd", "modes_lost", "on_mode")}, "curve": curve,
            "seconds": time.perf_counter() - t0}


DEFAULT_RUNS = [
    Run("dmd2", 1), Run("w2svd", 1), Run("lcm", 1),
    Run("dmd2", 4), Run("w2svd", 4), Run("lcm", 4),
    Run("w2svd", 4, "reg", {"lambda_reg": 0.25}),
    Run("w2svd", 4, "alpha0", {"alpha_weak": 0.0}),
    Run("w2svd", 4, "alpha0.5", {"alpha_weak": 0.5}),
    Run("w2svd", 4, "alpha0.75", {"alpha_weak": 0.75}),
]


def run_toy(settings: ToySettings | None = None, runs: list[Run] | None = None, euler_steps=(1, 4, 28),
            log=print) -> dict:
    s = settings or ToySettings()
    problem = ToyProblem(seed=s.seed)
    torch.manual_seed(s.seed)
    t0 = time.perf_counter()
    log(f"toy: {problem.num_classes} captions × {problem.modes_per_class} modes, dim {problem.dim}")
    teacher = train_teacher(problem, s, log)
    rows = []
    for n in euler_steps:
        metrics = evaluate_velocity(problem, teacher, n, s, teacher_euler=True)
        rows.append({"method": "euler", "steps": n, "variant": "", **metrics, "seconds": 0.0})
        log(f"  euler {n:2d} steps: fd {metrics['fd']:.3f}  modes_lost {metrics['modes_lost']}")
    curves = {}
    for run in runs if runs is not None else DEFAULT_RUNS:
        rs = dataclasses.replace(s, **run.overrides)
        fn = distill_lcm if run.method == "lcm" else distill_dmd_family
        result = fn(problem, teacher, run, rs, log)
        name = f"{run.method}{'-' + run.variant if run.variant else ''}-{run.steps}step"
        curves[name] = result["curve"]
        best = min(result["curve"], key=lambda p: p["fd"])
        rows.append({"method": run.method, "steps": run.steps, "variant": run.variant, **result["final"],
                     "best_fd_on_curve": best["fd"], "best_at": best["gen_updates"],
                     "rollbacks": result.get("rollbacks", 0),
                     "seconds": round(result["seconds"], 1)})
        log(f"  {name:24s} fd {result['final']['fd']:.3f}  modes_lost {result['final']['modes_lost']}"
            f"  (curve min {best['fd']:.3f} at {best['gen_updates']})  {result['seconds']:.0f}s")
    return {"settings": dataclasses.asdict(s), "rows": rows, "curves": curves,
            "seconds": time.perf_counter() - t0}


def format_table(rows: list[dict]) -> str:
    head = "| method | variant | steps | Fréchet ↓ | modes lost ↓ | on-mode ↑ | curve min (at gen upd.) |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        best = f"{r['best_fd_on_curve']:.3f} ({r['best_at']})" if "best_fd_on_curve" in r else "—"
        lines.append(f"| {r['method']} | {r.get('variant') or '—'} | {r['steps']} | {r['fd']:.3f} | "
                     f"{r['modes_lost']} | {r['on_mode']:.3f} | {best} |")
    return "\n".join(lines)


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result["rows"], indent=2))
    (out / "curves.json").write_text(json.dumps({"settings": result["settings"], "curves": result["curves"]},
                                                indent=1))
