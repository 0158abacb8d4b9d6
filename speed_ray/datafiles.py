"""A user's data files, read as they are: a Parquet file or directory, a JSONL file, or a local `datasets`
directory (save_to_disk: its Arrow files). The embedder's own-data import and the screen's mining corpus read
them; errors name the file and line."""

from __future__ import annotations

import glob
import os

import pyarrow as pa

from speed_ray.errors import DataError

_BATCH = 8192


def input_files(path: str) -> tuple[str, list[str]]:
    """(format, files) of a user's data: a Parquet file or directory, a JSONL file, or a `datasets` directory
    (save_to_disk: its Arrow files)."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(
                os.path.join(path, "state.json")):
            return "arrow", sorted(glob.glob(os.path.join(path, "*.arrow")))
        if os.path.exists(os.path.join(path, "dataset_dict.json")):
            raise DataError(f"{path} is a DatasetDict: point at one split's directory (e.g. {path}/train)")
        files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
        if files:
            return "parquet", files
        files = sorted(glob.glob(os.path.join(path, "**", "*.jsonl"), recursive=True))
        if files:
            return "jsonl", files
        raise DataError(f"{path}: no Parquet, JSONL or `datasets` files found")
    if not os.path.exists(path):
        raise FileNotFoundError(f"training data {path} does not exist")
    if path.endswith(".parquet"):
        return "parquet", [path]
    if path.endswith((".jsonl", ".json")):
        return "jsonl", [path]
    if path.endswith(".arrow"):
        return "arrow", [path]
    raise DataError(f"{path}: expected a .parquet, .jsonl or .arrow file, or a directory of them")


def record_batches(fmt: str, path: str):
    """Record batches of one file, in order."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        yield from pq.ParquetFile(path).iter_batches(batch_size=_BATCH)
    elif fmt == "arrow":
        import pyarrow.ipc as ipc

        with pa.memory_map(path) as src:
            try:
                reader = ipc.open_stream(src)
            except pa.ArrowInvalid:
                reader = ipc.open_file(src)
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)
                return
            yield from reader
    else:
        import json

        rows, first = [], 1
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {i} is not JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}: line {i} is not a JSON object")
                rows.append(row)
                if len(rows) == _BATCH:
                    yield JsonBatch(rows, first)
                    rows, first = [], i + 1
        if rows:
            yield JsonBatch(rows, first)


class JsonBatch:
    def __init__(self, rows: list[dict], first_line: int):
        self.rows, self.first_line = rows, first_line
