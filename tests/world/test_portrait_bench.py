"""`w2svd bench portrait --fast`: the whole portrait-world path at smoke-test size.

On a fresh machine: the committed portrait world (no training of the VAE or the teacher), its
128 clips pre-encoded again by the ``preencode`` stage, one W2SVD distillation through the
distill job (Ray Train + DeepSpeed) with its tuning-set selection, the evaluation job on every
model and on real clips, the table, the bar charts and the strips; then the students' starting
point (the teacher's weights under the student sampler), exported and scored. Asserted: only what
must hold at this size (four prompts: the FVDs are noise around the floor).
"""

import json

import numpy as np
import pytest


@pytest.mark.timeout(1800)
def test_portrait_bench_fast(tmp_path, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    monkeypatch.setenv("W2SVD_CACHE_DIR", str(tmp_path / "cache"))
    path = Path(__file__).resolve().parents[2] / "bench" / "portrait.py"
    spec = importlib.util.spec_from_file_location("bench_portrait_test", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)

    out = tmp_path / "bench"
    assert bench.main(["--fast", "--out", str(out), "--threads", "1"]) == 0

    from w2svd import world as world_lib
    from w2svd.config import load_config

    world = json.loads((out / "world.json").read_text())
    # The committed parts, used as they are; the codec decodes what it encodes on unseen clips.
    assert Path(world["teacher"]["path"]).parent == world_lib.PREBUILT_DIR
    assert world["vae"]["test_psnr"] >= load_config("portrait-fast").world.vae_min_psnr
    assert len(list(Path(world["latents"]).glob("shards/*.parquet"))) > 0
    result = json.loads((out / "portrait.json").read_text())
    rows = {(r["method"], r["steps"], r["variant"]): r for r in result["rows"]}
    for key in ("method", "steps", "variant", "fvd_domain", "fvd_floor", "face_rate", "dynamic_degree", "seconds"):
        assert all(key in r for r in result["rows"]), key
    assert all(np.isfinite(r["fvd_domain"]) and 0 <= r["face_rate"] <= 1 for r in result["rows"])
    # The teacher draws faces at 28 steps (random weights draw none: test_world_committed.py).
    assert rows[("euler", 28, "")]["face_rate"] > 0
    assert ("w2svd", 4, "") in rows and rows[("w2svd", 4, "")]["iterations"] == result["settings"]["budget"]
    assert result["tuning"]["w2svd"]["chosen_lr"] in result["settings"]["lrs"]
    for png in ("samples.png", "bars-fvd_domain.png", "bars-face_rate.png", "strip-w2svd-4step.png"):
        assert (out / png).stat().st_size > 1000, png

    # Where the students start: the teacher's own weights, under the students' guidance-free sampler.
    assert bench.main(["--fast", "--out", str(out), "--study", "start", "--threads", "1"]) == 0
    start = json.loads((out / "start.json").read_text())
    assert [(r["method"], r["steps"], r["iterations"]) for r in start["rows"]] == [("start", 4, 0)]
    assert np.isfinite(start["rows"][0]["fvd_domain"]) and 0 <= start["rows"][0]["face_rate"] <= 1

    import torch

    from w2svd.export import load_generator
    from w2svd.models.hunyuan import build_backbone

    exported, sampler = load_generator(out / "start" / "start-4step")
    assert (sampler.steps, sampler.guidance_mode, sampler.method) == (4, "none", "w2svd")
    teacher = build_backbone(load_config("portrait-fast").model).transformer.state_dict()
    got = exported.transformer.state_dict()
    assert got.keys() == teacher.keys() and all(torch.equal(got[k], teacher[k]) for k in teacher)

    # The committed teacher on captions of its own clips and on new ones (bench teacher-captions).
    from bench import teacher_captions

    assert teacher_captions.main(["--teacher", world["teacher"]["path"], "--latents", world["latents"],
                                  "--config", "portrait-fast", "--prompts", "4", "--steps", "4",
                                  "--out", str(out / "captions.json"), "--threads", "1"]) == 0
    split = json.loads((out / "captions.json").read_text())
    assert split["seen"]["prompts"] == split["held_out"]["prompts"] == 4
    assert len(split["held_out"]["face_rate_per_prompt"]) == 4
    # The real side of both holds faces (rendered portraits; the VAE's round trip of training clips).
    assert split["seen"]["face_rate_real"] > 0.5 and split["held_out"]["face_rate_real"] > 0.5
    assert all(0 <= split[side]["face_rate"] <= 1 for side in ("seen", "held_out"))
    factors = split["held_out"]["factors"]
    assert set(factors) == {"samples", "real", "vae"}
    # Real clips agree with their own captions on the background (a plain colour the VAE keeps).
    assert factors["real"]["agreement"]["background"] == 1.0 and factors["vae"]["agreement"]["background"] == 1.0
