"""The encoder stage keeps every encoded column whatever the order of rows in its batch."""

import numpy as np
import pyarrow as pa

from pipelines.preencode import EncodeClips
from w2svd.config import load_config, to_dict
from w2svd.data import storage


def _row(status: str, clip: str) -> dict:
    frames = np.random.default_rng(0).integers(0, 255, (9, 64, 48, 3), dtype=np.uint8)
    ok = status == "ok"
    return {
        "source_uri": f"/raw/{clip}.mp4", "clip_id": clip, "caption": "a person talking", "status": status,
        "reason": None if ok else "not_a_video", "detail": None if ok else "bad header",
        "bucket": "portrait" if ok else None, "frames": 9 if ok else None, "height": 64 if ok else None,
        "width": 48 if ok else None, "pixels": frames.tobytes() if ok else None,
        "pixels_shape": list(frames.shape) if ok else None,
        "reference_pixels": frames[0].tobytes() if ok else None, "content_hash": "h" if ok else None,
        "decode_s": 0.0,
    }


def test_a_batch_starting_with_a_quarantined_row_keeps_the_encoded_columns():
    encode = EncodeClips(to_dict(load_config("debug")), storage.StorageOptions.from_env())
    for order in (["bad", "ok"], ["ok", "bad"]):
        rows = [_row("ok" if name == "ok" else "quarantined", name) for name in order]
        out = encode(pa.Table.from_pylist(rows)).to_pylist()
        good = next(r for r in out if r["status"] == "ok")
        assert good["latent"] is not None and good["vae_id"] and good["text_encoder_id"], order
        assert good["latent_shape"] == [16, 3, 8, 6]
        bad = next(r for r in out if r["status"] != "ok")
        assert bad["latent"] is None and bad["reason"] == "not_a_video"
