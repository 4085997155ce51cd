"""The toy proof: exact distances on a known distribution, and W2SVD against 1-step Euler."""

import math

import pytest
import torch

from w2svd.toybench import Run, ToyProblem, ToySettings, evaluate_samples, frechet_to_moments, run_toy


def test_true_moments_match_a_large_sample():
    problem = ToyProblem(seed=3)
    labels = torch.full((200_000,), 2)
    x = problem.sample(labels, torch.Generator().manual_seed(0)).double()
    mean, cov = problem.true_moments(2)
    assert torch.allclose(x.mean(0), mean, atol=0.03)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.06)


def test_frechet_against_closed_form_for_gaussians():
    # Diagonal Gaussians: FD = |mu1-mu2|^2 + sum (s1 - s2)^2 for stds s1, s2.
    g = torch.Generator().manual_seed(0)
    n, d = 400_000, 3
    std1, std2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([1.5, 1.0, 0.5])
    mu1, mu2 = torch.tensor([0.0, 1.0, -1.0]), torch.tensor([0.5, 1.0, 0.0])
    samples = mu1 + std1 * torch.randn(n, d, generator=g)
    want = float(((mu1 - mu2) ** 2).sum() + ((std1 - std2) ** 2).sum())
    got = frechet_to_moments(samples, mu2.double(), torch.diag(std2.double() ** 2))
    assert math.isclose(got, want, rel_tol=0.02, abs_tol=0.01)


def test_evaluation_of_true_samples_and_of_a_collapsed_generator():
    problem = ToyProblem(seed=0)
    labels = torch.arange(4000) % problem.num_classes
    good = evaluate_samples(problem, problem.sample(labels, torch.Generator().manual_seed(1)), labels)
    assert good["fd"] < 0.5 and good["modes_lost"] == 0 and good["on_mode"] > 0.98
    # Every sample of a caption at its first mode: all other modes lost, large distance.
    collapsed = problem.means_KMD[labels, 0] + problem.mode_std * torch.randn(len(labels), problem.dim)
    bad = evaluate_samples(problem, collapsed, labels)
    assert bad["modes_lost"] == problem.num_classes * (problem.modes_per_class - 1)
    assert bad["fd"] > 10 * good["fd"]


@pytest.mark.slow
def test_w2svd_one_step_beats_one_step_euler_by_a_wide_margin(tmp_path):
    torch.set_num_threads(1)
    settings = ToySettings.fast()
    result = run_toy(settings, runs=[Run("w2svd", 1)], euler_steps=(1,), log=lambda *a: None)
    rows = {(r["method"], r["steps"]): r for r in result["rows"]}
    euler, w2svd = rows[("euler", 1)], rows[("w2svd", 1)]
    assert w2svd["modes_lost"] == 0
    assert w2svd["fd"] < euler["fd"] / 5, (w2svd, euler)


def test_health_guard_rolls_back_a_blown_up_generator_and_lowers_its_rate():
    """A generator learning rate far too high blows the sample std up; the guard (training-batch
    signals only) restores the last in-band state with a lower rate, and does nothing when off."""
    import dataclasses

    from w2svd.toybench import distill_dmd_family, train_teacher

    torch.set_num_threads(1)
    s = dataclasses.replace(ToySettings.fast(), teacher_steps=300, iterations=120, eval_every=5,
                            generator_lr=0.3, lr_schedule="constant", eval_samples=512)
    problem = ToyProblem()
    teacher = train_teacher(problem, s, log=lambda *a: None)
    messages = []
    guarded = distill_dmd_family(problem, teacher, Run("w2svd", 1), s, log=messages.append)
    assert guarded["rollbacks"] >= 1
    assert any("sample std / data std" in m and "x0.5" in m for m in messages), messages
    unguarded = distill_dmd_family(problem, teacher, Run("w2svd", 1), dataclasses.replace(s, health=False),
                                   log=messages.append)
    assert unguarded["rollbacks"] == 0
    assert guarded["final"]["fd"] < unguarded["final"]["fd"]
