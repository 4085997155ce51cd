"""Pre-encode end to end: real local Ray, a real S3 endpoint (moto's server) on 127.0.0.1, real
PyAV and the tiny diffusers VAE."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines import preencode, synth_data
from w2svd.config import load_config
from w2svd.data import shards, storage, synth
from w2svd.data.video import encode_png, encode_video

REPO = Path(__file__).resolve().parents[2]
# Small clips of several sizes, lengths and rates; bucket frames are 9 at 8 fps (debug config).
SYNTH_ARGS = ["--clips", "5", "--seed", "11", "--portrait-size", "54x96", "--landscape-size", "96x54",
              "--frames", "9,17", "--fps", "8,16", "--landscape-fraction", "0.4"]
FAST = ["data.shard_rows=2", "data.encode_batch_size=2"]


def _summary(uri):
    return json.loads(storage.read_bytes(storage.join(uri, shards.SUMMARY)))


def _rows(uri, columns=("clip_id", "source_uri", "bucket", "content_hash", "latent")):
    fs, _ = storage.filesystem(uri)
    out = []
    for f in storage.list_files(storage.join(uri, shards.SHARDS_DIR)):
        out += pq.read_table(storage.filesystem(f.uri)[1], filesystem=fs, columns=list(columns)).to_pylist()
    return out


@pytest.fixture(scope="module")
def local_clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    assert synth_data.main(["--out", str(root), *SYNTH_ARGS]) == 0
    return root


@pytest.fixture(scope="module")
def clean_local_run(ray_local, local_clips, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents-local")
    assert preencode.main(["--input", str(local_clips), "--output", str(out), *FAST]) == 0
    return out


def test_s3_bucket_to_shards_in_the_bucket(s3_server, ray_local, clean_local_run, capsys):
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="portraits")
    raw, out = "s3://portraits/raw", "s3://portraits/latents"
    assert synth_data.main(["--out", raw, *SYNTH_ARGS]) == 0
    assert preencode.main(["--input", raw, "--output", out, *FAST]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "completed"

    summary = _summary(out)
    assert (summary["total"], summary["encoded"], summary["quarantined"]) == (5, 5, 0)
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(
        Bucket="portraits", Prefix="latents/")["Contents"]]
    assert any(k.startswith("latents/shards/shard-") and k.endswith(".parquet") for k in keys)
    assert {"latents/_manifest.json", "latents/_summary.json"} <= set(keys)

    # The reader, against the bucket: shapes follow the VAE's compression for each bucket.
    from pipelines.reader import iter_latent_batches, read_latent_shards
    from w2svd.models.encoders import LatentEncoder

    cfg = load_config("debug")
    sizes = {b.name: b for b in cfg.data.buckets}
    encoder = LatentEncoder(cfg, text=False)
    seen = []
    for batch in iter_latent_batches(read_latent_shards(out), batch_size=2):
        b = sizes[batch.bucket]
        n = len(batch.clip_ids)
        assert batch.latents.shape == (n, 16, (b.frames - 1) // 4 + 1, b.height // 8, b.width // 8)
        assert batch.text.shape == (n, cfg.model.text_max_length, cfg.model.arch.text_embed_dim)
        assert batch.text_mask.shape == (n, cfg.model.text_max_length) and batch.text_mask[:, 0].all()
        assert batch.pooled.shape == (n, cfg.model.arch.pooled_projection_dim)
        assert batch.image.shape == (n, 16, 1, b.height // 8, b.width // 8)
        video = encoder.decode_latents(batch.latents[:1])
        assert video.shape == (1, 3, b.frames, b.height, b.width)
        seen += batch.clip_ids
    assert sorted(seen) == [f"clip-{i:05d}" for i in range(5)]
    portrait_only = read_latent_shards(out, buckets=["portrait"]).take_all()
    assert portrait_only and {r["bucket"] for r in portrait_only} == {"portrait"}

    # Local paths work the same as s3://: same clips, same hashes, same latents.
    s3_rows = {r["clip_id"]: r for r in _rows(out)}
    local_rows = {r["clip_id"]: r for r in _rows(str(clean_local_run))}
    assert s3_rows.keys() == local_rows.keys()
    for clip_id, row in s3_rows.items():
        assert row["content_hash"] == local_rows[clip_id]["content_hash"]
        assert row["bucket"] == local_rows[clip_id]["bucket"]
        a = np.frombuffer(row["latent"], np.float32)
        b = np.frombuffer(local_rows[clip_id]["latent"], np.float32)
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert _summary(str(clean_local_run))["by_reason"] == {}


def _clip(frames=9, width=48, height=64, fps=8.0, seed=0) -> bytes:
    f = synth.sample_factors(np.random.default_rng(seed), orientation="portrait", lengths=(frames,),
                             fps_choices=(fps,), portrait_sizes=((width, height),))
    return encode_video(synth.render_clip(f), fps)


def test_broken_inputs_are_quarantined_with_distinct_reasons(ray_local, tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    (raw / "clips").mkdir(parents=True)
    (raw / "refs").mkdir()
    good = _clip(frames=17, seed=1)
    rng = np.random.default_rng(0)
    files = {
        "good-a": good,
        "good-b": _clip(frames=9, width=64, height=48, seed=2),
        "zero": b"",
        "huge": good + rng.bytes(300_000),
        "notes": b"these are meeting notes, not a video\n" * 50,
        "damaged": good[:32] + rng.bytes(3000),
        "cut": good[: int(len(good) * 0.6)],
        "short": _clip(frames=5, seed=3),
        "tiny": _clip(width=24, height=32, seed=4),
        "badref": _clip(seed=5),
        "nocaption": _clip(seed=6),
    }
    captions = []
    for name, data in files.items():
        (raw / "clips" / f"{name}.mp4").write_bytes(data)
        if name != "nocaption":
            captions.append({"clip_id": name, "video": f"clips/{name}.mp4", "caption": f"a portrait called {name}"})
    captions.append({"clip_id": "ghost", "video": "clips/ghost.mp4", "caption": "listed but never uploaded"})
    (raw / "refs" / "good-a.png").write_bytes(encode_png(np.full((64, 48, 3), 200, np.uint8)))
    (raw / "refs" / "badref.png").write_bytes(b"not a png")
    captions[0]["reference"] = "refs/good-a.png"
    captions[9]["reference"] = "refs/badref.png"
    (raw / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))

    code = preencode.main(["--input", str(raw), "--output", str(out), "data.max_bytes=200000", *FAST])
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0, captured.err[-3000:]
    assert printed.strip().splitlines()[-1] == "completed with 10 quarantined inputs"

    expected = {"zero": "zero_bytes", "huge": "over_size_limit", "notes": "not_a_video", "damaged": "unreadable",
                "cut": "truncated", "short": "too_short", "tiny": "too_small", "badref": "bad_reference",
                "nocaption": "missing_caption", "ghost": "missing_file"}
    quarantine = [json.loads(x) for x in (out / shards.QUARANTINE_FILE).read_text().splitlines()]
    got = {Path(q["source_uri"]).stem: q["reason"] for q in quarantine}
    assert got == expected
    assert all(q["detail"] for q in quarantine)
    assert len(set(got.values())) == len(expected) >= 8

    summary = json.loads((out / shards.SUMMARY).read_text())
    assert summary["total"] == len(files) + 1 == summary["encoded"] + summary["quarantined"]
    assert summary["encoded"] == 2
    assert summary["by_reason"] == {r: 1 for r in expected.values()}
    assert sorted(r["clip_id"] for r in _rows(str(out))) == ["good-a", "good-b"]


def _preencode_subprocess(raw, out, *overrides):
    import ray

    # A separate driver process on the session's Ray: when it dies, Ray kills its tasks and
    # actors, as it would for a killed job on a cluster.
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "pipelines.preencode", "--input", str(raw), "--output", str(out),
           "data.shard_rows=1", "data.encode_batch_size=1", "data.decode_batch_size=1", *overrides]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_kill_and_rerun_resumes_without_duplicates(ray_local, local_clips, clean_local_run, tmp_path):
    out = tmp_path / "out"
    killed = _preencode_subprocess(local_clips, out, "debug.kill_preencode_after_shards=2")
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL: no cleanup ran
    partial = _rows(str(out))
    assert 2 <= len(partial) < 5, "the kill must land partway"
    assert not (out / shards.SUMMARY).exists()

    assert preencode.main(["--input", str(local_clips), "--output", str(out), "data.shard_rows=1",
                           "data.encode_batch_size=1"]) == 0
    rows = _rows(str(out))
    ids = [r["clip_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a clip was written twice"
    assert set(ids) == {r["clip_id"] for r in _rows(str(clean_local_run))}
    # Shards written before the kill were kept, not redone.
    assert {r["clip_id"] for r in partial} <= set(ids)
    summary = _summary(str(out))
    assert (summary["total"], summary["encoded"], summary["this_run"]["encoded"]) == (5, 5, 5 - len(partial))

    # A third run has nothing left to do and changes nothing.
    assert preencode.main(["--input", str(local_clips), "--output", str(out)]) == 0
    assert sorted(r["clip_id"] for r in _rows(str(out))) == sorted(ids)
    assert _summary(str(out))["this_run"]["encoded"] == 0


def test_a_failed_run_exits_nonzero(ray_local, tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "captions.jsonl").write_text("{not json\n")
    assert preencode.main(["--input", str(tmp_path / "raw"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "captions.jsonl line 1 is not JSON" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert preencode.main(["--input", "x", "--output", "y", "data.shard_rows=0"]) == 2


def test_latent_bytes_decode_to_the_bucket_video(clean_local_run):
    # Decoding stored latents with the tiny VAE gives a clip of the bucket's size.
    from pipelines.reader import collate_latent_batch
    from w2svd.models.encoders import LatentEncoder

    cfg = load_config("debug")
    table = pq.read_table(storage.list_files(storage.join(str(clean_local_run), shards.SHARDS_DIR))[0].uri)
    first = table.slice(0, 1)
    batch = collate_latent_batch(first)
    bucket = {b.name: b for b in cfg.data.buckets}[batch.bucket]
    video = LatentEncoder(cfg, text=False).decode_latents(batch.latents)
    assert video.shape == (1, 3, bucket.frames, bucket.height, bucket.width)
    assert torch.isfinite(video).all()
