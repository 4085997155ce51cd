"""`w2svd bench portrait --fast`: the whole portrait-world path at smoke-test size.

The world of ``portrait-fast`` (the VAE trained on synthetic portraits, the teacher fine-tuned by
the finetune job, its shards) is prebuilt in ``w2svd/worlds/`` under the key of its settings,
because training them takes minutes on 2 cores; when the settings change, the benchmark
rebuilds them (slower, still correct). What runs here: one W2SVD distillation through the
distill job with its tuning-set selection, the evaluation job on every model and on real
clips, the table, the bar charts and the strips. Asserted: only what must hold at this size.
"""

import json

import pytest


@pytest.mark.timeout(1200)
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

    world = json.loads((out / "world.json").read_text())
    assert world["vae"]["test_psnr"] >= 28.0  # the codec decodes what it encodes, on unseen clips
    result = json.loads((out / "portrait.json").read_text())
    rows = {(r["method"], r["steps"], r["variant"]): r for r in result["rows"]}
    for key in ("method", "steps", "variant", "fvd_domain", "fvd_floor", "face_rate", "dynamic_degree", "seconds"):
        assert all(key in r for r in result["rows"]), key
    # The teacher's 28 Euler steps beat its single step on domain FVD.
    assert rows[("euler", 28, "")]["fvd_domain"] < rows[("euler", 1, "")]["fvd_domain"]
    assert ("w2svd", 4, "") in rows and rows[("w2svd", 4, "")]["iterations"] == result["settings"]["budget"]
    assert result["tuning"]["w2svd"]["chosen_lr"] in result["settings"]["lrs"]
    for png in ("samples.png", "world-samples.png", "bars-fvd_domain.png", "bars-face_rate.png",
                "strip-w2svd-4step.png"):
        assert (out / png).stat().st_size > 1000, png
