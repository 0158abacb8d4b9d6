"""Exactly-once streaming from a Ray Dataset into a stage's Parquet shards, written by the workers.

Each output batch becomes one shard, written atomically (tmp + rename) by the Ray task that produced it,
named by a hash of the ids it holds. Rows never pass through the driver. On a rerun, ids already present
in the stage's shards are filtered out of the input first, so every input is produced exactly once even
after the driver or a worker was killed mid-way.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from speed_ray.store import StageOutput


def done_ids(out: StageOutput, id_col: str = "id") -> set[str]:
    """Ids already written to the stage's shards (reads only the id column)."""
    if not out.shard_names():
        return set()
    return set(out.read_table(columns=[id_col]).column(id_col).to_pylist())


def shard_name_for(ids: Iterable[str], prefix: str = "part") -> str:
    h = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:20]
    return f"{prefix}-{h}"


class _ShardWriter:
    """map_batches UDF: writes each batch as one atomic shard and returns a one-row summary."""

    def __init__(self, out: StageOutput, id_col: str, prefix: str):
        self.out, self.id_col, self.prefix = out, id_col, prefix

    def __call__(self, batch: pa.Table) -> pa.Table:
        if batch.num_rows == 0:
            return pa.table({"shard": pa.array([], pa.string()), "rows": pa.array([], pa.int64())})
        name = shard_name_for(batch.column(self.id_col).to_pylist(), self.prefix)
        n = self.out.write_shard(name, batch)
        return pa.table({"shard": [name], "rows": [n]})


def write_stream(ds, out: StageOutput, rows_per_shard: int = 1000, id_col: str = "id", prefix: str = "part") -> int:
    """Write `ds` into `out`'s shards from the workers; returns the number of rows written in this call."""
    writer = _ShardWriter(out, id_col, prefix)
    summary = ds.map_batches(writer, batch_size=rows_per_shard, batch_format="pyarrow", zero_copy_batch=True,
                             num_cpus=0.1)
    total = 0
    for row in summary.iter_rows():  # one tiny row per shard: the driver holds counts, not data
        total += int(row["rows"])
    return total


def filter_pending(ds, done: set[str], id_col: str = "id"):
    """Drop rows whose id is already written (resume)."""
    if not done:
        return ds
    import ray

    ref = ray.put(pa.array(sorted(done), pa.string()))

    def keep(batch: pa.Table) -> pa.Table:
        done_arr = ray.get(ref)
        mask = pc.invert(pc.is_in(batch.column(id_col), value_set=done_arr))
        return batch.filter(mask)

    return ds.map_batches(keep, batch_format="pyarrow", num_cpus=0.1)
