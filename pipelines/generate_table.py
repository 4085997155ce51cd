"""Batch generation's tables: the prompt table it reads and the results it writes and resumes from.

A prompt table is JSON lines, CSV or Parquet (local or ``s3://``) with the API's field names
(``prompt``, optional ``seed``, ``steps``, ``frames``, ``height``, ``width``, and ``image`` as a URI,
relative to the table's folder or absolute). Row ``i`` (0-based, in file order) gets the key
``<i>-<hash of its values>``, which names its mp4 and its results row; a rerun skips every key that
a results part already holds, so nothing is generated or recorded twice.

    OUTPUT/_job.json                 the model the output is made with (pinned on the first run)
    OUTPUT/videos/<key>.mp4          one per generated row
    OUTPUT/parts/part-<key>.parquet  results of a few rows, written whole (the resume state)
    OUTPUT/results.parquet           every row of the table once, in table order (at the end)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.serve_requests import FIELDS
from w2svd.data import storage

INT_FIELDS = ("seed", "steps", "frames", "height", "width")
RESULTS_SCHEMA = pa.schema([
    ("row", pa.int64()), ("key", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()),
    ("steps", pa.int64()), ("frames", pa.int64()), ("height", pa.int64()), ("width", pa.int64()),
    ("image", pa.string()), ("model", pa.string()), ("model_version", pa.string()), ("output_uri", pa.string()),
    ("seconds", pa.float64()), ("error", pa.string()),
])
PARTS_DIR, RESULTS_FILE, JOB_FILE, SUMMARY_FILE = "parts", "results.parquet", "_job.json", "_summary.json"
_INTEGER = re.compile(r"^[+-]?\d+$")


def _clean(value):
    """A table cell → the JSON value the API would get: blanks and NaN are absent, integral
    floats (Parquet written by pandas with NaN) are integers."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str) and not value.strip():
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def normalise_row(raw: dict, from_text: bool) -> dict:
    """One table row → an API-shaped body (unknown columns kept, so the row reports them)."""
    body = {}
    for key, value in raw.items():
        value = _clean(value)
        if value is None:
            continue
        if from_text and key in INT_FIELDS and isinstance(value, str) and _INTEGER.match(value.strip()):
            value = int(value.strip())
        body[str(key)] = value
    return body


def read_prompt_table(uri: str, options: storage.StorageOptions | None = None) -> list[dict]:
    """Rows ``{"row": i, "key": …, "body": {...}}`` of a JSONL/CSV/Parquet table; a missing,
    empty or unreadable table, or one without a ``prompt`` column, is a one-line ``ValueError``."""
    lower = uri.lower()
    if not storage.exists(uri, options):
        raise FileNotFoundError(f"prompt table {uri} does not exist")
    data = storage.read_bytes(uri, options)
    if lower.endswith((".jsonl", ".json", ".ndjson")):
        rows, columns = [], set()
        for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                obj = {"__error__": f"line {n} is not JSON: {err.msg}"}
            obj = obj if isinstance(obj, dict) else {"__error__": f"line {n} is not a JSON object"}
            columns.update(obj)
            rows.append(normalise_row(obj, from_text=False))
    elif lower.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
        columns = set(reader.fieldnames or [])
        rows = [normalise_row(r, from_text=True) for r in reader]
    elif lower.endswith(".parquet"):
        try:
            table = pq.read_table(io.BytesIO(data))
        except pa.ArrowInvalid as err:
            raise ValueError(f"prompt table {uri} is not a readable Parquet file: {err}") from None
        columns = set(table.column_names)
        rows = [normalise_row(r, from_text=False) for r in table.to_pylist()]
    else:
        raise ValueError(f"prompt table {uri}: expected a .jsonl, .csv or .parquet file")
    if not rows:
        raise ValueError(f"prompt table {uri} has no rows")
    if "prompt" not in columns:
        raise ValueError(f"prompt table {uri} has no 'prompt' column (columns: {sorted(columns)}); "
                         f"known fields: {list(FIELDS)}")
    return [{"row": i, "key": row_key(i, body), "body": body} for i, body in enumerate(rows)]


def row_key(index: int, body: dict) -> str:
    digest = hashlib.sha1(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{index:07d}-{digest}"


def resolve_image(value: str, table_uri: str) -> str:
    """An image URI of a row: absolute (``s3://``, ``/path``), or relative to the table's folder."""
    if storage.is_s3(value) or value.startswith(("/", "file://")):
        return value
    return storage.join(table_uri.rsplit("/", 1)[0] if "/" in table_uri else ".", value)


def read_parts(output: str, options=None) -> dict[str, dict]:
    """key → results row, from every part already written."""
    done: dict[str, dict] = {}
    for f in storage.list_files(storage.join(output, PARTS_DIR), options):
        if f.uri.endswith(".parquet"):
            for r in pq.read_table(io.BytesIO(storage.read_bytes(f.uri, options))).to_pylist():
                done[r["key"]] = r
    return done


def write_part(output: str, rows: list[dict], options=None) -> None:
    if rows:
        table = pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        name = f"part-{min(r['key'] for r in rows)}-{len(rows)}.parquet"
        storage.write_bytes(storage.join(output, PARTS_DIR, name), buf.getvalue(), options)


def write_results(output: str, rows: list[dict], options=None) -> str:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(sorted(rows, key=lambda r: r["row"]), schema=RESULTS_SCHEMA), buf)
    uri = storage.join(output, RESULTS_FILE)
    storage.write_bytes(uri, buf.getvalue(), options)
    return uri
