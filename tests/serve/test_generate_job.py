"""``w2svd generate`` on the local S3-compatible server with the tiny generator from a real MLflow
registry: outputs and results complete; a driver SIGKILLed mid-run and a rerun give every row
exactly once; bad rows are reported in their row, not fatal."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines import generate
from w2svd.data import storage
from w2svd.data.video import decode_video

REPO = Path(__file__).resolve().parents[2]
BUCKET = "w2svd-generate"
PROMPTS = f"s3://{BUCKET}/tables/prompts.csv"
# row: (cells, the error's expected fragment or None)
ROWS = [
    ({"prompt": "a person talking", "seed": "1"}, None),
    ({"prompt": "a person blinking"}, None),  # no seed: generate.seed + row number
    ({"prompt": ""}, "prompt"),
    ({"prompt": "a wide shot", "height": "48", "width": "64"}, None),
    ({"prompt": "a bad size", "frames": "8"}, "frames"),
    ({"prompt": "with a broken reference", "image": "refs/broken.png"}, "image"),
    ({"prompt": "a word seed", "seed": "abc"}, "seed"),
    ({"prompt": "an unknown column", "colour": "red"}, "colour"),
    ({"prompt": "a man, green background", "seed": "7"}, None),
    ({"prompt": "a woman smiling", "seed": "8"}, None),
    ({"prompt": "a person nodding", "seed": "9"}, None),
    ({"prompt": "a missing reference", "image": f"s3://{BUCKET}/refs/none.png"}, "image"),
]
GOOD = [i for i, (_, err) in enumerate(ROWS) if err is None]


@pytest.fixture(scope="module")
def prompts(s3_server, registry):
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="tables/refs/broken.png", Body=b"\x89PNG not really")
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["prompt", "seed", "height", "width", "frames", "image", "colour"])
    writer.writeheader()
    for cells, _ in ROWS:
        writer.writerow(cells)
    storage.write_bytes(PROMPTS, out.getvalue().encode())
    return f"models:/{registry['name']}@champion"


def _results(output: str) -> list[dict]:
    return pq.read_table(io.BytesIO(storage.read_bytes(f"{output}/results.parquet"))).to_pylist()


def test_kill_rerun_and_bad_rows(prompts, ray_local, tmp_path, capsys):
    import ray

    output = f"s3://{BUCKET}/runs/gen-1"
    args = ["--model", prompts, "--prompts", PROMPTS, "--output", output, "generate.batch_size=2",
            "generate.part_rows=2"]
    # A separate driver on the session's Ray; it SIGKILLs itself once 4 rows are recorded.
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    killed = subprocess.run([sys.executable, "-m", "pipelines.generate", *args, "debug.kill_generate_after_rows=4"],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
    before = generate.table.read_parts(output)
    assert 4 <= len(before) < len(ROWS), "the kill must land partway"
    assert not storage.exists(f"{output}/results.parquet")

    assert generate.main(args) == generate.EXIT_ROWS_FAILED
    out = capsys.readouterr().out
    assert f"{len(ROWS) - len(before)} to generate" in out and "rows failed" in out
    rows = _results(output)
    assert [r["row"] for r in rows] == list(range(len(ROWS)))  # every row once, in table order
    assert all(r["model_version"] for r in rows) and {r["model"] for r in rows} == {prompts.split("/")[1].split("@")[0]}
    for r, (_, expected) in zip(rows, ROWS):
        if expected is None:
            assert r["error"] is None and r["output_uri"] and r["seconds"] > 0, r
        else:
            assert r["output_uri"] is None and expected in r["error"], r
    assert rows[0]["seed"] == 1 and rows[1]["seed"] == 1 and rows[3]["height"] == 48  # seed 0 + row 1
    videos = sorted(f.uri for f in storage.list_files(f"{output}/videos"))
    assert videos == sorted(r["output_uri"] for r in rows if r["output_uri"])  # none twice, none missing
    clip = decode_video(storage.read_bytes(rows[3]["output_uri"]))[0]
    assert clip.shape == (9, 48, 64, 3)
    # Rows recorded before the kill were kept, not generated again.
    assert {k: v["output_uri"] for k, v in before.items()} == {r["key"]: r["output_uri"] for r in rows
                                                               if r["key"] in before}
    summary = storage.read_json(f"{output}/_summary.json")
    assert (summary["rows"], summary["failed"], summary["this_run"]) == (len(ROWS), len(ROWS) - len(GOOD),
                                                                         len(ROWS) - len(before))

    # A third run finds nothing to do; the exit status still says rows failed.
    assert generate.main(args) == generate.EXIT_ROWS_FAILED
    assert "0 to generate" in capsys.readouterr().out
    assert len(_results(output)) == len(ROWS)


def test_another_model_into_the_same_output_is_a_one_line_error(prompts, exports, capsys):
    output = f"s3://{BUCKET}/runs/gen-1"
    assert generate.main(["--model", exports["base"], "--prompts", PROMPTS, "--output", output]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("w2svd generate: error:") and "another --output" in line


def test_a_missing_table_is_a_one_line_error(prompts, capsys):
    assert generate.main(["--model", prompts, "--prompts", f"s3://{BUCKET}/nope.csv", "--output", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err



def test_gpu_actors_on_a_machine_without_gpus_is_a_one_line_error(prompts, ray_local, tmp_path, capsys):
    # Ray would keep the actor pending forever (the demo's generate stage once did, with the
    # default generate.num_gpus = 1 on a CPU machine).
    args = ["--model", prompts, "--prompts", PROMPTS, "--output", str(tmp_path / "gpu"), "--config", "debug",
            "generate.num_gpus=1"]
    assert generate.main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "generate.num_gpus = 1 but this machine has no GPU" in line
