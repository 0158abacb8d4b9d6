"""Exactly-once streaming from a Ray Dataset into a stage's Parquet shards, written by the workers.

Each output batch becomes one shard, written atomically (tmp + rename) by the Ray task that produced it,
named by a hash of the ids it holds. Rows never pass through the driver. On a rerun, ids already present
in the stage's shards are filtered out of the input first, so every input is produced exactly once even
after the driver or a worker was killed mid-way.

The done ids of a large stage (a million and more) never gather in the driver either: `done_set` reads them in
a Ray task into a sorted array of 64-bit id hashes (8 bytes an id) that stays in the object store; the driver
holds its size only, and `filter_pending` tests each batch against it with a binary search.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from speed_ray.store import StageOutput

_LIGHT = 0.25  # CPUs for the I/O-bound id scan


def done_ids(out: StageOutput, id_col: str = "id") -> set[str]:
    """Ids already written to the stage's shards (reads only the id column). For small stages: a Python set in
    this process; large ones use `done_set`."""
    if not out.shard_names():
        return set()
    return set(out.read_table(columns=[id_col]).column(id_col).to_pylist())


def id_hashes(ids: pa.Array | pa.ChunkedArray | Iterable[str]) -> np.ndarray:
    """uint64 hash of each id (BLAKE2b, 8 bytes): equal ids, equal hashes; distinct ids collide with odds 2^-64
    a pair (at 1.15M done x 1.15M pending ids: ~7e-8 for a whole resume)."""
    if isinstance(ids, (pa.Array, pa.ChunkedArray)):
        ids = ids.to_pylist()
    blake = hashlib.blake2b
    blob = b"".join([blake(str(i).encode(), digest_size=8).digest() for i in ids])
    return np.frombuffer(blob, dtype="<u8").astype(np.uint64)


def _scan_hashes(outs: list[StageOutput], id_col: str) -> np.ndarray:
    """Sorted unique hashes of the ids in every shard of `outs`, read shard by shard (the id column only)."""
    import pyarrow.parquet as pq

    parts = []
    for out in outs:
        for name in out.shard_names():
            with out.fs.open(out._path(out.shard_url(name)), "rb") as f:
                pf = pq.ParquetFile(f)
                if id_col in pf.schema_arrow.names and pf.metadata.num_rows:
                    parts.append(id_hashes(pf.read(columns=[id_col]).column(id_col)))
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, np.uint64)


def _scan_task(outs: list[StageOutput], id_col: str) -> tuple[int, np.ndarray]:
    h = _scan_hashes(outs, id_col)
    return len(h), h


class DoneSet:
    """The ids already written to some outputs, as sorted uint64 hashes: in the object store (`ref`) when Ray
    runs, else in this process (`hashes`). `len()` is the number of distinct ids; the driver holds nothing else."""

    def __init__(self, count: int, ref=None, hashes: np.ndarray | None = None):
        self.count, self.ref, self.hashes = int(count), ref, hashes

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:
        return self.count > 0

    def __repr__(self) -> str:
        return f"DoneSet({self.count} ids)"

    def get(self) -> np.ndarray:
        if self.hashes is not None:
            return self.hashes
        import ray

        return ray.get(self.ref)

    def contains(self, ids) -> np.ndarray:
        """Boolean mask: which of `ids` are done."""
        return is_done(self.get(), id_hashes(ids))


def is_done(sorted_hashes: np.ndarray, h: np.ndarray) -> np.ndarray:
    if len(sorted_hashes) == 0 or len(h) == 0:
        return np.zeros(len(h), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_hashes, h), len(sorted_hashes) - 1)
    return sorted_hashes[pos] == h


def done_set(*outs: StageOutput | None, id_col: str = "id") -> DoneSet:
    """The ids already written to `outs` (None entries skipped): scanned by a Ray task when Ray is initialized,
    so a resume at a million rows costs the driver one integer."""
    outs_l = [o for o in outs if o is not None]
    if not any(o.shard_names() for o in outs_l):
        return DoneSet(0, hashes=np.empty(0, np.uint64))
    import ray

    if not ray.is_initialized():
        h = _scan_hashes(outs_l, id_col)
        return DoneSet(len(h), hashes=h)
    count_ref, ref = ray.remote(num_cpus=_LIGHT, num_returns=2)(_scan_task).remote(outs_l, id_col)
    return DoneSet(ray.get(count_ref), ref=ref)


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


def filter_pending(ds, done: set[str] | DoneSet, id_col: str = "id"):
    """Drop rows whose id is already written (resume). `done` is a set of ids (small stages) or a `DoneSet`."""
    if not done:
        return ds
    import ray

    if isinstance(done, DoneSet):
        ref = done.ref if done.ref is not None else ray.put(done.hashes)

        def keep_hashed(batch: pa.Table) -> pa.Table:
            return batch.filter(pa.array(~is_done(ray.get(ref), id_hashes(batch.column(id_col)))))

        return ds.map_batches(keep_hashed, batch_format="pyarrow", num_cpus=0.1)

    ref = ray.put(pa.array(sorted(done), pa.string()))

    def keep(batch: pa.Table) -> pa.Table:
        done_arr = ray.get(ref)
        mask = pc.invert(pc.is_in(batch.column(id_col), value_set=done_arr))
        return batch.filter(mask)

    return ds.map_batches(keep, batch_format="pyarrow", num_cpus=0.1)
