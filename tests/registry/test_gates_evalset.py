"""Pure pieces of evaluation and promotion: the fixed evaluation set and the gate decision."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from w2svd.config import GateConfig, load_config
from w2svd.evalset import build_evalset, item_noise, reference_clips
from w2svd.gates import decide, relative_regression

GATES = [
    GateConfig("fvd/domain", "lower", max_regression=0.10, max=100.0),
    GateConfig("dynamic_degree", "higher", min=0.3),
    GateConfig("temporal_flickering", "higher", max_regression=0.02),
]
CHAMPION = {"fvd/domain": 10.0, "dynamic_degree": 0.5, "temporal_flickering": 0.95}


def test_evalset_is_fixed_and_fingerprinted():
    cfg = load_config("debug")
    a, b = build_evalset(cfg.eval), build_evalset(cfg.eval)
    assert a == b and len(a) == cfg.eval.num_prompts and len(set(a.prompts)) > 1
    assert a.fingerprint() == b.fingerprint()
    assert a.with_domain_encoder("x").fingerprint() != a.fingerprint()
    other = build_evalset(load_config("debug", ["eval.seed=1"]).eval)
    assert other.fingerprint() != a.fingerprint()
    ref = reference_clips(a)
    assert tuple(ref.shape) == (len(a), cfg.eval.num_frames, cfg.eval.height, cfg.eval.width, 3)
    assert (item_noise(a.items[0], (2, 3)) == item_noise(a.items[0], (2, 3))).all()
    assert not (item_noise(a.items[0], (2, 3)) == item_noise(a.items[1], (2, 3))).all()


def test_better_challenger_passes_and_worse_fails_with_reasons():
    better = {"fvd/domain": 9.0, "dynamic_degree": 0.6, "temporal_flickering": 0.951}
    d = decide(better, CHAMPION, GATES)
    assert d.promote and not d.first_version and all(c.passed for c in d.checks)

    worse = {"fvd/domain": 12.0, "dynamic_degree": 0.2, "temporal_flickering": 0.95}
    d = decide(worse, CHAMPION, GATES)
    assert not d.promote
    assert len(d.reasons) == 2, d.reasons
    assert any("fvd/domain" in r and "worse by 20.0%" in r for r in d.reasons)
    assert any("dynamic_degree" in r and "below the minimum" in r for r in d.reasons)

    within_tolerance = {**better, "fvd/domain": 10.9}
    assert decide(within_tolerance, CHAMPION, GATES).promote


def test_first_version_uses_absolute_bounds_only_and_missing_metrics_fail():
    first = {"fvd/domain": 50.0, "dynamic_degree": 0.4, "temporal_flickering": 0.1}
    d = decide(first, None, GATES)
    assert d.promote and d.first_version
    assert not decide({**first, "fvd/domain": 101.0}, None, GATES).promote
    d = decide({"fvd/domain": math.nan, "dynamic_degree": 0.4}, None, GATES)
    assert not d.promote
    assert any("not finite" in r for r in d.reasons) and any("temporal_flickering is missing" in r for r in d.reasons)
    with pytest.raises(ValueError, match="no promotion gates"):
        decide(first, None, [])


def test_relative_regression_signs():
    assert relative_regression(11.0, 10.0, "lower") == pytest.approx(0.1)
    assert relative_regression(9.0, 10.0, "lower") == pytest.approx(-0.1)
    assert relative_regression(0.45, 0.5, "higher") == pytest.approx(0.1)
    assert relative_regression(1.0, 0.0, "lower") == math.inf


def test_gate_config_validation():
    with pytest.raises(ValueError, match="checks nothing"):
        load_config("debug", ["promotion.gates=[{metric: x, better: lower}]"])
    with pytest.raises(ValueError, match="better"):
        load_config("debug", ["promotion.gates=[{metric: x, better: up, min: 0}]"])


def test_library_never_imports_ray_or_mlflow():
    root = Path(__file__).resolve().parents[2] / "w2svd"
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(root.parent)}: {n}" for n in names
                          if n.split(".")[0] in ("ray", "mlflow", "deepspeed")]
    assert not offenders, offenders
