"""The shared training iteration: cadence, rates, hooks and which role moves when."""

import math

import pytest
import torch

from w2svd.config import load_config
from w2svd.distill import StepSettings, reg_target
from w2svd.iteration import Cadence, GeneratorEMA, TorchTrainable, Trainable, lr_factor, train_iteration
from w2svd.models.base import Cond
from w2svd.models.toy import TOY_LORA_TARGETS, ToyDenoiser
from w2svd.roles import Guidance, build_roles
from w2svd.schedule import add_noise


def test_cadence_warmup_ratio_and_counts():
    c = Cadence(gen_update_every=3, critic_warmup=4, generator_updates=5)
    assert c.total_iterations == 4 + 3 * 5
    due = [it for it in range(c.total_iterations) if c.generator_due(it)]
    assert due == [4, 7, 10, 13, 16]
    assert [c.updates_before(it) for it in (0, 4, 5, 7, 8, 19)] == [0, 0, 1, 1, 2, 5]


def test_lr_factor_constant_and_cosine():
    assert lr_factor("constant", 7, 10) == 1.0
    assert lr_factor("cosine", 0, 10) == 1.0 and lr_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert lr_factor("cosine", 10, 10) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="schedule"):
        lr_factor("linear", 0, 1)


def test_cadence_and_step_settings_come_from_the_config():
    cfg = load_config("debug", ["optim.steps=23", "method.gen_update_every=5", "method.critic_warmup=3",
                                "optim.generator_lr_schedule=cosine", "method.reg_target=data_forcing"])
    c = Cadence.from_config(cfg)
    assert (c.critic_warmup, c.gen_update_every, c.generator_updates, c.generator_lr_schedule) == (3, 5, 4, "cosine")
    assert StepSettings.from_config(cfg.method).reg_target == "data_forcing"
    with pytest.raises(ValueError, match="critic_warmup"):
        load_config("debug", ["optim.steps=10", "method.critic_warmup=10"])


class Recorder:
    """A ``Trainable`` that records what the iteration asks of it."""

    def __init__(self, inner: TorchTrainable, log: list, name: str):
        self.inner, self.log, self.name = inner, log, name

    def zero_grad(self):
        self.log.append((self.name, "zero_grad"))
        self.inner.zero_grad()

    def backward(self, loss):
        self.log.append((self.name, "backward"))
        self.inner.backward(loss)

    def step(self):
        self.log.append((self.name, "step"))
        return self.inner.step()

    def set_lr_scale(self, scale):
        self.log.append((self.name, f"lr x{scale:.3f}"))
        self.inner.set_lr_scale(scale)


def _roles():
    torch.manual_seed(0)
    return build_roles(ToyDenoiser(6, 2, hidden=16, depth=2), method="w2svd", lora_rank=2, lora_alpha=2.0,
                       lora_targets=TOY_LORA_TARGETS, guidance=Guidance("none"), disc_hidden=8)


def _adam(params, lr):
    return TorchTrainable(torch.optim.AdamW([{"params": list(params), "lr": lr}]), grad_clip=1.0)


def test_critic_every_iteration_generator_when_due_at_the_scheduled_rate():
    roles = _roles()
    log = []
    critic = Recorder(_adam(roles.critic_parameters(), 1e-3), log, "critic")
    generator = Recorder(_adam(roles.generator_parameters(), 1e-3), log, "gen")
    assert isinstance(critic, Trainable)
    ema = GeneratorEMA(roles.generator.backbone, 0.5)
    cadence = Cadence(gen_update_every=2, critic_warmup=1, generator_updates=2, generator_lr_schedule="cosine")
    x, cond = torch.randn(3, 6), Cond(text=torch.eye(2)[[0, 1, 0]])
    g = torch.Generator().manual_seed(0)
    gen_before = [p.detach().clone() for p in roles.generator_parameters()]
    ema_before = [p.detach().clone() for p in ema.module.parameters()]
    results = [train_iteration(it, roles, x, cond, StepSettings(student_steps=1), cadence, critic, generator, rng=g,
                               ema=ema, lr_scale=0.5) for it in range(cadence.total_iterations)]
    assert [r.generator_updated for r in results] == [False, True, False, True, False]
    assert all("critic" in r.grad_norms for r in results)
    gen_calls = [op for who, op in log if who == "gen"]
    # Update 0 at the full cosine rate, update 1 at cos(π/2)-halfway: 0.5·1 and 0.5·0.5.
    assert gen_calls == ["lr x0.500", "zero_grad", "backward", "step", "lr x0.250", "zero_grad", "backward", "step"]
    assert [op for who, op in log if who == "critic"] == ["zero_grad", "backward", "step"] * 5
    assert results[1].metrics["lr/generator_factor"] == 1.0 and math.isfinite(results[1].metrics["gen/score_gap"])
    assert any(not torch.equal(a, b) for a, b in zip(gen_before, roles.generator_parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, ema.module.parameters()))


def test_a_refusing_check_stops_before_any_update():
    roles = _roles()
    log = []
    critic = Recorder(_adam(roles.critic_parameters(), 1e-3), log, "critic")
    generator = Recorder(_adam(roles.generator_parameters(), 1e-3), log, "gen")
    x, cond = torch.randn(2, 6), Cond(text=torch.eye(2))
    seen = []
    out = train_iteration(0, roles, x, cond, StepSettings(student_steps=1), Cadence(gen_update_every=1), critic,
                          generator, check=lambda m: seen.append(dict(m)) or "gen/dmd" not in m)
    assert out.stopped and not out.generator_updated and "generator" not in out.grad_norms
    assert ("critic", "step") in log and ("gen", "step") not in log and len(seen) == 2


def test_reg_targets_paper_and_data_forcing():
    roles = _roles()
    x_gt, eps = torch.randn(2, 6), torch.randn(2, 6)
    s_B, cond = torch.tensor([0.3, 0.7]), Cond(text=torch.eye(2))
    assert torch.equal(reg_target(roles, x_gt, eps, s_B, cond, "paper"), x_gt)
    want = roles.real_x0(add_noise(x_gt, eps, s_B), s_B, cond)
    assert torch.allclose(reg_target(roles, x_gt, eps, s_B, cond, "data_forcing"), want)
    with pytest.raises(ValueError, match="reg target"):
        reg_target(roles, x_gt, eps, s_B, cond, "other")
