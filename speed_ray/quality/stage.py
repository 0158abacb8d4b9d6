"""The screen stage on Ray: deduplicated rows -> decontamination + guide scores -> kept rows (with their scores) to
data/, removed rows to artifacts/removed/ (removed_reason, removed_detail), as the dedup stage writes them.

    data/*.parquet              kept rows + guide_pos_score, guide_neg_score, guide_margin (lineage.screen too)
    artifacts/removed/*.parquet removed rows + removed_reason ("contaminated" | "false_negative"), removed_detail
                                (JSON: the scores, or the evaluation task and text matched), decontam_task

One Ray Data map_batches over an actor pool: each actor loads the guide once and holds the decontamination index
(built once in a Ray task, shared through the object store). Resumable: both outputs' shards are named by their
batch's ids, and a rerun filters out ids found in either.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from speed_ray.quality.scores import SCORE_COLUMNS, summarize
from speed_ray.quality.screen import ScreenSettings, screen_batch
from speed_ray.errors import DataError
from speed_ray.store import StageOutput, shards_at
from speed_ray.streaming import done_set, filter_pending, shard_name_for
from speed_ray.synth.samples import with_lineage

_LIGHT = 0.25
_READ = ("id", "task", "task_type", "query", "positive", "negative")


def _lineage(lineage: str | None, screen) -> str:
    return with_lineage(lineage, "screen", screen)


class _Screen:
    """map_batches UDF (an actor): screens a batch and writes its removed rows, then its kept rows."""

    def __init__(self, kept: StageOutput, removed: StageOutput, guide_path: str | None, guide_kind: str,
                 max_length: int, threads: int, index_ref, settings: ScreenSettings, guide_name: str,
                 corpus_ref=None):
        import ray

        from speed_ray.quality.guide import Guide

        self.kept, self.removed, self.s, self.guide_name = kept, removed, settings, guide_name
        self.guide = Guide(guide_path, guide_kind, max_length, threads) if guide_path else None
        self.index = ray.get(index_ref) if index_ref is not None else None
        self.corpus = ray.get(corpus_ref) if corpus_ref is not None else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        if batch.num_rows == 0:
            return pa.table({"kept": pa.array([], pa.int64()), "removed": pa.array([], pa.int64())})
        cols = {c: batch.column(c).to_pylist() for c in _READ if c in batch.column_names}
        v = screen_batch(cols, self.guide, self.index, self.s, self.corpus)
        lineage = batch.column("lineage").to_pylist() if "lineage" in batch.column_names else [None] * batch.num_rows
        screen = [{"guide": self.guide_name, "pos": p, "neg": n, **(d or {})}
                  for p, n, d in zip(v["pos"], v["neg"], v["detail"])]
        out = batch.drop_columns([c for c in ("lineage", "negative", *SCORE_COLUMNS) if c in batch.column_names])
        out = out.append_column("negative", pa.array(v["negative"], pa.string()))
        out = out.append_column("lineage", pa.array([_lineage(lin, s) for lin, s in zip(lineage, screen)],
                                                    pa.string()))
        for name, key in zip(SCORE_COLUMNS, ("pos", "neg", "margin")):
            out = out.append_column(name, pa.array(v[key], pa.float64()))
        reason = pa.array(v["reason"], pa.string())
        gone = pc.is_valid(reason)
        name = shard_name_for(cols["id"], "part")
        rem = out.filter(gone)
        if rem.num_rows:   # removed first: a batch counts as done only where its rows landed
            detail = [json.dumps(d, ensure_ascii=False) for d, r in zip(v["detail"], v["reason"]) if r]
            task = [(d or {}).get("contaminated", {}).get("task") for d, r in zip(v["detail"], v["reason"]) if r]
            rem = rem.append_column("removed_reason", reason.filter(gone)).append_column(
                "removed_detail", pa.array(detail, pa.string())).append_column("decontam_task",
                                                                            pa.array(task, pa.string()))
            self.removed.write_shard(name, rem)
        kept = out.filter(pc.invert(gone))
        if kept.num_rows:
            self.kept.write_shard(name, kept)
        return pa.table({"kept": [kept.num_rows], "removed": [rem.num_rows]})


def _build_index(local_tasks, data_root, hub_tasks, benchmark, ngram, shingle, num_perm, threshold, min_ngram):
    """Ray task: the decontamination index of the evaluation texts, and what was skipped."""
    from speed_ray.dedup.lsh import band_layout
    from speed_ray.quality.decontam import build_index
    from speed_ray.quality.eval_texts import evaluation_texts

    texts, skipped = evaluation_texts(local_tasks, data_root, hub_tasks, benchmark)
    layout = band_layout(threshold, num_perm)
    index = build_index(texts, ngram, shingle, num_perm, 1, layout["bands"], layout["rows"], min_ngram)
    return index, {"tasks": {t: len(v) for t, v in texts.items()}, "skipped": skipped, "texts": len(index)}


def _corpus_texts(source, path: str | None):
    """The distinct non-empty texts to mine from: a file's `text` (else `positive`) column, or the input's
    positives and negatives."""
    seen: dict[str, None] = {}
    if path:
        from speed_ray.datafiles import input_files, record_batches

        fmt, files = input_files(path)
        for f in files:
            for b in record_batches(fmt, f):
                if not isinstance(b, pa.RecordBatch):   # JSONL: a list of dicts
                    b = pa.RecordBatch.from_pylist(b.rows)
                col = "text" if "text" in b.schema.names else "positive" if "positive" in b.schema.names else None
                if col is None:
                    raise DataError(f"mining corpus {f}: no `text` or `positive` column (columns: {b.schema.names})")
                seen.update((t, None) for t in b.column(col).to_pylist() if t and t.strip())
        return list(seen)
    names = next(source.iter_batches(batch_size=1)).schema.names
    for b in source.iter_batches(batch_size=65536, columns=[c for c in ("positive", "negative") if c in names]):
        for c in range(b.num_columns):
            seen.update((t, None) for t in b.column(c).to_pylist() if t and t.strip())
    return list(seen)


def _build_corpus(source, path, guide_path, guide_kind, max_length, threads, index_ref, fields_settings):
    """Ray task: the mining corpus's texts (contaminated ones left out) and their guide embeddings."""
    import numpy as np
    import ray

    from speed_ray.quality.decontam import row_hits
    from speed_ray.quality.guide import Guide
    from speed_ray.quality.screen import Corpus

    texts = _corpus_texts(source, path)
    dropped = 0
    if index_ref is not None:
        index = ray.get(index_ref)
        ngram_t, minhash_t = fields_settings
        hits = row_hits(index, {"text": texts}, ("text",), ngram_t, minhash_t)
        dropped = sum(h is not None for h in hits)
        texts = [t for t, h in zip(texts, hits) if h is None]
    guide = Guide(guide_path, guide_kind, max_length, threads)
    emb = [guide.embed(texts[i:i + 4096]).astype(np.float32) for i in range(0, len(texts), 4096)]
    emb = np.concatenate(emb) if emb else np.zeros((0, 1), np.float32)
    return Corpus(tuple(texts), emb, path or "own"), {"texts": len(texts), "contaminated_left_out": dropped,
                                                      "source": path or "own"}


def _counts(out: StageOutput, column: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    if not out.shard_names():
        return counts
    for batch in out.iter_batches(batch_size=65536, columns=[column]):
        for item in pc.value_counts(batch.column(0)).to_pylist():
            if item["values"] is not None:
                counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    return dict(sorted(counts.items()))


def _summary(out: StageOutput) -> dict:
    """Ray task: the quality summary (quantiles of the kept rows' scores per task type)."""
    t = out.read_table(columns=["task_type", *SCORE_COLUMNS])
    return summarize(t.column("task_type").to_pylist(), {c: t.column(c).to_pylist() for c in SCORE_COLUMNS})


def screen_stage(ctx) -> dict:
    """Hard-negative screening and decontamination of `samples`; kept rows (with scores) to data/."""
    import ray

    from speed_ray.models.offline import resolve_model
    from speed_ray.raylocal import ensure_ray
    from speed_ray.threads import worker_threads

    c, ev = ctx.cfg.screen, ctx.cfg.evaluate
    src: StageOutput = ctx.inputs["samples"]
    n_in = src.num_rows()
    if n_in == 0:
        raise DataError(f"screen got no input rows: {src} has no data shards at {src.data_url}")
    columns = next(src.iter_batches(batch_size=1)).schema.names
    missing = [k for k in ("id", "query", "positive") if k not in columns]
    if missing:
        raise DataError(f"screen: the samples at {src.data_url} lack column(s) {missing} (columns: {columns})")
    ensure_ray(ctx.cfg.run.ray_address, ctx.cfg.run.num_cpus)
    guide_name = (c.guide_model or ctx.cfg.embedder.base_model) if c.enabled else None
    guide_path = resolve_model(guide_name) if guide_name else None
    index_ref, decontam = None, {"enabled": False}
    if c.enabled and c.decontaminate:
        index_ref = ray.remote(num_cpus=_LIGHT)(_build_index).options(num_returns=2).remote(
            tuple(ev.local_tasks), ev.data_root, tuple(ev.tasks), ev.benchmark, c.decontam_ngram,
            c.decontam_shingle, c.decontam_num_perm, c.decontam_minhash_threshold, c.decontam_min_ngram)
        index_ref, info_ref = index_ref
        decontam = {"enabled": True, **ray.get(info_ref)}
        ctx.log("decontamination against %d evaluation text(s) of %s", decontam["texts"],
                ", ".join(decontam["tasks"]) or "no task")
    settings = ScreenSettings(margin=c.margin, margin_min_similarity=c.margin_min_similarity,
                              restates=c.restates_threshold, copies_max_dropped=c.copies_max_dropped,
                              action=c.action,
                              remine_rank=c.remine_rank, instructions=c.instructions,
                              fields=tuple(c.decontam_fields), ngram_threshold=c.decontam_ngram_threshold,
                              minhash_threshold=c.decontam_minhash_threshold, mine=c.mine,
                              mine_range=(c.mine_rank_min, c.mine_rank_max), mine_sampling=c.mine_sampling)
    removed_out = shards_at(ctx.out, "removed")
    ds = filter_pending(src.ray_dataset(), done_set(ctx.out, removed_out))
    threads = worker_threads(None, c.cpus_per_actor)
    corpus_ref, mining = None, {}
    if c.enabled and c.mine != "off":
        corpus_ref, info_ref = ray.remote(_build_corpus).options(
            num_returns=2, num_cpus=c.cpus_per_actor, num_gpus=c.gpus_per_actor or None).remote(
            src, c.mine_corpus, guide_path, c.guide_kind, c.max_length, threads, index_ref,
            (settings.ngram_threshold, settings.minhash_threshold))
        mining = ray.get(info_ref)
        if not mining["texts"]:
            raise DataError(f"screen.mine: the mining corpus ({c.mine_corpus or 'the input documents'}) has no text")
        ctx.log("mining negatives (%s) from %d corpus text(s), ranks [%d, %d)", c.mine, mining["texts"],
                c.mine_rank_min, c.mine_rank_max)
    written = {"kept": 0, "removed": 0}
    for row in ds.map_batches(_Screen, fn_constructor_args=(ctx.out, removed_out, guide_path, c.guide_kind,
                                                            c.max_length, threads, index_ref, settings,
                                                            guide_name, corpus_ref),
                              batch_size=c.batch_size, batch_format="pyarrow", zero_copy_batch=True,
                              concurrency=c.num_actors, num_cpus=c.cpus_per_actor,
                              num_gpus=c.gpus_per_actor or None).iter_rows():
        for k in written:
            written[k] += int(row[k])
    reasons = _counts(removed_out, "removed_reason")
    n_out = ctx.out.num_rows()
    if n_out == 0:   # only rejects: never a success (what was written stays for a look)
        top = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
        raise DataError(f"screen kept none of the {n_in} rows of {src.stage} (removed: {top}); the removed rows "
                        f"and their reasons are at {removed_out.data_url}. Loosen section `screen` (margin, "
                        f"decontam thresholds, action: remove_negative) or fix the input.")
    if c.enabled and c.decontaminate:
        decontam["hits_by_task"] = _counts(removed_out, "decontam_task")
    quality = ray.get(ray.remote(num_cpus=_LIGHT)(_summary).remote(ctx.out)) if guide_path else None
    return {"screen": {"rows_in": n_in, "rows_out": n_out, "removed": reasons, "rows_this_run": written,
                       "guide": guide_name, "guide_kind": c.guide_kind, "margin": c.margin, "action": c.action,
                       "actions": ray.get(ray.remote(num_cpus=_LIGHT)(_actions).remote(ctx.out))
                       if c.enabled and (c.action != "drop" or c.mine != "off") else {},
                       **({"mining": mining} if mining else {}),
                       "decontamination": decontam, "removed_url": removed_out.data_url},
            "quality": quality}


def _actions(out: StageOutput) -> dict[str, int]:
    """How many kept rows had their negative removed, re-mined in the batch, or mined from the corpus (from the
    lineage)."""
    counts: dict[str, int] = {}
    for batch in out.iter_batches(batch_size=65536, columns=["lineage"]):
        for lin in batch.column(0).to_pylist():
            screen = json.loads(lin or "{}").get("screen") or {}
            act = screen.get("false_negative", {}).get("action")
            if act:
                counts[act] = counts.get(act, 0) + 1
            mined = screen.get("mined")
            if mined:
                key = "mined" if mined.get("found") else "mined_none_in_range"
                counts[key] = counts.get(key, 0) + 1
    return counts
