"""Content-addressed stage store over fsspec: Parquet shards plus an atomic manifest per stage.

Layout under the run directory (a local path or any fsspec URL: s3://, gs://, abfs://):

    stages/<stage>/<fingerprint>/data/<shard>.parquet   rows, written shard by shard (atomic rename)
    stages/<stage>/<fingerprint>/artifacts/...          models, plots, anything not tabular
    stages/<stage>/<fingerprint>/manifest.json          written last; its presence means "complete"
    runs/<run name>/plan.json                           which fingerprint each stage of a run used

A stage's fingerprint hashes its settings and its inputs' fingerprints, so a changed setting gives new
fingerprints to that stage and everything downstream of it and to nothing else, and runs with different
configs that share a run directory reuse each other's finished stages.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hex digest of a JSON-able object, independent of dict order."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("speed-ray", "ray", "torch", "transformers", "trl", "peft", "vllm", "datasketch", "mteb",
                 "sentence-transformers", "openai", "pyarrow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


READ_CPUS = 0.25          # a stage read's CPU request per task (StageOutput.ray_dataset; why, at read_shards)


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts if p]])


class StageOutput:
    """One stage's directory: shards, artifacts and manifest. Cheap to construct; safe to pickle."""

    def __init__(self, run_dir: str, stage: str, fingerprint: str):
        self.run_dir = run_dir.rstrip("/")
        self.stage = stage
        self.fingerprint = fingerprint
        self.url = _join(self.run_dir, "stages", stage, fingerprint)
        self.data_url = _join(self.url, "data")
        self.artifacts_url = _join(self.url, "artifacts")
        self.manifest_url = _join(self.url, "manifest.json")

    def __repr__(self) -> str:
        return f"StageOutput({self.stage}@{self.fingerprint})"

    # ---- filesystem -------------------------------------------------------------------------------
    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        fs, _ = fsspec.core.url_to_fs(self.url)
        return fs

    def _path(self, url: str) -> str:
        return fsspec.core.url_to_fs(url)[1]

    def artifact(self, *rel: str) -> str:
        """URL (local path when local) of an artifact inside this stage; parents are created locally."""
        url = _join(self.artifacts_url, *rel)
        if self.is_local:
            os.makedirs(os.path.dirname(url) if rel and "." in rel[-1] else url, exist_ok=True)
        return url

    @property
    def is_local(self) -> bool:
        return "://" not in self.url or self.url.startswith("file://")

    # ---- manifest ----------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.fs.exists(self._path(self.manifest_url))

    @property
    def manifest(self) -> dict:
        with self.fs.open(self._path(self.manifest_url), "r") as f:
            return json.load(f)

    def write_manifest(self, manifest: dict) -> None:
        _atomic_write_bytes(self.fs, self._path(self.manifest_url),
                            json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())

    def clear_manifest(self) -> None:
        p = self._path(self.manifest_url)
        if self.fs.exists(p):
            self.fs.rm(p)

    def set_aside(self) -> str | None:
        """Move everything this stage wrote (shards, artifacts, manifest) to run_dir/replaced/<stage>/, so a forced
        re-run starts clean and nothing is deleted. Returns where it went (None: nothing was there)."""
        src = self._path(self.url)
        if not self.fs.exists(src):
            return None
        dest = _join(self.run_dir, "replaced", self.stage, f"{self.fingerprint}-{time.strftime('%Y%m%dT%H%M%S')}")
        self.fs.makedirs(self._path(_join(self.run_dir, "replaced", self.stage)), exist_ok=True)
        self.fs.mv(src, self._path(dest), recursive=True)
        return dest

    # ---- shards ------------------------------------------------------------------------------------
    def shard_url(self, name: str) -> str:
        return _join(self.data_url, f"{name}.parquet")

    def has_shard(self, name: str) -> bool:
        return self.fs.exists(self._path(self.shard_url(name)))

    def shard_names(self) -> list[str]:
        p = self._path(self.data_url)
        if not self.fs.exists(p):
            return []
        names = [os.path.basename(f) for f in self.fs.ls(p, detail=False)]
        return sorted(n[: -len(".parquet")] for n in names if n.endswith(".parquet") and not n.startswith("."))

    def shard_urls(self) -> list[str]:
        return [self.shard_url(n) for n in self.shard_names()]

    def write_shard(self, name: str, rows: pa.Table | list[dict] | dict[str, list]) -> int:
        """Write one shard atomically (tmp file + rename). Returns its row count."""
        table = to_table(rows)
        fs = self.fs
        final = self._path(self.shard_url(name))
        fs.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = _join(os.path.dirname(final), f".tmp-{uuid.uuid4().hex}-{os.path.basename(final)}")
        with fs.open(tmp, "wb") as f:
            pq.write_table(table, f)
        fs.mv(tmp, final)
        return table.num_rows

    def read_table(self, columns: list[str] | None = None, shards: list[str] | None = None) -> pa.Table:
        """All shards as one table. For small stage outputs; large ones use iter_batches or ray_dataset."""
        names = shards if shards is not None else self.shard_names()
        tables = []
        for n in names:
            with self.fs.open(self._path(self.shard_url(n)), "rb") as f:
                tables.append(pq.read_table(f, columns=columns))
        if not tables:
            return pa.table({c: [] for c in (columns or [])})
        return pa.concat_tables(tables, promote_options="default")

    def read_rows(self, columns: list[str] | None = None) -> list[dict]:
        return self.read_table(columns).to_pylist()

    def iter_batches(self, batch_size: int = 1024, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        for n in self.shard_names():
            with self.fs.open(self._path(self.shard_url(n)), "rb") as f:
                yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)

    def num_rows(self) -> int:
        total = 0
        for n in self.shard_names():
            with self.fs.open(self._path(self.shard_url(n)), "rb") as f:
                total += pq.ParquetFile(f).metadata.num_rows
        return total

    def ray_dataset(self, columns: list[str] | None = None, num_cpus: float = READ_CPUS):
        """The stage's rows as a streaming Ray Dataset (nothing is pulled into the driver): at most READ_TASKS read
        tasks, each reading its share of the shards in order (read_shards). Give the num_cpus of the map that
        follows: Ray Data fuses the read into it only where both ask for the same resources."""
        import ray.data

        urls = self.shard_urls()
        if not urls:
            raise FileNotFoundError(f"stage {self.stage} has no data shards at {self.data_url}")
        shards = ray.data.from_items([{"shard": u} for u in urls], override_num_blocks=min(len(urls), READ_TASKS))
        return shards.map_batches(partial(read_shards, columns=columns), batch_size=None, batch_format="pyarrow",
                                  num_cpus=num_cpus)


# Stage reads are plain Ray Data map tasks over the shard list, not ray.data.read_parquet: its planner gives the file
# listing a task of one whole CPU with no way to ask for less, and its Parquet reader a pool of FooterReader actors
# (RAY_DATA_PARQUET_FOOTER_NUM_ACTORS, 32 whatever the file count, a worker process each). A task of one CPU waits
# for a node with a whole CPU free; where every node's CPUs are partly held (teacher actors at 0.25 CPU on each of
# two 1-CPU nodes) it never starts and the stage hangs with no error. A shard read asks for a quarter of a CPU by
# default (a stage whose own tasks take a whole CPU gives 1, so the read fuses into them) and needs no listing: the
# store names the shards. Reads go through fsspec, as every write of the store does.
READ_TASKS = 200          # as Ray Data's own reads (read_op_min_num_blocks): a 1.15M-row stage has ~1,150 shards
READ_BATCH_ROWS = 16384


def read_shards(batch: pa.Table, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The rows of the shards named in batch["shard"], a table per READ_BATCH_ROWS (a shard without rows: its
    empty table, so the schema survives)."""
    for url in batch.column("shard").to_pylist():
        fs, path = fsspec.core.url_to_fs(url)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            missing = [c for c in columns or () if c not in names]
            if missing:
                raise KeyError(f"{url} has no column(s) {missing}; it has {names}")
            names = columns or names     # select() also puts the columns in the order asked
            empty = True
            for b in pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=columns):
                empty = False
                yield pa.Table.from_batches([b]).select(names)
            if empty:
                yield pf.schema_arrow.empty_table().select(names)


def shards_at(out: StageOutput, *rel: str) -> StageOutput:
    """A StageOutput whose shards live under artifacts/<rel>: reuses the store's atomic shard I/O."""
    sub = StageOutput(out.run_dir, out.stage, out.fingerprint)
    sub.data_url = out.artifact(*rel)
    return sub


class StepMarkers:
    """Completion markers of a stage's sub-steps (artifacts/steps/<name>.json), each written after its outputs, so
    a killed stage resumes at the first unmarked step."""

    def __init__(self, out: StageOutput):
        self.out = out

    def _path(self, name: str) -> str:
        return self.out._path(self.out.artifact("steps", f"{name}.json"))

    def get(self, name: str) -> dict | None:
        fs = self.out.fs
        if not fs.exists(self._path(name)):
            return None
        with fs.open(self._path(name), "r") as f:
            return json.load(f)

    def mark(self, name: str, info: dict, t0: float | None = None) -> None:
        """Mark a step done; with t0, record its wall time (seconds since t0, this run's share)."""
        if t0 is not None:
            info = {**info, "wall_s": round(time.time() - t0, 3)}
        _atomic_write_bytes(self.out.fs, self._path(name), json.dumps(info, sort_keys=True).encode())


def to_table(rows: pa.Table | list[dict] | dict[str, list]) -> pa.Table:
    if isinstance(rows, pa.Table):
        return rows
    if isinstance(rows, dict):
        return pa.table(rows)
    if not rows:
        return pa.table({})
    return pa.Table.from_pylist(rows)


def _atomic_write_bytes(fs: fsspec.AbstractFileSystem, path: str, blob: bytes) -> None:
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    with fs.open(tmp, "wb") as f:
        f.write(blob)
    fs.mv(tmp, path)



def _atomic_write_parquet(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table,
                          row_group_size: int | None = None) -> None:
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f, row_group_size=row_group_size)
    fs.mv(tmp, path)

@dataclass
class CostLedger:
    """Teacher calls and tokens, plus compute seconds, for one stage. Summed into its manifest."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_calls: int = 0
    failed_calls: int = 0
    cpu_seconds: float = 0.0
    gpu_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def add(self, other: "CostLedger | dict") -> None:
        d = other if isinstance(other, dict) else other.as_dict()
        for k in ("calls", "prompt_tokens", "completion_tokens", "cached_calls", "failed_calls", "cpu_seconds",
                  "gpu_seconds"):
            setattr(self, k, getattr(self, k) + d.get(k, 0))

    def as_dict(self) -> dict:
        return {"calls": self.calls, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens, "cached_calls": self.cached_calls,
                "failed_calls": self.failed_calls, "cpu_hours": self.cpu_seconds / 3600,
                "gpu_hours": self.gpu_seconds / 3600, "cpu_seconds": self.cpu_seconds, "gpu_seconds": self.gpu_seconds,
                **self.extra}


def absolute_run_dir(run_dir: str) -> str:
    """A local run directory as an absolute path (relative means the driver's working directory: Ray workers run
    in their own session dirs); fsspec URLs (s3://, gs://, ...) unchanged."""
    run_dir = str(run_dir)
    return (run_dir if "://" in run_dir else os.path.abspath(os.path.expanduser(run_dir))).rstrip("/")


class RunStore:
    """A run directory: stage outputs by fingerprint, and one plan per named run."""

    def __init__(self, run_dir: str):
        self.run_dir = absolute_run_dir(run_dir)
        self.fs, self.root = fsspec.core.url_to_fs(self.run_dir)

    def stage(self, name: str, fingerprint: str) -> StageOutput:
        return StageOutput(self.run_dir, name, fingerprint)

    def run_url(self, run_name: str, *rel: str) -> str:
        return _join(self.run_dir, "runs", run_name, *rel)

    def write_json(self, url: str, obj: Any) -> None:
        path = fsspec.core.url_to_fs(url)[1]
        _atomic_write_bytes(self.fs, path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, url: str) -> Any:
        path = fsspec.core.url_to_fs(url)[1]
        with self.fs.open(path, "r") as f:
            return json.load(f)

    def exists(self, url: str) -> bool:
        return self.fs.exists(fsspec.core.url_to_fs(url)[1])

    def run_names(self) -> list[str]:
        p = f"{self.root}/runs"
        if not self.fs.exists(p):
            return []
        return sorted(os.path.basename(x) for x in self.fs.ls(p, detail=False))

    def fingerprints(self, stage: str) -> list[str]:
        p = f"{self.root}/stages/{stage}"
        if not self.fs.exists(p):
            return []
        return sorted(os.path.basename(x) for x in self.fs.ls(p, detail=False))


def now() -> float:
    return time.time()


def find_run_model(run_dir: str) -> str | None:
    """The newest completed train_embedder stage's model_path in a run directory (local or remote), or None if
    it is not a run directory. The one implementation behind `speed-ray evaluate RUN_DIR` and `serve RUN_DIR`."""
    fs, root = fsspec.core.url_to_fs(run_dir)
    if not fs.isdir(f"{root.rstrip('/')}/stages"):
        return None
    found = []
    for url in fs.glob(f"{root.rstrip('/')}/stages/train_embedder/*/manifest.json"):
        with fs.open(url) as f:
            m = json.load(f)
        if m.get("model_path"):
            found.append((m.get("ended_at") or 0, url, m["model_path"]))
    if not found:
        raise FileNotFoundError(f"{run_dir} is a run directory but has no completed train_embedder stage "
                                "(no stages/train_embedder/*/manifest.json with a model_path)")
    _, url, path = max(found)
    if "://" not in path and not os.path.isabs(path):   # a path relative to the stage directory
        path = os.path.join(os.path.dirname(url), path)
    if "://" in run_dir and "://" not in path:
        path = f"{run_dir.split('://', 1)[0]}://{path}"
    return path
