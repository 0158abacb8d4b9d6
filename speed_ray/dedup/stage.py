"""The dedup stage on Ray: signatures -> buckets -> clusters -> apply, each sub-step resumable from the store.

The layout follows datatrove's MinHash pipeline (signature, buckets, cluster, filter steps that each write
their own output, https://github.com/huggingface/datatrove/blob/main/src/datatrove/pipeline/dedup/minhash.py):

    artifacts/signatures/*.parquet         id, filter_reason, exact_hash     (one shard per input batch)
    artifacts/bucket_rows/p=NNNNN/*.parquet band, key, id                    (hash-partitioned by key: the shuffle)
    artifacts/edges/pNNNNN.parquet          src, dst, exact                   (candidate pairs, per partition)
    artifacts/clusters/*.parquet            id, id_hash, dedup_cluster, duplicate_of, removed_reason  (only
                                            removed or clustered ids, sorted by id_hash: the table every apply
                                            worker gets from the object store)
    artifacts/removed/*.parquet             removed rows + removed_reason, duplicate_of, dedup_cluster  (one pass
    data/*.parquet                          kept rows + dedup_cluster (lineage.dedup_cluster too)   writes both)
    artifacts/steps/<step>.json             a step's completion marker, written after its outputs

Nothing that grows with the number of rows passes through the driver: the workers write every shard, the
connected components and the removal table are built in a Ray task (memory follows the candidate pairs, i.e.
the duplicates, not N), and resume filters use `speed_ray.streaming.done_set` (id hashes in the object store).
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from speed_ray.config import to_dict
from speed_ray.dedup.components import clusters
from speed_ray.dedup.filters import filter_reasons, langid_classifier
from speed_ray.dedup.lsh import band_hashes, band_layout, bucket_edges, bucket_rows, partition_of
from speed_ray.dedup.minhash import exact_hashes, join_fields, normalize, signatures
from speed_ray.store import StageOutput, StepMarkers, shards_at
from speed_ray.streaming import done_set, filter_pending, id_hashes, shard_name_for
from speed_ray.synth.samples import with_lineage

STEPS = ("signatures", "buckets", "clusters", "removed")
_LIGHT = 0.25  # CPUs for I/O-bound Ray tasks, so a 2-CPU cluster keeps room for the CPU-bound ones
_HEAVY = 1     # CPUs for the CPU-bound passes (signatures, apply); their reads ask for as much, so they fuse


class _Signatures:
    """map_batches UDF: quality reasons, exact hash and band keys for one batch, written from the worker."""

    def __init__(self, sig_out: StageOutput, bucket_outs: list[StageOutput], fields, ngram, num_perm, seed,
                 bands, rows, exact, near, rules):
        self.sig_out, self.bucket_outs = sig_out, bucket_outs
        self.fields, self.ngram, self.num_perm, self.seed = fields, ngram, num_perm, seed
        self.bands, self.rows, self.exact, self.near, self.rules = bands, rows, exact, near, rules
        self._lang = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        if batch.num_rows == 0:
            return pa.table({"rows": pa.array([], pa.int64())})
        cols = {c: batch.column(c).to_pylist()
                for c in {"query", "positive", "negative", "valid", "task", "task_type", *self.fields}
                if c in batch.column_names}
        if self.rules.get("language") and self._lang is None:
            self._lang = langid_classifier()
        reasons = filter_reasons(cols, self.rules, self._lang)
        keep = np.array([r is None for r in reasons])
        texts = [normalize(t) for t in join_fields(cols, self.fields)]
        ids = batch.column("id").combine_chunks()
        ex = exact_hashes(texts, normalized=True)
        keys = (band_hashes(signatures(texts, self.num_perm, self.seed, self.ngram, normalized=True), self.bands,
                            self.rows) if self.near else np.empty((len(texts), 0), np.uint64))
        brows = bucket_rows(ids, keys, ex if self.exact else None, keep)
        name = shard_name_for(ids.to_pylist(), "sig")
        if brows.num_rows:
            part = partition_of(brows.column("key").to_numpy(), len(self.bucket_outs))
            for p in np.unique(part):
                self.bucket_outs[p].write_shard(name, brows.filter(pa.array(part == p)))
        # Written last: a batch is done (and skipped on resume) only when its bucket rows are on disk.
        self.sig_out.write_shard(name, pa.table({"id": ids, "filter_reason": pa.array(reasons, pa.string()),
                                                 "exact_hash": ex}))
        return pa.table({"rows": [batch.num_rows]})


def _bucket_partition(part: StageOutput, edges: StageOutput, name: str) -> int:
    """One partition of the shuffle: every (band, key) bucket lies wholly in it, so its pairs are final."""
    e = bucket_edges(part.read_table())
    edges.write_shard(name, e)
    return e.num_rows


def _clusters_step(edges: StageOutput, sig_out: StageOutput, cl_out: StageOutput) -> dict:
    """Ray task: connected components over all candidate pairs plus the filter rejects, written as the removal
    table (one shard, sorted by id hash). Runs in a worker; its memory follows the pairs and rejects, not N."""
    cl = clusters(edges.read_table()) if edges.shard_names() else None
    rejected = pa.concat_tables(  # streamed: only the rejected ids stay in memory
        [pa.Table.from_batches([b]).filter(pc.is_valid(b.column(1)))
         for b in sig_out.iter_batches(batch_size=65536, columns=["id", "filter_reason"])])
    tables = [pa.table({"id": rejected.column("id"), "dedup_cluster": rejected.column("id"),
                        "duplicate_of": pa.nulls(rejected.num_rows, rejected.schema.field("id").type),
                        "removed_reason": rejected.column("filter_reason")})]
    if cl is not None and cl.num_rows:
        tables.append(cl.cast(tables[0].schema))
    table = pa.concat_tables(tables).combine_chunks()
    h = id_hashes(table.column("id"))
    order = np.argsort(h, kind="stable")
    table = table.take(pa.array(order)).append_column("id_hash", pa.array(h[order], pa.uint64()))
    for old in cl_out.shard_names():
        cl_out.fs.rm(cl_out._path(cl_out.shard_url(old)))
    cl_out.write_shard("removal", table)
    n_clusters = 0 if cl is None else int(pc.sum(pc.is_null(cl.column("duplicate_of"))).as_py() or 0)
    return {"clusters": n_clusters, "clustered_ids": 0 if cl is None else cl.num_rows,
            "removal_rows": table.num_rows}


def _removal_table(cl_out: StageOutput) -> pa.Table:
    """Ray task: the removal table, one chunk per column, for the object store (never fetched by the driver)."""
    table = cl_out.read_table().combine_chunks()
    if "id_hash" not in table.column_names:  # written before the table carried its hashes
        h = id_hashes(table.column("id"))
        order = np.argsort(h, kind="stable")
        table = table.take(pa.array(order)).append_column("id_hash", pa.array(h[order], pa.uint64()))
    return table


class _Apply:
    """map_batches UDF, the last pass: looks each id of a batch up in the removal table (binary search over its
    sorted id hashes, then an exact id check) and writes, from the worker, the batch's removed rows to
    artifacts/removed/ and then its kept rows to data/, both shards named by the batch's ids. A rerun filters out
    ids found in either place, so a batch killed between its two writes completes without repeating a row."""

    def __init__(self, table_ref, kept: StageOutput, removed: StageOutput):
        self.table_ref, self.kept, self.removed = table_ref, kept, removed

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        if batch.num_rows == 0:
            return pa.table({"kept": pa.array([], pa.int64()), "removed": pa.array([], pa.int64())})
        table = ray.get(self.table_ref)
        ids = batch.column("id")
        th = table.column("id_hash").to_numpy()
        if len(th):
            h = id_hashes(ids)
            pos = np.minimum(np.searchsorted(th, h), len(th) - 1)
            hit = th[pos] == h
            hit &= pc.equal(table.column("id").take(pa.array(pos)), ids).to_numpy(zero_copy_only=False)
            idx = pa.array(pos, mask=~hit)
        else:
            idx = pa.nulls(batch.num_rows, pa.int64())
        reason = table.column("removed_reason").take(idx)
        name = shard_name_for(ids.to_pylist(), "part")
        gone = pc.is_valid(reason)
        rem = self._rows(batch.filter(gone), table, idx.filter(gone))
        rem = rem.append_column("removed_reason", reason.filter(gone)).append_column(
            "duplicate_of", table.column("duplicate_of").take(idx.filter(gone)))
        if rem.num_rows:   # removed first: a batch counts as done only where its rows landed
            self.removed.write_shard(name, rem)
        keep = pc.invert(gone)
        kept = self._rows(batch.filter(keep), table, idx.filter(keep))
        if kept.num_rows:
            self.kept.write_shard(name, kept)
        return pa.table({"kept": [kept.num_rows], "removed": [rem.num_rows]})

    @staticmethod
    def _rows(batch: pa.Table, table: pa.Table, idx: pa.Array) -> pa.Table:
        """The rows with dedup_cluster (their cluster's representative, else themselves), also in the lineage."""
        cluster = pc.coalesce(table.column("dedup_cluster").take(idx), batch.column("id"))
        lineage = batch.column("lineage").to_pylist() if "lineage" in batch.column_names else [None] * len(batch)
        lineage = [_with_cluster(lin, c) for lin, c in zip(lineage, cluster.to_pylist())]
        out = batch.drop_columns([c for c in ("lineage", "dedup_cluster") if c in batch.column_names])
        return out.append_column("lineage", pa.array(lineage, pa.string())).append_column("dedup_cluster", cluster)


def _with_cluster(lineage: str | None, cluster) -> str:
    return with_lineage(lineage, "dedup_cluster", cluster)


def num_partitions(n_docs: int, keys_per_doc: int, rows_per_partition: int) -> int:
    return max(1, math.ceil(n_docs * keys_per_doc / rows_per_partition))


def _reason_counts(out: StageOutput, column: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for batch in out.iter_batches(batch_size=65536, columns=[column]):
        for item in pc.value_counts(batch.column(0)).to_pylist():
            if item["values"] is not None:
                counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    return dict(sorted(counts.items()))


def dedup_stage(ctx) -> dict:
    """Exact + MinHash-LSH dedup and quality filters over `samples`; kept rows to data/, removed to artifacts."""
    import ray

    dcfg, rules = ctx.cfg.dedup, to_dict(ctx.cfg.filters)
    src: StageOutput = ctx.inputs["samples"]
    if rules.get("language"):
        langid_classifier()  # fail before any work when the language id package is missing
    layout = band_layout(dcfg.threshold, dcfg.num_perm, dcfg.bands, dcfg.rows)
    n_in = src.num_rows()
    if n_in == 0:
        raise ValueError(f"dedup got no input rows: {src} has no data shards at {src.data_url}")
    columns = next(src.iter_batches(batch_size=1)).schema.names
    missing = [c for c in ("id", "query", "positive", *dcfg.fields) if c not in columns]
    if missing:
        raise ValueError(f"dedup: the samples lack column(s) {missing} (dedup.fields={list(dcfg.fields)}; "
                         f"columns: {columns})")
    steps = StepMarkers(ctx.out)
    keys_per_doc = (layout["bands"] if dcfg.near else 0) + (1 if dcfg.exact else 0)
    n_parts = num_partitions(n_in, keys_per_doc, dcfg.bucket_partition_rows)
    sig_out = shards_at(ctx.out, "signatures")
    bucket_outs = [shards_at(ctx.out, "bucket_rows", f"p={p:05d}") for p in range(n_parts)]
    edges_out = shards_at(ctx.out, "edges")
    cl_out = shards_at(ctx.out, "clusters")
    removed_out = shards_at(ctx.out, "removed")

    if steps.get("signatures") is None:
        t0 = time.time()
        ds = filter_pending(src.ray_dataset(num_cpus=_HEAVY), done_set(sig_out))
        udf = _Signatures(sig_out, bucket_outs, tuple(dcfg.fields), dcfg.ngram, dcfg.num_perm, dcfg.seed,
                          layout["bands"], layout["rows"], dcfg.exact, dcfg.near, rules)
        done = sum(int(r["rows"]) for r in ds.map_batches(udf, batch_size=dcfg.batch_size, batch_format="pyarrow",
                                                            zero_copy_batch=True, num_cpus=_HEAVY).iter_rows())
        steps.mark("signatures", {"rows": sig_out.num_rows(), "rows_this_run": done, "partitions": n_parts}, t0)
        ctx.log("signatures: %d rows, %d bucket partition(s)", n_in, n_parts)

    if steps.get("buckets") is None:
        t0 = time.time()
        task = ray.remote(num_cpus=1)(_bucket_partition)
        todo = [p for p in range(n_parts) if not edges_out.has_shard(f"p{p:05d}")]
        pending = [task.remote(bucket_outs[p], edges_out, f"p{p:05d}") for p in todo
                   if bucket_outs[p].shard_names()]
        pairs = sum(ray.get(pending))
        steps.mark("buckets", {"partitions": n_parts, "pairs_this_run": pairs}, t0)

    if steps.get("clusters") is None:
        t0 = time.time()
        # Removal table: every id a later step must drop or relabel; far smaller than N (only dups + rejects).
        info = ray.get(ray.remote(num_cpus=1)(_clusters_step).remote(edges_out, sig_out, cl_out))
        steps.mark("clusters", info, t0)
        ctx.log("clusters: %d clusters over %d ids; %d ids to remove or relabel", info["clusters"],
                info["clustered_ids"], info["removal_rows"])

    if steps.get("removed") is None:   # the apply pass: kept rows to data/, removed ones to artifacts/removed/
        t0 = time.time()
        table_ref = ray.remote(num_cpus=_LIGHT)(_removal_table).remote(cl_out)  # stays in the object store
        ds = filter_pending(src.ray_dataset(num_cpus=_HEAVY), done_set(ctx.out, removed_out))
        written = {"kept": 0, "removed": 0}
        for row in ds.map_batches(_Apply(table_ref, ctx.out, removed_out), batch_format="pyarrow",
                                  batch_size=dcfg.batch_size, zero_copy_batch=True, num_cpus=_HEAVY).iter_rows():
            for k in written:   # one small row per batch: counts only
                written[k] += int(row[k])
        steps.mark("removed", {f"{k}_this_run": v for k, v in written.items()}, t0)

    reasons = _reason_counts(removed_out, "removed_reason")
    n_out = ctx.out.num_rows()
    if n_out == 0 and n_in > 0:   # only rejects written: never a success (what was written stays for a look)
        from speed_ray.errors import DataError

        top = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])[:5])
        raise DataError(f"dedup kept none of the {n_in} rows of {src.stage} (removed: {top}); the removed rows "
                        f"and their reasons are at {removed_out.data_url}. Loosen the filters (section "
                        f"`filters`) or fix the input.")
    return {
        "dedup": {"rows_in": n_in, "rows_out": n_out, "removed": sum(reasons.values()),
                  "exact_duplicates": reasons.pop("exact_duplicate", 0),
                  "near_duplicates": reasons.pop("near_duplicate", 0),
                  "clusters": steps.get("clusters")["clusters"], "filtered": reasons,
                  "band_layout": layout, "bucket_partitions": n_parts, "fields": list(dcfg.fields),
                  "removed_url": removed_out.data_url},
    }
