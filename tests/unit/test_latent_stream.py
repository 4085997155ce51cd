"""The training stream resumes at any data position by counting whole passes, not reading them.

The shard is real parquet in the pre-encode layout, read by the real batcher; only Ray's
``DataIterator`` is stood in for by a pyarrow reader that counts the passes made over it.
"""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines.latent_stream import LatentStream
from w2svd.config import load_config
from w2svd.data.synthetic_latents import write_synthetic_latents


class CountingShard:
    def __init__(self, folder: Path):
        self.table = pa.concat_tables([pq.read_table(f) for f in sorted(folder.rglob("*.parquet"))])
        self.passes = 0

    def iter_batches(self, *, batch_size, batch_format, prefetch_batches, local_shuffle_buffer_size):
        assert batch_format == "pyarrow"
        self.passes += 1
        for start in range(0, self.table.num_rows, batch_size):
            yield self.table.slice(start, batch_size)


def _ids(batches) -> list[float]:
    return [round(float(b.x.sum()), 3) for b in batches]


def test_a_resume_far_into_the_run_reads_at_most_two_passes_and_continues_the_same_stream(tmp_path):
    write_synthetic_latents(str(tmp_path), load_config("debug"), clips_per_bucket=6, rows_per_shard=4)
    world, batch, position = 2, 2, 53  # 6 batches per pass (2 buckets x 3): the stream wraps many times
    for rank in range(world):
        reference = LatentStream(CountingShard(tmp_path), batch, rank, world, torch.device("cpu"))
        expected = _ids(next(reference) for _ in range(position + 8))[position:]
        shard = CountingShard(tmp_path)
        resumed = LatentStream(shard, batch, rank, world, torch.device("cpu"), position=position)
        first = next(resumed)
        assert shard.passes <= 2  # one pass to learn its length, then straight to the position
        assert _ids([first] + [next(resumed) for _ in range(7)]) == expected
        assert resumed.position == reference.position == position + 8
