"""``w2svd bench data-passes``: shards read on every pass and shards read once into the object
store give the training side the same batches in the same order (resume depends on it)."""

import json

from w2svd.config import load_config
from w2svd.data.synthetic_latents import write_synthetic_latents


def test_materialized_shards_give_the_same_stream_as_shards_read_every_pass(ray_local, tmp_path):
    from bench import data_passes

    # Several shard files of two buckets: order across files and buckets is what could change.
    latents = write_synthetic_latents(str(tmp_path / "latents"), load_config("debug"), clips_per_bucket=6,
                                      rows_per_shard=4)
    out = tmp_path / "passes.json"
    assert data_passes.main(["--latents", latents, "--passes", "2", "--batch-size", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["same_batches"] is True
    for mode in ("read", "materialized"):
        assert report[mode]["batches_per_pass"] == 6 and len(report[mode]["pass_s"]) == 2
