"""Prompt tables (JSONL, CSV, Parquet) read into API-shaped rows with stable keys."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.generate_table import read_prompt_table, resolve_image, row_key


def test_the_three_formats_give_the_same_rows(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "seed": 3}\n\n{"prompt": "b", "height": 48}\n')
    (tmp_path / "p.csv").write_text("prompt,seed,height\na,3,\nb,,48\n")
    pq.write_table(pa.table({"prompt": ["a", "b"], "seed": [3.0, float("nan")], "height": [None, 48]}),
                   tmp_path / "p.parquet")
    bodies = [[r["body"] for r in read_prompt_table(str(tmp_path / f"p.{ext}"))] for ext in ("jsonl", "csv", "parquet")]
    assert bodies[0] == bodies[1] == bodies[2] == [{"prompt": "a", "seed": 3}, {"prompt": "b", "height": 48}]


def test_keys_follow_row_and_content(tmp_path):
    (tmp_path / "p.csv").write_text("prompt,seed\na,1\na,1\nb,1\n")
    keys = [r["key"] for r in read_prompt_table(str(tmp_path / "p.csv"))]
    assert len(set(keys)) == 3 and keys[0] == row_key(0, {"prompt": "a", "seed": 1})


def test_text_cells_keep_what_is_not_an_integer_for_the_row_to_report(tmp_path):
    (tmp_path / "p.csv").write_text("prompt,seed,colour\na,1.5,\nb,x,red\n")
    rows = read_prompt_table(str(tmp_path / "p.csv"))
    assert rows[0]["body"] == {"prompt": "a", "seed": "1.5"} and rows[1]["body"]["colour"] == "red"


def test_a_bad_jsonl_line_is_that_row_s_error(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{oops\n[1]\n')
    rows = read_prompt_table(str(tmp_path / "p.jsonl"))
    assert "line 2 is not JSON" in rows[1]["body"]["__error__"] and "line 3" in rows[2]["body"]["__error__"]


@pytest.mark.parametrize("name, text, fragment", [
    ("p.csv", "seed\n1\n", "no 'prompt' column"),
    ("p.csv", "prompt\n", "no rows"),
    ("p.txt", "prompt\na\n", ".jsonl, .csv or .parquet"),
    ("p.parquet", "not parquet", "not a readable Parquet"),
])
def test_unusable_tables_are_one_line_errors(tmp_path, name, text, fragment):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=fragment):
        read_prompt_table(str(tmp_path / name))
    with pytest.raises(FileNotFoundError):
        read_prompt_table(str(tmp_path / "absent.csv"))


def test_image_uris_are_relative_to_the_table():
    assert resolve_image("refs/a.png", "s3://b/t/p.csv") == "s3://b/t/refs/a.png"
    assert resolve_image("s3://c/a.png", "s3://b/t/p.csv") == "s3://c/a.png"
    assert resolve_image("/abs/a.png", "/data/p.csv") == "/abs/a.png"
    json.dumps(resolve_image("a.png", "p.csv"))
