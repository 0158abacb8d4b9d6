"""The embedder's training feed at any scale: triples written once in batch order, read per step by each worker.

No list of all triples sits in the driver or in a training worker. The stage prepares the feed in four passes,
each a Ray task or a Ray Data pipeline, and marks each done (artifacts/steps/) so a killed stage resumes:

    stages/_embedder_triples/<key>/artifacts/triples/*.parquet
                                            every usable triple (the run's rows, then public data) and its order
                                            key: a 64-bit prefix of sha256(seed:id)        (1: Ray Data + a task)
    artifacts/feed/plan.json                batches per epoch, epochs written, rows per file, the data summary
                                                                                           (2: a task, 3 columns)
    artifacts/feed_parts/e/f/*.parquet      the rows of each epoch file, scattered by the map workers    (3)
    artifacts/feed/eEEE/fFFFFF.parquet      epoch E's rows in batch order: row r of the epoch is slot r % B of
                                            batch r // B; row groups of B / num_workers rows    (4: one task a file)

Selection and batching are the in-memory functions' (`select_rows`, `make_batches`) over row indices: the subset
of n_samples is the n smallest order keys, so the scaling sweep's subsets are nested, and the batches are the same
random draws over the same canonical order (the selected rows sorted by key, then the public ones). A training
worker reads, per step, the row groups of its own slice of that step's batch (`FeedReader`): the batch of a step
is a pure function of the files, the same on every worker and on resume.

Pass 1's triples depend on the input rows and on how rows become triples (seed, task types, symmetric types,
pairs, public data), not on n_samples or batching: they are written once per input and setting, beside the run's
stages (`triples_output`), and shared by every train_embedder that reads the same rows, so the scaling sweep's
points convert the deduplicated rows once, not once per point. The key holds the input stage's fingerprint and
when its output was made, so a forced rerun of the input makes new triples.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from speed_ray.embedder.data import DataError, TRIPLE_COLUMNS, plan_batches, text_key, to_triple
from speed_ray.embedder.own_data import load_public
from speed_ray.store import StageOutput, StepMarkers, shards_at

ROW_COLUMNS = ["id", "task_type", "task", "query", "positive", "negative"]
MAX_EPOCH_FILES = 8          # epochs beyond this reuse epoch e % 8's batches (the paper trains one epoch)
_LIGHT = 0.25


def order_keys(ids, seed: int) -> np.ndarray:
    """uint64 order key of each id: the first 8 bytes of sha256("seed:id"), the order `select_rows` sorts by."""
    blob = b"".join(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8] for i in ids)
    return np.frombuffer(blob, dtype=">u8").astype(np.uint64)


@dataclass(frozen=True)
class FeedPlan:
    """What a training worker needs to read its batches (JSON in artifacts/feed/plan.json)."""

    url: str                  # artifacts/feed
    n_batches: int            # per epoch
    batch_size: int
    epochs: int               # epoch files written; epoch e reads e % epochs
    rows_per_file: int        # a multiple of batch_size
    summary: dict

    def file_url(self, epoch: int, index: int) -> str:
        return f"{self.url}/e{epoch:03d}/f{index:05d}.parquet"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "FeedPlan":
        return cls(**d)


class FeedReader:
    """A worker's reader: the rows of its slice of a step's global batch, read from that epoch file's row groups
    (one file open at a time; nothing else held)."""

    def __init__(self, plan: FeedPlan, rank: int = 0, world: int = 1):
        if plan.batch_size % world:
            raise ValueError(f"batch_size {plan.batch_size} is not a multiple of {world} workers")
        self.plan, self.rank, self.world = plan, rank, world
        self._open: tuple[str, pq.ParquetFile, np.ndarray, object] | None = None

    def batch(self, step: int) -> list[dict]:
        """This worker's rows of the global batch of `step` (rank r holds rows r*b .. (r+1)*b - 1 of it)."""
        p = self.plan
        epoch, b = divmod(step, p.n_batches)
        per = p.batch_size // self.world
        start = b * p.batch_size + self.rank * per
        index, offset = divmod(start, p.rows_per_file)
        return self._rows(p.file_url(epoch % p.epochs, index), offset, per)

    def _rows(self, url: str, offset: int, n: int) -> list[dict]:
        import fsspec

        if self._open is None or self._open[0] != url:
            self.close()
            f = fsspec.open(url, "rb").open()
            pf = pq.ParquetFile(f)
            starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
            self._open = (url, pf, starts, f)
        _, pf, starts, _ = self._open
        first = int(np.searchsorted(starts, offset, side="right") - 1)
        last = int(np.searchsorted(starts, offset + n, side="left"))
        table = pf.read_row_groups(list(range(first, last)), columns=list(TRIPLE_COLUMNS))
        rows = table.slice(offset - int(starts[first]), n).to_pylist()
        if len(rows) != n:
            raise DataError(f"{url}: expected {n} rows at {offset}, found {len(rows)} (feed files damaged?)")
        return rows

    def close(self) -> None:
        if self._open is not None:
            self._open[3].close()
            self._open = None


def write_feed_local(triples: list[dict], url: str, batch_size: int, one_task_per_batch: bool = True, seed: int = 0,
                     epochs: int = 1, rows_per_file: int | None = None, world: int = 1) -> FeedPlan:
    """The feed of a small in-memory training set, written in this process (no Ray): `make_batches` per epoch, in
    the same file layout the stage writes. For tests and small local data."""
    import os

    from speed_ray.embedder.data import make_batches

    n_batches = len(make_batches(triples, batch_size, one_task_per_batch, seed, 0))
    if n_batches == 0:
        raise DataError(f"{len(triples)} triples cannot fill one batch of {batch_size}")
    rows_per_file = rows_per_file or batch_size * max(1, 16384 // batch_size)
    for e in range(epochs):
        rows = [{c: t.get(c) for c in TRIPLE_COLUMNS}
                for b in make_batches(triples, batch_size, one_task_per_batch, seed, e) for t in b]
        for f, start in enumerate(range(0, len(rows), rows_per_file)):
            path = f"{url}/e{e:03d}/f{f:05d}.parquet"
            os.makedirs(os.path.dirname(path), exist_ok=True)
            table = pa.Table.from_pylist(rows[start:start + rows_per_file],
                                         schema=pa.schema([(c, pa.string()) for c in TRIPLE_COLUMNS]))
            pq.write_table(table, path, row_group_size=max(1, batch_size // world))
    return FeedPlan(url, n_batches, batch_size, epochs, rows_per_file, {"triples": len(triples)})


# ---- pass 1: triples with their order keys -----------------------------------------------------------------------
class _Triples:
    """map_batches UDF: sample rows -> triples (instruction applied), filtered by task type, with order keys."""

    def __init__(self, seed: int, task_types, symmetric, allow_pairs: bool = False):
        self.seed, self.task_types, self.symmetric = seed, tuple(task_types or ()), tuple(symmetric)
        self.allow_pairs = allow_pairs

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        return triples_table(rows, order_keys([r["id"] for r in rows], self.seed), self.task_types,
                             self.symmetric, "synthetic", self.allow_pairs)


def triples_table(rows: list[dict], keys: np.ndarray, task_types, symmetric, source: str,
                  allow_pairs: bool = False) -> pa.Table:
    """Triples of `rows` with their order keys; a row of another task type is left out, and a row without a
    query, positive or negative becomes a marker row (its id, no key, incomplete=1), so it counts, and a
    resumed pass does not count it twice."""
    keep = set(task_types or ())
    cols: dict[str, list] = {c: [] for c in TRIPLE_COLUMNS}
    out_keys, incomplete = [], []
    for r, k in zip(rows, keys.tolist()):
        if keep and r.get("task_type") not in keep:
            continue
        t = to_triple(r, symmetric, source, allow_pairs)
        for c in TRIPLE_COLUMNS:
            cols[c].append(t[c] if t is not None else (str(r.get("id")) if c == "id" else None))
        out_keys.append(k if t is not None else None)
        incomplete.append(0 if t is not None else 1)
    table = {c: pa.array(v, pa.string()) for c, v in cols.items()}
    pair = [neg is None and not bad for neg, bad in zip(cols["negative"], incomplete)]
    hashes = {f"h{c[0]}": pa.array([text_key(v) if v and not bad else 0 for v, bad in zip(cols[c], incomplete)],
                                    pa.uint64()) for c in ("query", "positive", "negative")}
    return pa.table({**table, "key": pa.array(out_keys, pa.uint64()), "incomplete": pa.array(incomplete, pa.int8()),
                     "pair": pa.array(pair, pa.bool_()), **hashes})


def _public_task(path: str, seed: int, symmetric: tuple, out: StageOutput, allow_pairs: bool = False) -> int:
    """Ray task: public data -> triples shards (source "public"). Public ids may repeat, so a public row's key
    hashes its id and its row number."""
    rows = load_public(path)
    chunk, n = 50_000, 0
    for s in range(0, len(rows), chunk):
        part = rows[s:s + chunk]
        keys = order_keys([f"{r['id']}#{s + i}" for i, r in enumerate(part)], seed)
        n += out.write_shard(f"public-{s // chunk:05d}", triples_table(part, keys, None, symmetric, "public",
                                                                         allow_pairs))
    return n


# ---- pass 2: selection and the batch plan --------------------------------------------------------------------------
def plan_feed(t: pa.Table, cfg: dict, seed: int) -> tuple[dict, np.ndarray | None, list[np.ndarray]]:
    """Which triples train and where each goes, from the triples' (key, task_type, source, incomplete) columns.

    Returns (info, sorted keys, positions): info has the data summary, n_batches and epochs; the keys are the
    selected triples' sorted; positions[e][i] is the row of the triple with key i in epoch e's stream (-1: in no
    batch). cfg: n_samples, public_fraction, batch_size, one_task_per_batch, epochs, max_steps."""
    incomplete = int(pc.sum(t.column("incomplete")).as_py() or 0)
    t = t.filter(pc.is_valid(t.column("key")))
    keys = t.column("key").to_numpy()
    is_pair = (t.column("pair").to_numpy(zero_copy_only=False) if "pair" in t.column_names
               else np.zeros(len(keys), dtype=bool))
    if len(np.unique(keys)) != len(keys):
        raise DataError(f"{len(keys) - len(np.unique(keys))} training rows share an id: ids must be unique")
    types = np.array(t.column("task_type").to_pylist(), dtype=object)
    public = pc.equal(t.column("source"), "public").to_numpy(zero_copy_only=False)
    syn = np.flatnonzero(~public)
    syn = syn[np.argsort(keys[syn], kind="stable")]
    n_in = len(syn)
    if cfg.get("n_samples") is not None:
        syn = syn[:cfg["n_samples"]]
    pub = np.flatnonzero(public)[:0]
    if cfg.get("public_fraction", 0) > 0:
        want = round(len(syn) * cfg["public_fraction"] / (1 - cfg["public_fraction"]))
        pub = np.flatnonzero(public)
        pub = pub[np.argsort(keys[pub], kind="stable")][:want]
    canon = np.concatenate([syn, pub]).astype(np.int64)   # canonical order: selected rows by key, then public
    canon_types = list(types[canon])
    canon_pairs = is_pair[canon].tolist() if is_pair[canon].any() else None
    shared = _shared(t, canon) if cfg.get("no_duplicate_texts", True) else None
    counts: dict[str, int] = {}
    for tt in canon_types:
        counts[tt] = counts.get(tt, 0) + 1
    summary = {"rows_in": n_in + incomplete, "rows_selected": len(syn), "rows_dropped_incomplete": incomplete,
               "public_rows": len(pub), "triples": len(canon), "pairs": int(sum(canon_pairs or [])),
               "per_task_type": counts}
    b = cfg["batch_size"]
    plan0 = plan_batches(canon_types, b, cfg["one_task_per_batch"], seed, 0, canon_pairs, shared)
    n_batches = len(plan0)
    info = {"summary": summary, "n_batches": n_batches, "epochs": 0}
    if n_batches == 0:
        return info, None, []
    total = cfg["max_steps"] if cfg["max_steps"] > 0 else max(1, math.ceil(n_batches * cfg["epochs"]))
    info["epochs"] = epochs = min(MAX_EPOCH_FILES, max(1, math.ceil(total / n_batches)))
    order = np.argsort(keys[canon], kind="stable")
    positions = []
    for e in range(epochs):
        batches = plan0 if e == 0 else plan_batches(canon_types, b, cfg["one_task_per_batch"], seed, e, canon_pairs,
                                                                 shared)
        pos = np.full(len(canon), -1, dtype=np.int64)
        flat = np.asarray(batches, dtype=np.int64).reshape(-1)
        pos[flat] = np.arange(len(flat), dtype=np.int64)
        positions.append(pos[order])
    return info, keys[canon][order], positions


def _shared(t: pa.Table, canon: np.ndarray) -> dict[int, frozenset] | None:
    """plan_batches' `shared` over the canonical order, from the text-key columns: only the rows with a text that
    occurs in another row."""
    if "hq" not in t.column_names:
        return None
    h = np.stack([t.column(c).to_numpy(zero_copy_only=False) for c in ("hq", "hp", "hn")], axis=1)[canon]
    flat = h.reshape(-1)
    u, counts = np.unique(flat[flat != 0], return_counts=True)
    dup = u[counts > 1]
    if not len(dup):
        return None
    rows = np.flatnonzero(np.isin(h, dup).any(axis=1))
    return {int(i): frozenset(int(x) for x in h[i] if x) for i in rows}


def _plan_task(triples: StageOutput, cfg: dict, seed: int):
    """Ray task (3 returns): plan_feed over the triples shards' small columns."""
    return plan_feed(triples.read_table(columns=["key", "task_type", "source", "incomplete", "pair", "hq", "hp",
                                                 "hn"]), cfg, seed)


# ---- pass 3: scatter rows to their epoch files ---------------------------------------------------------------------
class _Scatter:
    """map_batches UDF: each triple, to the part files of the epoch files that hold it (with its position)."""

    def __init__(self, keys_ref, pos_ref, rows_per_file: int, out: StageOutput):
        self.keys_ref, self.pos_ref, self.rows_per_file, self.out = keys_ref, pos_ref, rows_per_file, out

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        from speed_ray.streaming import shard_name_for

        batch = batch.filter(pc.is_valid(batch.column("key")))
        if batch.num_rows == 0:
            return pa.table({"rows": pa.array([], pa.int64())})
        keys, positions = ray.get(self.keys_ref), ray.get(self.pos_ref)
        k = batch.column("key").to_numpy()
        i = np.minimum(np.searchsorted(keys, k), len(keys) - 1)
        hit = keys[i] == k
        written = 0
        name = shard_name_for([str(x) for x in k.tolist()], "part")
        for e, pos_all in enumerate(positions):
            pos = np.where(hit, pos_all[i], -1)
            sel = np.flatnonzero(pos >= 0)
            files = pos[sel] // self.rows_per_file
            for f in np.unique(files):
                rows = sel[files == f]
                part = batch.take(pa.array(rows)).select(list(TRIPLE_COLUMNS)).append_column(
                    "pos", pa.array(pos[rows], pa.int64()))
                sub = shards_at(self.out, "feed_parts", f"e{e:03d}", f"f{int(f):05d}")
                written += sub.write_shard(name, part)
        return pa.table({"rows": [written]})


# ---- pass 4: one file per epoch and index, in batch order ----------------------------------------------------------
def _gather_task(parts: StageOutput, url: str, first: int, n: int, row_group: int) -> int:
    table = parts.read_table() if parts.shard_names() else None
    if table is None or table.num_rows != n:
        raise DataError(f"feed file {url}: expected {n} rows, the scatter wrote "
                        f"{0 if table is None else table.num_rows}")
    table = table.take(pc.sort_indices(table.column("pos")))
    pos = table.column("pos").to_numpy()
    if not np.array_equal(pos, np.arange(first, first + n)):
        raise DataError(f"feed file {url}: rows out of place (positions {pos[:3]}...)")
    from speed_ray.store import _atomic_write_parquet

    _atomic_write_parquet(parts.fs, parts._path(url), table.drop_columns(["pos"]), row_group)
    return n


TRIPLES_STAGE = "_embedder_triples"


def triples_output(source: StageOutput, cfg, seed: int) -> StageOutput:
    """The shared output for the triples of `source` (the input stage's output) under cfg's conversion settings:
    same input and settings, same place, whatever the batching. Its step marker "triples" names the finished
    triples shards ({"url": ...}); triples_url reads it."""
    from speed_ray.store import stable_hash

    made = source.manifest.get("started_at") if source.done else None
    key = stable_hash({"input": [source.stage, source.fingerprint, made],
                       "seed": seed, "task_types": list(cfg.task_types or ()),
                       "symmetric": list(cfg.symmetric_task_types), "pairs": bool(cfg.train_pairs),
                       "public": [cfg.public_data, cfg.public_fraction > 0] if cfg.public_fraction > 0 else None})
    return StageOutput(source.run_dir, TRIPLES_STAGE, f"{source.fingerprint}-{key[:12]}")


def triples_url(source: StageOutput, cfg, seed: int) -> str | None:
    """Where the finished triples of `source` under cfg's settings are, or None before pass 1 has finished."""
    made = StepMarkers(triples_output(source, cfg, seed)).get("triples")
    return made["url"] if made else None


def prepare_feed(ctx, cfg, seed: int) -> FeedPlan:
    """Passes 1-4 for the train_embedder stage's context (cfg: its EmbedderConfig); returns the plan. A killed
    stage resumes: pass 1 from its shards, the others from their step markers."""
    import ray

    from speed_ray.store import _atomic_write_bytes
    from speed_ray.streaming import done_set, filter_pending, write_stream

    out = ctx.out
    steps = StepMarkers(out)
    shared = triples_output(ctx.inputs["data"], cfg, seed)
    shared_steps = StepMarkers(shared)
    plan_url = out.artifact("feed", "plan.json")
    made = shared_steps.get("triples")
    if made is None:
        # This stage's own directory under the shared output: concurrent sweep points that race here each write
        # complete, identical triples, and the marker names either; a killed stage resumes into its own.
        triples = shards_at(shared, "triples", out.fingerprint)
        ds = filter_pending(ctx.inputs["data"].ray_dataset(columns=list(ROW_COLUMNS)), done_set(triples))
        udf = _Triples(seed, cfg.task_types, cfg.symmetric_task_types, cfg.train_pairs)
        write_stream(ds.map_batches(udf, batch_format="pyarrow", batch_size=4096, num_cpus=_LIGHT), triples,
                     rows_per_shard=16384, prefix="part")
        if cfg.public_fraction > 0:
            ray.get(ray.remote(num_cpus=_LIGHT)(_public_task).remote(
                cfg.public_data, seed, tuple(cfg.symmetric_task_types), triples, cfg.train_pairs))
        shared_steps.mark("triples", {"url": triples.data_url, "shards": len(triples.shard_names()),
                                      "made_by": out.url})
    else:
        triples = shards_at(shared)
        triples.data_url = made["url"]
        if steps.get("triples") is None:
            ctx.log("reusing the triples at %s (made by %s)", made["url"], made.get("made_by"))
    if steps.get("triples") is None:
        steps.mark("triples", {"shared": triples.data_url})

    if steps.get("feed") is None:
        plan_cfg = {"n_samples": cfg.n_samples, "public_fraction": cfg.public_fraction, "batch_size": cfg.batch_size,
                    "one_task_per_batch": cfg.one_task_per_batch, "epochs": cfg.epochs, "max_steps": cfg.max_steps,
                    "no_duplicate_texts": cfg.no_duplicate_texts}
        info_ref, keys_ref, pos_ref = ray.remote(num_cpus=1, num_returns=3)(_plan_task).remote(triples, plan_cfg,
                                                                                             seed)
        info = ray.get(info_ref)
        summary, n_batches, epochs = info["summary"], info["n_batches"], info["epochs"]
        if n_batches == 0:
            raise DataError(f"{summary['triples']} usable triples cannot fill one batch of embedder.batch_size="
                            f"{cfg.batch_size} (after n_samples/task_types filters: {summary}); lower batch_size")
        b = cfg.batch_size
        rows_per_file = b * max(1, 16384 // b)
        parts_url = out.artifact("feed_parts")
        if out.fs.exists(out._path(parts_url)):   # a killed scatter starts over (its output is derived)
            out.fs.rm(out._path(parts_url), recursive=True)
        ds = triples.ray_dataset(columns=list(TRIPLE_COLUMNS) + ["key"])
        scatter = _Scatter(keys_ref, pos_ref, rows_per_file, out)
        for _ in ds.map_batches(scatter, batch_format="pyarrow", batch_size=16384, num_cpus=_LIGHT).iter_rows():
            pass
        feed_url = out.artifact("feed")
        total_rows = n_batches * b
        gather = ray.remote(num_cpus=_LIGHT)(_gather_task)
        tasks = []
        for e in range(epochs):
            for f in range(math.ceil(total_rows / rows_per_file)):
                n = min(rows_per_file, total_rows - f * rows_per_file)
                tasks.append(gather.remote(shards_at(out, "feed_parts", f"e{e:03d}", f"f{f:05d}"),
                                           f"{feed_url}/e{e:03d}/f{f:05d}.parquet", f * rows_per_file, n,
                                           max(1, b // cfg.num_workers)))
        ray.get(tasks)
        out.fs.rm(out._path(parts_url), recursive=True)
        plan = FeedPlan(feed_url, n_batches, b, epochs, rows_per_file, summary)
        _atomic_write_bytes(out.fs, out._path(plan_url), plan.to_json().encode())
        steps.mark("feed", {"n_batches": n_batches, "epochs": epochs})
    with out.fs.open(out._path(plan_url), "r") as f:
        return FeedPlan.from_dict(json.load(f))
