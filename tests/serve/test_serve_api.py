"""The Serve application on 127.0.0.1, built by ``pipelines.serve:build_app`` (what ``serve run``
and a RayService call) with the tiny generator from a real MLflow registry, auth on, job results
in a real S3-compatible server. One application for the whole module; the tests run in order and
the last one moves the champion alias.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import json

import cv2
import numpy as np
import pytest
import requests
from serve_helpers import free_port, wait_for

from w2svd.data.video import decode_video

TOKEN = "s3cret-test-token"
TIMEOUT = 120  # every client request's timeout: none may hang
OVERRIDES = [
    "serve.max_batch_size=4", "serve.batch_wait_timeout_s=0.5", "serve.max_ongoing_requests=4",
    "serve.max_queued_requests=4", "serve.max_pending_jobs=64", "serve.max_body_bytes=1000000",
    "serve.max_image_bytes=100000", "serve.request_timeout_s=90", "serve.alias_poll_s=1",
    "serve.results_uri=s3://w2svd-serve-results/api", "serve.codec=libx264",
]


@pytest.fixture(scope="module")
def service(registry, s3_server, ray_local, tmp_path_factory):
    import boto3
    from ray import serve

    from pipelines.serve import build_app

    boto3.client("s3").create_bucket(Bucket="w2svd-serve-results")
    token_file = tmp_path_factory.mktemp("secrets") / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 100})
    overrides = " ".join([*OVERRIDES, f"serve.auth_token_file={token_file}"])
    app = build_app({"model": f"models:/{registry['name']}@champion", "config": "debug",
                     "tracking_uri": registry["uri"], "overrides": overrides})
    serve.run(app, name="w2svd", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: requests.get(f"{url}/healthz", timeout=TIMEOUT).status_code == 200, 120, "/healthz")
    try:
        yield {"url": url, **registry}
    finally:
        serve.shutdown()


def auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def sync(service, body: dict, **kw) -> requests.Response:
    return requests.post(f"{service['url']}/v1/videos/sync", json=body, headers=auth(), timeout=TIMEOUT, **kw)


def job_of(service, video_id: str) -> dict:
    r = requests.get(f"{service['url']}/v1/videos/{video_id}", headers=auth(), timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


def frames_of(data: bytes) -> np.ndarray:
    return decode_video(data)[0].astype(np.float32)


def test_models_lists_version_alias_steps_and_sizes(service):
    r = requests.get(f"{service['url']}/v1/models", headers=auth(), timeout=TIMEOUT)
    assert r.status_code == 200
    (card,) = r.json()["data"]
    assert card["name"] == service["name"] and card["version"] == service["v1"] and card["alias"] == "champion"
    assert card["steps"] == [4] and card["sampler"]["steps"] == 4
    assert {"frames": 9, "height": 64, "width": 48} in card["sizes"] and card["image_to_video"] is False


def test_a_job_gives_a_decodable_mp4_of_the_requested_size(service):
    url = service["url"]
    r = requests.post(f"{url}/v1/videos", json={"prompt": "a person talking", "seed": 5, "height": 48, "width": 64},
                      headers=auth(), timeout=TIMEOUT)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] in ("queued", "in_progress") and r.headers["location"] == f"/v1/videos/{job['id']}"
    done = wait_for(lambda: (j := job_of(service, job["id"]))["status"] in ("completed", "failed") and j, 90, "job")
    assert done["status"] == "completed", done
    assert done["model_version"] == service["v1"] and done["steps"] == 4
    assert {"encode_s", "transformer_s", "decode_s", "mp4_s"} <= set(done["timings"])
    content = requests.get(f"{url}{done['content_url']}", headers=auth(), timeout=TIMEOUT)
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    assert frames_of(content.content).shape == (9, 48, 64, 3)


def test_the_same_seed_gives_the_same_video_alone_or_in_a_batch(service):
    body = {"prompt": "a woman with long hair", "seed": 11}
    alone = sync(service, body)
    assert alone.status_code == 200, alone.text
    assert job_of(service, alone.headers["x-video-id"])["batch_size"] == 1
    for _ in range(3):  # the four must arrive within one batch window; retry on a very slow machine
        with cf.ThreadPoolExecutor(4) as pool:
            batch = list(pool.map(lambda s: sync(service, {**body, "seed": s}), [11, 12, 13, 14]))
        assert [b.status_code for b in batch] == [200] * 4
        if job_of(service, batch[0].headers["x-video-id"])["batch_size"] > 1:
            break
    else:
        pytest.fail("four concurrent requests never shared a batch")
    same = np.abs(frames_of(alone.content) - frames_of(batch[0].content)).mean()
    other = np.abs(frames_of(alone.content) - frames_of(batch[1].content)).mean()
    assert same < 1.0 and other > 5 * max(same, 0.5), (same, other)


def _png_b64(side: int = 32) -> str:
    return base64.b64encode(cv2.imencode(".png", np.full((side, side, 3), 90, np.uint8))[1].tobytes()).decode()


J = {"Content-Type": "application/json"}
# (name, method, path, headers, body bytes, expected status, field named in the error or None)
MALFORMED = [
    ("not json", "POST", "/v1/videos", J, b"{prompt: x", 400, "body"),
    ("bad utf-8", "POST", "/v1/videos", J, b'{"prompt": "\xff"}', 400, "body"),
    ("text content type", "POST", "/v1/videos", {"Content-Type": "text/plain"}, b'{"prompt": "x"}', 415, "body"),
    ("no content type", "POST", "/v1/videos/sync", {}, b'{"prompt": "x"}', 415, "body"),
    ("huge body", "POST", "/v1/videos", J, json.dumps({"prompt": "x" * 1_500_000}).encode(), 413, "body"),
    ("array body", "POST", "/v1/videos", J, b'["a person"]', 422, "body"),
    ("string body", "POST", "/v1/videos/sync", J, b'"a person"', 422, "body"),
    ("missing prompt", "POST", "/v1/videos", J, b"{}", 422, "prompt"),
    ("null prompt", "POST", "/v1/videos", J, b'{"prompt": null}', 422, "prompt"),
    ("number prompt", "POST", "/v1/videos", J, b'{"prompt": 42}', 422, "prompt"),
    ("object prompt", "POST", "/v1/videos", J, b'{"prompt": {"text": "x"}}', 422, "prompt"),
    ("empty prompt", "POST", "/v1/videos/sync", J, b'{"prompt": ""}', 422, "prompt"),
    ("blank prompt", "POST", "/v1/videos", J, b'{"prompt": "   "}', 422, "prompt"),
    ("long prompt", "POST", "/v1/videos", J, json.dumps({"prompt": "x" * 2001}).encode(), 422, "prompt"),
    ("unknown field", "POST", "/v1/videos", J, b'{"prompt": "x", "colour": "red"}', 422, "colour"),
    ("unsupported steps", "POST", "/v1/videos", J, b'{"prompt": "x", "steps": 3}', 422, "steps"),
    ("string steps", "POST", "/v1/videos", J, b'{"prompt": "x", "steps": "4"}', 422, "steps"),
    ("float steps", "POST", "/v1/videos", J, b'{"prompt": "x", "steps": 4.0}', 422, "steps"),
    ("bool steps", "POST", "/v1/videos", J, b'{"prompt": "x", "steps": true}', 422, "steps"),
    ("negative seed", "POST", "/v1/videos", J, b'{"prompt": "x", "seed": -1}', 422, "seed"),
    ("fractional seed", "POST", "/v1/videos/sync", J, b'{"prompt": "x", "seed": 1.5}', 422, "seed"),
    ("string seed", "POST", "/v1/videos", J, b'{"prompt": "x", "seed": "7"}', 422, "seed"),
    ("huge seed", "POST", "/v1/videos", J, b'{"prompt": "x", "seed": 18446744073709551616}', 422, "seed"),
    ("unsupported frames", "POST", "/v1/videos", J, b'{"prompt": "x", "frames": 8}', 422, "frames"),
    ("zero frames", "POST", "/v1/videos", J, b'{"prompt": "x", "frames": 0}', 422, "frames"),
    ("unsupported height", "POST", "/v1/videos", J, b'{"prompt": "x", "height": 60}', 422, "height"),
    ("unsupported width", "POST", "/v1/videos", J, b'{"prompt": "x", "width": 1000}', 422, "width"),
    ("size not a bucket", "POST", "/v1/videos", J, b'{"prompt": "x", "height": 64, "width": 64}', 422, "width"),
    ("image on t2v", "POST", "/v1/videos", J, json.dumps({"prompt": "x", "image": _png_b64()}).encode(), 422, "image"),
    ("image not base64", "POST", "/v1/videos", J, b'{"prompt": "x", "image": "%%%"}', 422, "image"),
    ("image undecodable", "POST", "/v1/videos", J,
     json.dumps({"prompt": "x", "image": base64.b64encode(b"GIF-ish junk").decode()}).encode(), 422, "image"),
    ("image oversized", "POST", "/v1/videos", J,
     json.dumps({"prompt": "x", "image": base64.b64encode(b"\0" * 200_000).decode()}).encode(), 413, "image"),
    ("image a number", "POST", "/v1/videos", J, b'{"prompt": "x", "image": 7}', 422, "image"),
    ("unknown job", "GET", "/v1/videos/video_" + "0" * 32, {}, b"", 404, "id"),
    ("malformed job id", "GET", "/v1/videos/not-a-job", {}, b"", 404, "id"),
    ("path in job id", "GET", "/v1/videos/..%2F..%2Fetc%2Fpasswd", {}, b"", 404, None),
    ("content of unknown job", "GET", "/v1/videos/video_" + "1" * 32 + "/content", {}, b"", 404, "id"),
    ("wrong method", "DELETE", "/v1/videos", {}, b"", 405, None),
    ("unknown route", "GET", "/v2/videos", {}, b"", 404, None),
]


def test_malformed_requests_are_4xx_naming_the_field_and_the_service_still_answers(service):
    assert len(MALFORMED) >= 25
    failures = []
    for name, method, path, headers, body, status, field in MALFORMED:
        r = requests.request(method, service["url"] + path, data=body, headers={**headers, **auth()},
                             timeout=TIMEOUT)
        got_field = r.json().get("error", {}).get("field") if r.headers.get("content-type") == "application/json" else None
        if r.status_code != status or (field and got_field != field):
            failures.append(f"{name}: {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)
    metrics = requests.get(f"{service['url']}/metrics", headers=auth(), timeout=TIMEOUT).text
    assert not [line for line in metrics.splitlines() if 'status="5' in line], metrics
    assert sync(service, {"prompt": "still here", "seed": 1}).status_code == 200


def test_bearer_token_is_required_except_for_healthz(service):
    url = service["url"]
    assert requests.get(f"{url}/v1/models", timeout=TIMEOUT).status_code == 401
    assert requests.get(f"{url}/v1/models", headers=auth("wrong"), timeout=TIMEOUT).status_code == 401
    assert requests.get(f"{url}/v1/models", headers={"Authorization": f"Basic {TOKEN}"},
                        timeout=TIMEOUT).status_code == 401
    r = requests.post(f"{url}/v1/videos", json={"prompt": "x"}, timeout=TIMEOUT)
    assert r.status_code == 401 and r.json()["error"]["field"] == "authorization"
    assert requests.get(f"{url}/metrics", timeout=TIMEOUT).status_code == 401
    assert requests.get(f"{url}/healthz", timeout=TIMEOUT).status_code == 200
    assert requests.get(f"{url}/v1/models", headers=auth(), timeout=TIMEOUT).status_code == 200


def test_load_beyond_capacity_ends_every_request_in_200_or_503(service):
    """4 in a replica + 4 queued is the capacity; 40 at once must each end, none lost."""
    n = 40

    def one(i: int):
        try:
            r = sync(service, {"prompt": f"crowd {i}", "seed": i})
            return r.status_code, r.headers.get("retry-after")
        except requests.RequestException as err:  # a hang would end here, as a timeout
            return repr(err), None

    with cf.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    statuses = [s for s, _ in results]
    assert len(results) == n and set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    assert all(retry and int(retry) > 0 for s, retry in results if s == 503)
    # Jobs (the async form) beyond the generators' capacity wait instead of failing: all finish.
    with cf.ThreadPoolExecutor(12) as pool:
        posted = list(pool.map(lambda i: requests.post(f"{service['url']}/v1/videos", json={"prompt": f"q {i}"},
                                                       headers=auth(), timeout=TIMEOUT), range(12)))
    assert [p.status_code for p in posted] == [202] * 12
    ids = [p.json()["id"] for p in posted]
    wait_for(lambda: all(job_of(service, i)["status"] == "completed" for i in ids), 120, "12 jobs")


def test_a_finished_job_survives_an_ingress_replica_restart(service, ray_local):
    import ray

    r = sync(service, {"prompt": "keep me", "seed": 2})
    assert r.status_code == 200
    video_id = r.headers["x-video-id"]
    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
               if "VideoAPI" in a["name"] and a["name"].startswith("SERVE_REPLICA")]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)

    def served_by_a_new_replica():
        try:
            got = requests.get(f"{service['url']}/v1/videos/{video_id}/content", headers=auth(), timeout=10)
        except requests.RequestException:
            return None
        return got if got.status_code == 200 else None

    got = wait_for(served_by_a_new_replica, 120, "a restarted ingress replica", every=0.5)
    assert got.content == r.content
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "VideoAPI" in a["name"]]
    assert name not in names


def test_a_moved_champion_is_served_without_a_failed_request(service, capsys):
    import threading

    from pipelines.registry import register_export

    client, model = service["client"], service["name"]
    stop, seen = threading.Event(), []

    def traffic():
        i = 0
        while not stop.is_set():
            try:
                r = sync(service, {"prompt": "through the switch", "seed": i})
                seen.append((r.status_code, r.headers.get("x-model-version"), r.text[:200] if r.status_code != 200 else ""))
            except requests.RequestException as err:
                seen.append((repr(err), None, ""))
            i += 1

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        # v2: the same weights with another sampler (8 Euler steps), so the change is visible.
        v2 = register_export(service["exports"]["better"], name=model, tracking_uri=service["uri"]).version
        client.set_registered_model_alias(model, "champion", v2)

        def served_version():
            r = requests.get(f"{service['url']}/v1/models", headers=auth(), timeout=TIMEOUT)
            return r.json()["data"][0]["version"] == v2 and r.json()["data"][0]
        card = wait_for(served_version, 120, "/v1/models to show the new champion", every=0.5)
        assert card["steps"] == [8]
        wait_for(lambda: any(v == v2 for _, v, _ in seen), 60, "a request served by the new version")
    finally:
        stop.set()
        thread.join(timeout=TIMEOUT)
    assert seen and all(s == 200 for s, _, _ in seen), [x for x in seen if x[0] != 200]
    assert {v for _, v, _ in seen} == {service["v1"], v2}
