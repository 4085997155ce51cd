"""`w2svd bench portrait --fast`: the whole portrait-world path at smoke-test size.

Opt-in (``W2SVD_BENCH_TESTS=1``): on a fresh 2-core machine it trains the world's VAE (1000
steps), pre-encodes 16 clips, fine-tunes the portrait-fast teacher and its check, then one W2SVD
distillation through the distill job with its tuning-set selection, the evaluation job on every
model and on real clips, the table, the bar charts and the strips: well over the default suite's
budget of a few minutes per feature. The default suite runs the VAE part for real
(``test_world_vae.py``). Asserted here: only what must hold at this size.
"""

import json
import os

import pytest


@pytest.mark.skipif(os.environ.get("W2SVD_BENCH_TESTS") != "1",
                    reason="the portrait world end to end takes well over the default budget; W2SVD_BENCH_TESTS=1")
@pytest.mark.timeout(3600)
def test_portrait_bench_fast(tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "portrait.py"
    spec = importlib.util.spec_from_file_location("bench_portrait_test", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)

    out = tmp_path / "bench"
    assert bench.main(["--fast", "--out", str(out), "--threads", "1"]) == 0

    from w2svd.config import load_config

    world = json.loads((out / "world.json").read_text())
    # The codec decodes what it encodes, on unseen clips, to the config's bound (the 28 dB
    # target is not reached yet: docs/benchmarks.md, "Portrait world").
    assert world["vae"]["test_psnr"] >= load_config("portrait-fast").world.vae_min_psnr
    result = json.loads((out / "portrait.json").read_text())
    rows = {(r["method"], r["steps"], r["variant"]): r for r in result["rows"]}
    for key in ("method", "steps", "variant", "fvd_domain", "fvd_floor", "face_rate", "dynamic_degree", "seconds"):
        assert all(key in r for r in result["rows"]), key
    # The teacher's 28 Euler steps beat its single step on domain FVD. Not yet true of the
    # portrait-fast world (3.43 vs 2.99 on 2026-12-06: docs/benchmarks.md, "Portrait world").
    assert rows[("euler", 28, "")]["fvd_domain"] < rows[("euler", 1, "")]["fvd_domain"]
    assert ("w2svd", 4, "") in rows and rows[("w2svd", 4, "")]["iterations"] == result["settings"]["budget"]
    assert result["tuning"]["w2svd"]["chosen_lr"] in result["settings"]["lrs"]
    for png in ("samples.png", "world-samples.png", "bars-fvd_domain.png", "bars-face_rate.png",
                "strip-w2svd-4step.png"):
        assert (out / png).stat().st_size > 1000, png
