"""Random draws: device-correct, per-sample when asked, and the only way the method draws."""

import copy
import sys
from pathlib import Path

import pytest
import torch

from w2svd import rng
from w2svd.baselines import flow_matching_step, lcm_step
from w2svd.distill import StepSettings, critic_step, generator_input, generator_step
from w2svd.models.base import Cond
from w2svd.models.toy import TOY_LORA_TARGETS, ToyDenoiser
from w2svd.roles import View, build_roles
from w2svd.sampling import sample_student

RNG_FILE = str(Path(rng.__file__).resolve())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_a_cpu_generator_serves_another_device():
    # On CUDA, torch.randn(..., generator=cpu_gen, device="cuda") raises; the helper draws where
    # the generator lives and moves the result. "meta" stands in for the accelerator here.
    out = rng.randn((2, 3), gen(0), device="meta")
    assert out.device.type == "meta" and out.shape == (2, 3)
    assert rng.randint(5, (4,), gen(0), device="meta").device.type == "meta"
    assert rng.rand((4,), gen(0), device="meta").device.type == "meta"


def test_numbers_depend_on_the_seed_only():
    a = rng.randn((2, 3), gen(7), device="cpu", dtype=torch.float64)
    torch.testing.assert_close(a, torch.randn(2, 3, generator=gen(7)).double())
    assert not torch.equal(a, rng.randn((2, 3), gen(8), device="cpu", dtype=torch.float64))


def test_per_sample_generators_make_each_row_a_function_of_its_own_seed():
    batch = rng.randn((3, 4, 5), rng.per_sample_generators([11, 12, 13]))
    for row, seed in zip(batch, (11, 12, 13)):
        torch.testing.assert_close(row, torch.randn(4, 5, generator=gen(seed)))
    # the same seed in another batch position, next to other seeds, gives the same row
    other = rng.randn((2, 4, 5), rng.per_sample_generators([99, 12]))
    torch.testing.assert_close(other[1], batch[1])
    ints = rng.randint(10, (3,), rng.per_sample_generators([1, 2, 3]))
    assert ints.tolist() == [int(torch.randint(10, (), generator=gen(s))) for s in (1, 2, 3)]


def test_per_sample_generators_must_match_the_batch():
    with pytest.raises(ValueError, match="per-sample generators"):
        rng.randn((3, 2), rng.per_sample_generators([1, 2]))


@pytest.fixture
def draws_only_through_rng(monkeypatch):
    """torch's random functions, patched to refuse a generator from anywhere but ``w2svd/rng.py``
    and, as CUDA does, a generator on another device than the one asked for."""
    calls = []

    def guarded(fn):
        def wrapper(*args, generator=None, device=None, **kwargs):
            if generator is not None:
                caller = str(Path(sys._getframe(1).f_code.co_filename).resolve())
                if caller != RNG_FILE:
                    raise AssertionError(f"{fn.__name__} with a generator called from {caller}, not w2svd/rng.py")
                if device is not None and torch.device(device).type != generator.device.type:
                    raise RuntimeError(f"Expected a '{torch.device(device).type}' device type for generator")
                calls.append(fn.__name__)
            return fn(*args, generator=generator, device=device, **kwargs)
        return wrapper

    for name in ("randn", "rand", "randint"):
        monkeypatch.setattr(torch, name, guarded(getattr(torch, name)))
    return calls


@pytest.mark.parametrize("backward_simulation", [False, True])
def test_training_steps_draw_only_through_the_helper(draws_only_through_rng, backward_simulation):
    torch.manual_seed(0)
    teacher = ToyDenoiser(6, 3, hidden=16, depth=2)
    x = torch.zeros(4, 6).normal_()
    cond = Cond(text=torch.nn.functional.one_hot(torch.arange(4) % 3, 3).float())
    g = gen(0)
    roles = build_roles(copy.deepcopy(teacher), lora_rank=2, lora_alpha=2.0, lora_targets=TOY_LORA_TARGETS,
                        disc_hidden=8)
    st = StepSettings(student_steps=4, backward_simulation=backward_simulation)
    critic_step(roles, x, cond, st, generator=g)
    generator_step(roles, x, cond, st, generator=g)
    student = View(copy.deepcopy(teacher).requires_grad_(True))
    lcm_step(student, View(copy.deepcopy(teacher)), View(teacher), x, cond, teacher_steps=8, shift=1.0,
             generator=g)
    flow_matching_step(student, x, cond, torch.full((4,), 0.5), uncond_prob=0.5, generator=g)
    with torch.no_grad():
        sample_student(lambda z, s: teacher(z, s, cond), torch.zeros(4, 6), 4, 1.0, "renoise", g)
    assert {"randn", "rand", "randint"} <= set(draws_only_through_rng)


def test_backward_simulation_depth_follows_the_shared_stream_not_the_rank_stream():
    # Under ZeRO-3 every rank gathers parameters per forward, so every rank must run as many
    # generator forwards as the others: ranks with different streams but one shared stream agree.
    torch.manual_seed(0)
    teacher = ToyDenoiser(6, 3, hidden=16, depth=2)
    x = torch.zeros(4, 6).normal_()
    cond = Cond(text=torch.nn.functional.one_hot(torch.arange(4) % 3, 3).float())
    st = StepSettings(student_steps=4, backward_simulation=True)

    def forwards(rank_seed: int, shared: torch.Generator | None) -> int:
        roles = build_roles(copy.deepcopy(teacher), lora_rank=2, lora_alpha=2.0, lora_targets=TOY_LORA_TARGETS)
        calls = []
        roles.generator.backbone.register_forward_hook(lambda *a: calls.append(1))
        with torch.no_grad():
            generator_input(roles, x, cond, st, gen(rank_seed), shared)
        return len(calls)

    alone = [forwards(rank, None) for rank in range(8)]
    assert len(set(alone)) > 1  # the rank's own stream: ranks would disagree
    shared = [forwards(rank, gen(1234)) for rank in range(8)]
    assert len(set(shared)) == 1
