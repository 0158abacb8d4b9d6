"""A user's own pairs or triples (Parquet, JSONL, or a local `datasets` directory) as the embedder stage's input rows.

Each input file is read in batches by one Ray task, checked row by row (an error names the file, the row and the
column), mapped onto the sample columns (id, task_type, task, query, positive, negative) and written as shards of a
StageOutput, which the embedder stage's feed reads like the dedup stage's output. A row without a negative is a
pair: it trains with in-batch negatives only.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import pyarrow as pa

from speed_ray.datafiles import JsonBatch as _JsonBatch
from speed_ray.datafiles import input_files
from speed_ray.datafiles import record_batches as _batches
from speed_ray.errors import DataError
from speed_ray.store import StageOutput

__all__ = ["Columns", "convert_rows", "import_data", "input_files", "load_public"]


@dataclass(frozen=True)
class Columns:
    """Which input column holds each text; negative and task are optional (None: absent)."""

    query: str = "query"
    positive: str = "positive"
    negative: str | None = "negative"
    task: str | None = "task"
    id: str | None = "id"
    task_type: str | None = "task_type"
    negative_required: bool = False   # the user named the negative column: every row must have it


def convert_rows(rows: list[dict], cols: Columns, where: str, first: int, default_task: str,
                 default_type: str, unit: str = "row") -> list[dict]:
    """Input rows -> sample rows. `where` names the file; row numbers count from `first` (1-based)."""
    out = []
    for k, r in enumerate(rows):
        n = first + k
        sample = {}
        for field in ("query", "positive", "negative"):
            col = getattr(cols, field)
            if col is None:
                sample[field] = None
                continue
            if col not in r:
                if field != "negative" or cols.negative_required:
                    raise DataError(f"{where}: {unit} {n} has no column {col!r} (the {field}; map it with "
                                    f"--{field}-column)")
                sample[field] = None   # no negative column: a pair
                continue
            v = r[col]
            if v is None and field == "negative":
                sample[field] = None
                continue
            if not isinstance(v, str) or not v.strip():
                raise DataError(f"{where}: {unit} {n}, column {col!r} (the {field}): expected a non-empty "
                                f"string, got {v!r:.60}")
            sample[field] = v
        task = r.get(cols.task) if cols.task else None
        sample["task"] = task if isinstance(task, str) and task.strip() else default_task
        tt = r.get(cols.task_type) if cols.task_type else None
        sample["task_type"] = tt if isinstance(tt, str) and tt else default_type
        rid = r.get(cols.id) if cols.id else None
        sample["id"] = str(rid) if rid not in (None, "") else f"{where}#{n}"
        out.append(sample)
    return out


def _file_task(fmt: str, path: str, cols: Columns, default_task: str, default_type: str,
               out: StageOutput) -> dict:
    """Ray task: one input file -> shards (one per batch, named by file and batch: a rerun rewrites the same)."""
    tag = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:10]
    n = pairs = 0
    first = 1
    for b, batch in enumerate(_batches(fmt, path)):
        if isinstance(batch, _JsonBatch):
            rows, first, unit = batch.rows, batch.first_line, "line"
        else:
            rows, unit = batch.to_pylist(), "row"
        samples = convert_rows(rows, cols, path, first, default_task, default_type, unit)
        if not isinstance(batch, _JsonBatch):
            first += len(rows)
        pairs += sum(1 for s in samples if s["negative"] is None)
        out.write_shard(f"own-{tag}-{b:06d}", pa.Table.from_pylist(
            samples, schema=pa.schema([(c, pa.string()) for c in
                                       ("id", "task_type", "task", "query", "positive", "negative")])))
        n += len(samples)
    if n == 0:
        raise DataError(f"{path}: no rows")
    return {"file": path, "rows": n, "pairs": pairs}


def import_data(path: str, out: StageOutput, cols: Columns, default_task: str = "",
                default_type: str = "own") -> dict:
    """Convert a user's data into `out`'s shards (a Ray task per file). Returns the per-file counts."""
    import ray

    fmt, files = input_files(path)
    if not files:
        raise DataError(f"{path}: no data files")
    task = ray.remote(num_cpus=0.25)(_file_task)
    refs = [task.remote(fmt, f, cols, default_task, default_type, out) for f in files]
    try:
        per_file = ray.get(refs)
    except ray.exceptions.RayTaskError as e:   # a DataError in a task: the user's message, not a traceback
        cause = e.cause if hasattr(e, "cause") else None
        if isinstance(cause, DataError):
            raise DataError(str(cause)) from None
        raise
    return {"format": fmt, "files": per_file, "rows": sum(f["rows"] for f in per_file),
            "pairs": sum(f["pairs"] for f in per_file)}


def load_public(path: str) -> list[dict]:
    """Public labeled data as sample rows (id, task_type "public" unless given, task, query, positive, negative):
    pairs or triples (a row without a negative is a pair), from a Parquet file or directory, a JSONL file or a local
    `datasets` directory; on a remote fsspec URL, Parquet or JSONL. Errors name the file, row and column."""
    cols = Columns()
    rows: list[dict] = []
    if "://" in path:
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        if path.endswith((".jsonl", ".json")):
            import json

            with fs.open(p, "r") as f:
                raw = []
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            raw.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise DataError(f"{path}: line {i} is not JSON ({e.msg})") from None
            rows = convert_rows(raw, cols, path, 1, "", "public", "line")
        else:
            import pyarrow.dataset as ds

            rows = convert_rows(ds.dataset(p, filesystem=fs, format="parquet").to_table().to_pylist(), cols, path,
                                1, "", "public")
    else:
        fmt, files = input_files(path)
        for f in files:
            first = 1
            for batch in _batches(fmt, f):
                if isinstance(batch, _JsonBatch):
                    rows += convert_rows(batch.rows, cols, f, batch.first_line, "", "public", "line")
                else:
                    raw = batch.to_pylist()
                    rows += convert_rows(raw, cols, f, first, "", "public")
                    first += len(raw)
    if not rows:
        raise DataError(f"public data {path} has no rows")
    return rows
