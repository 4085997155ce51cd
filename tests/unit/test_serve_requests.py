"""Request checking of the Serve API and batch generation, the job store and the metrics text."""

import base64
import json
import time

import cv2
import numpy as np
import pytest

from pipelines.serve_jobs import COMPLETED, QUEUED, JobStore, Metrics
from pipelines.serve_requests import (
    Limits,
    ModelLimits,
    RequestError,
    group_by_shape,
    parse_json_body,
    parse_video_request,
    refit,
)

T2V = ModelLimits(steps=(4,), sizes=((9, 64, 48), (9, 48, 64)), image_to_video=False)
I2V = ModelLimits(steps=(4,), sizes=((9, 64, 48),), image_to_video=True)
LIMITS = Limits(max_prompt_chars=50, max_image_bytes=20_000, max_image_side=256)


def png_b64(h=32, w=24) -> str:
    ok, data = cv2.imencode(".png", np.full((h, w, 3), 120, np.uint8))
    return base64.b64encode(data.tobytes()).decode()


def error_of(body, model=T2V) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_video_request(body, model, LIMITS)
    return info.value


def test_defaults_fill_from_the_first_size_that_fits():
    r = parse_video_request({"prompt": "a face", "seed": 3}, T2V, LIMITS)
    assert (r.steps, r.frames, r.height, r.width, r.seed) == (4, 9, 64, 48, 3)
    r = parse_video_request({"prompt": "a face", "height": 48}, T2V, LIMITS)
    assert (r.height, r.width) == (48, 64) and r.seed == 0
    assert r.given == {"prompt": "a face", "height": 48, "seed": 0}


@pytest.mark.parametrize("body, status, field", [
    ({}, 422, "prompt"),
    ({"prompt": 5}, 422, "prompt"),
    ({"prompt": "  "}, 422, "prompt"),
    ({"prompt": "x" * 51}, 422, "prompt"),
    ({"prompt": "x", "fps": 3}, 422, "fps"),
    ({"prompt": "x", "steps": 3}, 422, "steps"),
    ({"prompt": "x", "steps": True}, 422, "steps"),
    ({"prompt": "x", "seed": -1}, 422, "seed"),
    ({"prompt": "x", "seed": 2.5}, 422, "seed"),
    ({"prompt": "x", "seed": 2**64}, 422, "seed"),
    ({"prompt": "x", "frames": 13}, 422, "frames"),
    ({"prompt": "x", "height": 50}, 422, "height"),
    ({"prompt": "x", "height": 64, "width": 64}, 422, "width"),
    ({"prompt": "x", "image": png_b64()}, 422, "image"),  # an image for a text-to-video model
    ({"prompt": "x", "image": "%%%"}, 422, "image"),
    ({"prompt": "x", "image": base64.b64encode(b"not a picture").decode()}, 422, "image"),
    ({"prompt": "x", "image": "A" * 40_000}, 413, "image"),
])
def test_every_bad_field_is_a_4xx_naming_it(body, status, field):
    err = error_of(body)
    assert (err.status, err.field) == (status, field), err.message
    assert err.to_json()["error"]["field"] == field


def test_image_to_video_needs_a_decodable_small_image():
    assert error_of({"prompt": "x"}, I2V).field == "image"
    r = parse_video_request({"prompt": "x", "image": "data:image/png;base64," + png_b64()}, I2V, LIMITS)
    assert r.image.shape == (32, 24, 3)
    err = error_of({"prompt": "x", "image": png_b64(300, 20)}, I2V)
    assert (err.status, err.field) == (413, "image")


@pytest.mark.parametrize("raw, ctype, status", [
    (b'{"prompt": "x"}', "text/plain", 415),
    (b'{"prompt": "x"}', None, 415),
    (b"{nope", "application/json", 400),
    (b"\xff\xfe", "application/json", 400),
    (b"[1, 2]", "application/json", 422),
    (b"x" * 101, "application/json", 413),
])
def test_body_errors(raw, ctype, status):
    with pytest.raises(RequestError) as info:
        parse_json_body(raw, ctype, max_body_bytes=100)
    assert info.value.status == status and info.value.field == "body"
    assert parse_json_body(b'{"a": 1}', "application/json; charset=utf-8", 100) == {"a": 1}


def test_batches_never_mix_sizes_or_steps():
    rs = [parse_video_request({"prompt": "x", "height": h, "seed": i}, T2V, LIMITS)
          for i, h in enumerate([64, 48, 64, 48, 64])]
    assert group_by_shape(rs) == [[0, 2, 4], [1, 3]]


def test_refit_keeps_what_was_given_and_redefaults_the_rest():
    r = parse_video_request({"prompt": "x"}, T2V, LIMITS, default_seed=lambda: 77)
    moved = ModelLimits(steps=(8,), sizes=((17, 64, 48),), image_to_video=False)
    again = refit(r, moved)
    assert (again.steps, again.frames, again.seed) == (8, 17, 77)
    explicit = parse_video_request({"prompt": "x", "steps": 4}, T2V, LIMITS)
    with pytest.raises(RequestError, match="steps"):
        refit(explicit, moved)


def test_job_store_keeps_finished_jobs_in_a_folder(tmp_path):
    store = JobStore(str(tmp_path / "results"), max_in_memory=1)
    first = store.create({"prompt": "a"}, timeout_s=60)
    assert store.pending() == 1 and store.get(first.id).status == QUEUED
    first.status = COMPLETED
    store.finish(first, b"mp4-1")
    store.save(first, b"mp4-1")
    second = store.create({"prompt": "b"}, timeout_s=60)
    second.status = COMPLETED
    store.finish(second, b"mp4-2")
    store.save(second, b"mp4-2")
    # The first fell out of memory (max_in_memory=1) and comes back from the folder.
    assert first.id not in store._jobs
    assert store.get(first.id).status == COMPLETED and store.video(first.id) == b"mp4-1"
    # A fresh store (a restarted replica) answers for both; a job that never finished and is
    # past its deadline is reported failed, not running forever.
    orphan = store.create({"prompt": "c"}, timeout_s=0.01)
    store.save(orphan)
    time.sleep(0.05)
    fresh = JobStore(str(tmp_path / "results"))
    assert fresh.video(second.id) == b"mp4-2"
    assert fresh.get(orphan.id).status == "failed"
    assert fresh.get("../../etc/passwd") is None and fresh.get("video_" + "0" * 32) is None


def test_metrics_render_prometheus_text():
    m = Metrics()
    m.inc("w2svd_http_requests_total", "requests", route="/v1/videos", status=202)
    m.inc("w2svd_http_requests_total", "requests", route="/v1/videos", status=202)
    m.observe("w2svd_batch_size", "batch", 3, buckets=(1, 2, 4))
    m.set("w2svd_model_info", "info", 1, only=True, name="g", version="1")
    m.set("w2svd_model_info", "info", 1, only=True, name="g", version="2")
    text = m.render()
    assert 'w2svd_http_requests_total{route="/v1/videos",status="202"} 2' in text
    assert 'w2svd_batch_size_bucket{le="2"} 0' in text and 'w2svd_batch_size_bucket{le="4"} 1' in text
    assert "w2svd_batch_size_count 1" in text and "# TYPE w2svd_batch_size histogram" in text
    assert 'version="2"' in text and 'version="1"' not in text
    json.dumps(text)
