"""Roles: one base, one critic LoRA at two strengths, gradients only where DESIGN §2 says."""

import copy

import pytest
import torch

from w2svd.distill import StepSettings, critic_step, generator_step
from w2svd.losses import dmd_loss, gan_generator_loss
from w2svd.models.base import Cond, count_parameter_bytes
from w2svd.models.toy import TOY_LORA_TARGETS, ToyDenoiser
from w2svd.roles import CRITIC, GENERATOR, adapter_parameters, build_roles
from w2svd.schedule import add_noise, x0_from_velocity

D, E, B = 12, 3, 4


def make(method="w2svd", generator="full", alpha_weak=0.25, **kw):
    torch.manual_seed(0)
    teacher = ToyDenoiser(D, E, hidden=32, depth=2)
    reference = copy.deepcopy(teacher)
    roles = build_roles(teacher, method=method, generator=generator, alpha_weak=alpha_weak, lora_rank=4,
                        lora_alpha=4.0, generator_lora_rank=4, lora_targets=TOY_LORA_TARGETS,
                        disc_hidden=16, **kw)
    return roles, reference


def batch():
    x = torch.randn(B, D)
    cond = Cond(text=torch.nn.functional.one_hot(torch.arange(B) % E, E).float())
    return x, cond


def perturb_lora(module, name, scale=0.1):
    with torch.no_grad():
        for p in adapter_parameters(module, name):
            p.add_(scale * torch.randn_like(p))


def test_fake_and_real_share_one_module_and_its_storage():
    roles, reference = make()
    assert roles.fake.backbone is roles.real.backbone is roles.base
    fake_ptrs = {p.data_ptr() for p in roles.fake.backbone.parameters()}
    real_ptrs = {p.data_ptr() for p in roles.real.backbone.parameters()}
    assert fake_ptrs == real_ptrs
    base_bytes = count_parameter_bytes(reference)
    lora_bytes = sum(p.numel() * p.element_size() for p in adapter_parameters(roles.base, CRITIC))
    # base + critic LoRA, no second copy of the base for the real score
    assert count_parameter_bytes(roles.base) == base_bytes + lora_bytes


def test_shared_base_mode_holds_one_base_copy():
    full, _ = make(generator="full")
    shared, reference = make(generator="lora")
    base_bytes = count_parameter_bytes(reference)
    shared_bytes = count_parameter_bytes(shared)
    assert shared_bytes < 1.5 * base_bytes  # base + two small adapters + head
    assert count_parameter_bytes(full) > 1.9 * base_bytes  # a full generator copy on top
    dmd2, _ = make(method="dmd2")
    assert count_parameter_bytes(dmd2) > 2.9 * base_bytes  # generator + fake copy + real


@pytest.mark.parametrize("generator", ["full", "lora"])
def test_alpha_weak_zero_reproduces_teacher_exactly(generator):
    roles, reference = make(generator=generator, alpha_weak=0.0)
    perturb_lora(roles.base, CRITIC)
    if generator == "lora":
        perturb_lora(roles.base, GENERATOR)
    x, cond = batch()
    s = torch.rand(B)
    want = x0_from_velocity(x, reference(x, s, cond), s)
    assert torch.equal(roles.real_x0(x, s, cond), want)
    # while the fake score (and the generator, in LoRA mode) differ from it
    assert not torch.allclose(roles.fake_x0(x, s, cond), want)
    # at rest (outside any role's scope) the base is the teacher
    assert torch.equal(roles.base(x, s, cond), reference(x, s, cond))


def test_real_score_moves_by_alpha_weak_of_the_adapter():
    roles, reference = make(alpha_weak=0.25)
    perturb_lora(roles.base, CRITIC, 0.01)  # small adapter: first order holds
    x, cond = batch()
    s = torch.rand(B)
    v0 = reference(x, s, cond)
    dv_real = roles.real.__call__(x, s, cond) - v0
    dv_fake = roles.fake(x, s, cond) - v0
    assert dv_fake.abs().mean() > 1e-4
    assert torch.allclose(dv_real, 0.25 * dv_fake, atol=0.02 * dv_fake.abs().max().item())


def step_moves_only(run_step, trained, untouched, everything):
    """Run one step, apply SGD to ``trained``: only those parameters may move, and some must."""
    before = {id(p): p.detach().clone() for p in everything}
    metrics = run_step()
    assert all(p.grad is None for p in untouched)
    torch.optim.SGD(trained, lr=0.1).step()
    moved = {id(p) for p in everything if not torch.equal(before[id(p)], p.detach())}
    assert moved, "the step changed nothing"
    assert moved <= {id(p) for p in trained}
    return metrics


@pytest.mark.parametrize("method,generator", [("w2svd", "full"), ("w2svd", "lora"), ("dmd2", "full")])
def test_critic_step_trains_only_critic_and_generator_step_only_generator(method, generator):
    roles, reference = make(method=method, generator=generator)
    perturb_lora(roles.base, CRITIC) if method == "w2svd" else None
    st = StepSettings(student_steps=4, lambda_reg=0.5, lambda_gan_gen=0.1, lambda_gan_disc=0.1)
    x, cond = batch()
    critic, gen = roles.critic_parameters(), roles.generator_parameters()
    base_frozen = [p for n, p in roles.base.named_parameters() if "lora_" not in n]
    everything = list(roles.parameters())

    metrics = step_moves_only(lambda: critic_step(roles, x, cond, st), critic, gen + base_frozen, everything)
    assert {"critic/flow_matching", "critic/disc"} <= set(metrics)
    for p in critic:
        p.grad = None
    metrics = step_moves_only(lambda: generator_step(roles, x, cond, st), gen, critic + base_frozen, everything)
    assert {"gen/dmd", "gen/reg", "gen/gan"} <= set(metrics)


def test_gan_surrogate_gradient_equals_direct_backprop():
    """The generator's GAN gradient through the surrogate equals the plain chain rule."""
    roles, _ = make(generator="lora")
    perturb_lora(roles.base, CRITIC)
    perturb_lora(roles.base, GENERATOR)
    x_in, cond = batch()
    s_g, s = torch.full((B,), 1.0), torch.full((B,), 0.6)
    eps = torch.randn(B, D)
    gen = roles.generator_parameters()

    with roles.generator.scope():
        x_hat = roles.generator_x0(x_in, s_g, cond)
        x_s = add_noise(x_hat, eps, s)
        _, grad_x = roles.gan_generator_grad(x_s, s, cond)
        surrogate = (grad_x * x_s).sum()
    g_sur = torch.autograd.grad(surrogate, gen)

    # Direct: one graph through generator and fake score, adapters switched by hand.
    with roles.generator.scope():
        x_hat = roles.generator_x0(x_in, s_g, cond)
    x_s = add_noise(x_hat, eps, s)
    with roles.fake.scope():
        _, feats = roles.fake_velocity_and_features(x_s, s, cond)
        direct = gan_generator_loss(roles.disc(feats))
        g_dir = torch.autograd.grad(direct, gen)
    for a, b in zip(g_sur, g_dir):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_generator_step_gradient_is_the_dmd_direction():
    """Without reg and GAN, the generator's loss gradient wrt x_hat is the normalised score gap."""
    roles, _ = make(generator="full")
    perturb_lora(roles.base, CRITIC)
    x_hat = torch.randn(B, D, requires_grad=True)
    s = torch.full((B,), 0.5)
    x_s = add_noise(x_hat, torch.randn(B, D), s)
    cond = batch()[1]
    with torch.no_grad():
        real, fake = roles.real_x0(x_s, s, cond), roles.fake_x0(x_s, s, cond)
    dmd_loss(x_hat, fake, real).backward()
    want = (fake - real) / (x_hat.detach() - real).abs().mean(1, keepdim=True) / x_hat.numel()
    assert torch.allclose(x_hat.grad, want, atol=1e-7)


def test_bad_method_and_pattern_fail_clearly():
    with pytest.raises(ValueError, match="method"):
        make(method="dmd3")
    with pytest.raises(ValueError, match="matched no layer"):
        build_roles(ToyDenoiser(D, E, 16, 1), lora_targets=r"nothing_here")
    with pytest.raises(ValueError, match="lora"):
        make(method="dmd2", generator="lora")
