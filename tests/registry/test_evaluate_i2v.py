"""Image-to-video through the evaluation job: every item's first real frame is the model's
reference image, and an image-to-video model gets the paper's "i2v" column (its clips against
that reference) while a text-to-video model in the same run does not."""

import numpy as np
import pytest

from pipelines.evaluate import evaluate_sources, teacher_source
from w2svd.config import load_config
from w2svd.evalset import build_evalset, reference_clips
from w2svd.metrics.scores import I2V_FIRST_KEY, I2V_KEY, clip_scores

I2V = ["model.family=hunyuan-i2v", "model.arch.in_channels=33", "model.arch.guidance_embeds=false",
       "model.arch.image_condition_type=latent_concat", "method.guidance=cfg", "model.teacher=null"]


def test_i2v_scores_a_clip_against_its_own_reference_above_another_items():
    cfg = load_config("debug", ["eval.num_prompts=2"]).eval
    clips = reference_clips(build_evalset(cfg)).numpy()
    own = clip_scores(clips[0], cfg.fps, reference=clips[0, 0])
    other = clip_scores(clips[0], cfg.fps, reference=clips[1, 0])
    assert own[I2V_FIRST_KEY] == pytest.approx(1.0)
    assert own[I2V_KEY] > other[I2V_KEY] and own[I2V_FIRST_KEY] > other[I2V_FIRST_KEY]
    assert I2V_KEY not in clip_scores(clips[0], cfg.fps)


@pytest.mark.timeout(600)
def test_evaluation_gives_i2v_models_their_reference_frames(ray_local, eval_cache):
    cfg = load_config("debug", ["eval.num_prompts=2"])
    reports = evaluate_sources({"i2v": teacher_source("debug", 2, "debug", I2V),
                                "t2v": teacher_source("debug", 2, "debug", ["model.teacher=null"])}, cfg)
    i2v, t2v = reports["i2v"], reports["t2v"]
    assert -1.0 <= i2v["metrics"][I2V_FIRST_KEY] <= 1.0 and 0.0 <= i2v["metrics"][I2V_KEY] <= 1.0
    assert all(np.isfinite(item[I2V_KEY]) for item in i2v["per_item"])
    assert i2v["backends"][I2V_KEY].startswith("offline-proxy")
    assert I2V_KEY not in t2v["metrics"] and I2V_KEY not in t2v["backends"]
