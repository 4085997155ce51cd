"""Data library without Ray: synthetic clips, video I/O and its failure labels, buckets, shard
bytes, encoders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from w2svd.config import load_config
from w2svd.data import shards, storage, synth
from w2svd.data.buckets import (
    Bucket,
    Rejected,
    choose_bucket,
    frame_stride,
    resize_and_crop,
    sample_frame_indices,
    to_model_input,
)
from w2svd.data.video import BadInput, decode_image, decode_video, encode_png, encode_video, probe_video

REQUIRED_FACTORS = {"num_frames", "fps", "width", "height", "orientation", "skin_tone", "hair_color", "background",
                    "face_shape", "talking", "blink_frames", "mouth_open", "head_x", "head_yaw", "face_box"}


def _factors(seed, **kw):
    return synth.sample_factors(np.random.default_rng(seed), **kw)


# --- synthetic clips ---------------------------------------------------------------------------


def test_factors_are_seeded_and_complete():
    a, b, c = _factors(3), _factors(3), _factors(4)
    assert a == b and a != c
    assert REQUIRED_FACTORS <= set(a)
    n = a["num_frames"]
    for key in ("mouth_open", "head_x", "head_yaw", "face_box"):
        assert len(a[key]) == n, key
    assert all(0.0 <= m <= 1.0 for m in a["mouth_open"])
    assert all(0 <= i < n for i in a["blink_frames"])
    json.dumps(a)  # stored beside the clip, so it must be plain JSON
    assert np.array_equal(synth.render_clip(a), synth.render_clip(b))


def test_orientations_lengths_and_rates_vary():
    many = [_factors(s) for s in range(40)]
    assert {f["orientation"] for f in many} == {"portrait", "landscape"}
    assert len({f["num_frames"] for f in many}) > 1 and len({f["fps"] for f in many}) > 1
    for f in many:
        portrait = f["orientation"] == "portrait"
        assert (f["height"] > f["width"]) == portrait
        assert synth.render_frame(f, 0).shape == (f["height"], f["width"], 3)


def test_caption_states_the_attributes():
    f = _factors(5)
    caption = synth.caption_for(f)
    for key in ("skin_tone", "hair_color", "background", "face_shape", "orientation"):
        assert f[key] in caption
    assert ("talking" in caption) == f["talking"]


def test_mouth_and_blinks_change_pixels_where_the_factors_say():
    f = _factors(1, orientation="portrait", lengths=(17,), portrait_sizes=((96, 160),))
    f["mouth_open"] = [0.0] * 17
    f["mouth_open"][5] = 1.0
    f["blink_frames"] = [9]
    f["head_x"] = [f["head_x"][0]] * 17
    f["head_yaw"] = [0.0] * 17
    frames = synth.render_clip(f).astype(np.float32)
    x, y, w, h = (int(v) for v in f["face_box"][0])
    mouth = (slice(y + int(h * 0.7), y + int(h * 0.9)), slice(x, x + w))
    eyes = (slice(y + int(h * 0.38), y + int(h * 0.5)), slice(x + int(w * 0.2), x + int(w * 0.8)))
    still = np.abs(frames[4] - frames[3])[mouth].mean()
    assert np.abs(frames[5] - frames[4])[mouth].mean() > 3 * still
    assert np.abs(frames[9] - frames[8])[eyes].mean() > 3 * np.abs(frames[8] - frames[7])[eyes].mean()


def test_haar_cascade_finds_the_rendered_faces():
    detector = synth.haar_face_detector()
    hits, total, centred = 0, 0, 0
    for seed in range(8):
        f = _factors(seed, portrait_sizes=((126, 224),), landscape_sizes=((224, 126),), lengths=(9,))
        assert f["face_width"] >= 48
        for i, frame in enumerate(synth.render_clip(f)):
            boxes = synth.detect_faces(frame, detector)
            total += 1
            hits += bool(boxes)
            fx, fy, fw, fh = f["face_box"][i]
            centre = np.array([fx + fw / 2, fy + fh / 2])
            centred += any(np.abs(np.array([bx + bw / 2, by + bh / 2]) - centre).max() < fw * 0.35
                           for bx, by, bw, bh in boxes)
    assert hits / total >= 0.75, f"faces found in {hits}/{total} frames"
    assert centred / total >= 0.7, "detections must sit on the face_box the factors record"


def test_write_dataset_layout_and_contract(tmp_path):
    from pipelines.synth_data import main

    assert main(["--out", str(tmp_path), "--clips", "3", "--seed", "7", "--frames", "9,13", "--fps", "8,12"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert [r["clip_id"] for r in lines] == ["clip-00000", "clip-00001", "clip-00002"]
    for r in lines:
        assert r["video"] == f"clips/{r['clip_id']}.mp4" and r["reference"] == f"refs/{r['clip_id']}.png"
        frames, info = decode_video((tmp_path / r["video"]).read_bytes())
        f = r["factors"]
        assert frames.shape == (f["num_frames"], f["height"], f["width"], 3)
        assert abs(info.fps - f["fps"]) < 1e-6
        # Lossy codec, but the picture is the rendered one.
        assert np.abs(frames.astype(float) - synth.render_clip(f)).mean() < 6
        assert decode_image((tmp_path / r["reference"]).read_bytes()).shape == (f["height"], f["width"], 3)
    again = synth.write_dataset(str(tmp_path / "again"), 3, seed=7, lengths=(9, 13), fps_choices=(8.0, 12.0))
    assert [r["factors"] for r in again] == [r["factors"] for r in lines]
    for r in lines:  # seeded means byte-identical files, so local and s3:// copies hash alike
        assert (tmp_path / "again" / r["video"]).read_bytes() == (tmp_path / r["video"]).read_bytes()


# --- video bytes and why they fail -------------------------------------------------------------


@pytest.fixture(scope="module")
def mp4() -> bytes:
    f = _factors(0, lengths=(25,), fps_choices=(8.0,), orientation="portrait", portrait_sizes=((48, 80),))
    return encode_video(synth.render_clip(f), 8.0)


def test_video_round_trip_and_frame_selection(mp4):
    info = probe_video(mp4)
    assert (info.width, info.height, info.num_frames, info.fps) == (48, 80, 25, 8.0)
    frames, _ = decode_video(mp4, [0, 4, 24])
    every, _ = decode_video(mp4)
    assert np.array_equal(frames, every[[0, 4, 24]])


def _broken(mp4: bytes) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {
        "zero_bytes": b"",
        "not_a_video": b"just some notes, not a video\n" * 40,
        "still image": encode_png(np.zeros((32, 32, 3), np.uint8)),
        "unreadable": mp4[:32] + rng.bytes(4000),
        "corrupt packets": mp4[: len(mp4) // 2] + rng.bytes(len(mp4) - len(mp4) // 2),
        "truncated": mp4[: int(len(mp4) * 0.6)],
    }


@pytest.mark.parametrize("case,reason", [
    ("zero_bytes", "zero_bytes"), ("not_a_video", "not_a_video"), ("still image", "not_a_video"),
    ("unreadable", "unreadable"), ("corrupt packets", "unreadable"), ("truncated", "truncated"),
])
def test_bad_bytes_get_an_honest_reason(mp4, case, reason):
    with pytest.raises(BadInput) as err:
        decode_video(_broken(mp4)[case], [0, 1, 2])
    assert err.value.reason == reason
    assert err.value.reason in shards.QUARANTINE_REASONS


# --- buckets --------------------------------------------------------------------------------


BUCKETS = [Bucket("portrait", 9, 64, 48), Bucket("landscape", 9, 48, 64), Bucket("portrait-long", 17, 64, 48)]


def test_bucket_follows_aspect_and_length():
    assert choose_bucket(128, 72, 9, BUCKETS, min_side=32).name == "portrait"
    assert choose_bucket(128, 72, 40, BUCKETS, min_side=32).name == "portrait-long"
    assert choose_bucket(72, 128, 40, BUCKETS, min_side=32).name == "landscape"
    with pytest.raises(Rejected, match="too_short"):
        choose_bucket(128, 72, 8, BUCKETS, min_side=32)
    with pytest.raises(Rejected, match="too_small"):
        choose_bucket(30, 60, 40, BUCKETS, min_side=32)


def test_frame_sampling_prefers_the_target_rate():
    assert frame_stride(24, 8) == 3 and frame_stride(8, 24) == 1
    assert sample_frame_indices(25, 9, 3) == list(range(0, 25, 3))
    assert sample_frame_indices(13, 9, 3) == list(range(2, 11))  # too short at stride 3 → stride 1, centred
    assert sample_frame_indices(8, 9, 1) is None


def test_resize_and_crop_keeps_the_centre():
    frames = np.zeros((2, 128, 72, 3), np.uint8)
    frames[:, 60:68, 32:40] = 255
    out = resize_and_crop(frames, 64, 48)
    assert out.shape == (2, 64, 48, 3)
    ys, xs = np.nonzero(out[0, :, :, 0] > 128)
    assert abs(ys.mean() - 31.5) < 2 and abs(xs.mean() - 23.5) < 2
    x = to_model_input(out)
    assert x.shape == (3, 2, 64, 48) and x.min() >= -1 and x.max() <= 1


# --- shard bytes ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensor_bytes_round_trip(dtype):
    t = torch.randn(16, 3, 4, 5).to(dtype)
    data, shape, name = shards.tensor_to_bytes(t)
    assert torch.equal(shards.tensor_from_bytes(data, shape, name), t)


def _row(clip_id, bucket, latent, text, pooled, mask):
    row = {"clip_id": clip_id, "bucket": bucket}
    row["latent"], row["latent_shape"], row["latent_dtype"] = shards.tensor_to_bytes(latent)
    row["text"], row["text_shape"], _ = shards.tensor_to_bytes(text)
    row["pooled"], row["pooled_shape"], _ = shards.tensor_to_bytes(pooled)
    row["text_mask"] = shards.tensor_to_bytes(mask)[0]
    row["image_latent"] = row["image_latent_shape"] = None
    return row


def test_collate_stacks_one_bucket_and_refuses_two():
    import pyarrow as pa

    lat, txt, pooled = torch.randn(3, 16, 3, 8, 6), torch.randn(3, 5, 32), torch.randn(3, 16)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).bool()
    rows = [_row(f"c{i}", "portrait", lat[i], txt[i], pooled[i], mask[i]) for i in range(3)]
    for batch in (pa.Table.from_pylist(rows), {k: [r[k] for r in rows] for k in rows[0]}):
        out = shards.collate_latent_batch(batch)
        assert out.clip_ids == ["c0", "c1", "c2"] and out.image is None
        assert torch.equal(out.latents, lat) and torch.equal(out.text, txt) and torch.equal(out.text_mask, mask)
        assert torch.equal(out.pooled, pooled)
    rows[1]["bucket"] = "landscape"
    with pytest.raises(ValueError, match="one bucket"):
        shards.collate_latent_batch(pa.Table.from_pylist(rows))


def test_local_storage_round_trip(tmp_path):
    root = str(tmp_path / "store")
    storage.write_bytes(storage.join(root, "a/b.bin"), b"xyz")
    storage.write_bytes(storage.join(root, "c.bin"), b"")
    assert storage.read_bytes(storage.join(root, "a/b.bin")) == b"xyz"
    assert [(storage.relative(e.uri, root), e.size) for e in storage.list_files(root)] == [("a/b.bin", 3), ("c.bin", 0)]
    assert storage.list_files(storage.join(root, "absent")) == []
    with pytest.raises(ValueError, match="unsupported storage URI"):
        storage.filesystem("gs://bucket/x")


# --- encoders --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder():
    from w2svd.models.encoders import LatentEncoder

    return LatentEncoder(load_config("debug"))


def test_text_encoders_give_the_transformer_dims(encoder):
    cfg = load_config("debug")
    text, mask, pooled = encoder.encode_text(["a short one", "a much longer caption " * 4])
    assert text.shape == (2, cfg.model.text_max_length, cfg.model.arch.text_embed_dim)
    assert pooled.shape == (2, cfg.model.arch.pooled_projection_dim)
    assert mask.dtype == torch.bool and mask[0].sum() < mask[1].sum() == cfg.model.text_max_length
    # Different captions, different conditions; a rebuilt encoder (another actor) agrees exactly.
    assert not torch.allclose(pooled[0], pooled[1])
    from w2svd.models.encoders import TextEncoders

    text2, _, pooled2 = TextEncoders(cfg).encode(["a short one", "a much longer caption " * 4])
    assert torch.equal(text, text2) and torch.equal(pooled, pooled2)


def test_vae_latent_shapes_and_decode(encoder):
    frames = torch.rand(2, 3, 9, 64, 48) * 2 - 1
    latents = encoder.encode_video(frames)
    assert latents.shape == (2, 16, 3, 8, 6) == (2, *encoder.latent_shape(9, 64, 48))
    assert torch.equal(latents, encoder.encode_video(frames))  # posterior mode: reruns agree
    assert encoder.decode_latents(latents[:1]).shape == frames[:1].shape
    with pytest.raises(ValueError, match="4k\\+1"):
        encoder.encode_video(torch.zeros(1, 3, 8, 64, 48))


def test_mismatched_text_dims_are_refused():
    from w2svd.models.encoders import TextEncoders

    cfg = load_config("debug")
    cfg.model.text_encoder = "/nonexistent/llama"
    with pytest.raises(ValueError, match="text_encoder_2"):
        TextEncoders(cfg)
