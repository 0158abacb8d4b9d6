"""The dedup stage end to end on local Ray: kept/removed rows, lineage, manifest counts, resume by sub-step."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow.compute as pc
import pytest

from speed_ray.dedup.config import DedupConfig, FiltersConfig
from speed_ray.dedup.stage import dedup_stage, shards_at
from speed_ray.stage import StageContext
from speed_ray.run_config import RunConfig
from speed_ray.store import RunStore

WORDS = [f"term{i}" for i in range(2000)]


def _row(i: int, query: str, positive: str, negative: str = "", valid: bool = True) -> dict:
    return {"id": f"s{i:05d}", "task_type": "short-long", "task": "retrieve passages", "prompt": "[]",
            "prompt_params": "{}", "text": "", "sample": "", "query": query, "positive": positive,
            "negative": negative, "valid": valid, "reject_reason": "", "generator": "test",
            "lineage": json.dumps({"topic": "t", "task_id": f"task{i % 7}"})}


def _samples(n: int = 400, seed: int = 0):
    """n distinct samples, then planted exact copies, near copies and rows each quality rule drops."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        rows.append(_row(i, " ".join(rng.choice(WORDS, 8)), " ".join(rng.choice(WORDS, 90)),
                         " ".join(rng.choice(WORDS, 40))))
    exact, near = {}, {}
    for j in range(20):  # exact copies (case and spacing differ) of rows 0..19
        r = dict(rows[j], id=f"x{j:05d}", query=rows[j]["query"].upper(), positive="  " + rows[j]["positive"])
        rows.append(r)
        exact[r["id"]] = rows[j]["id"]
    for j in range(20, 50):  # near copies: one word of the positive replaced
        words = rows[j]["positive"].split()
        words[45] = "CHANGED"
        r = dict(rows[j], id=f"t{j:05d}", positive=" ".join(words))  # ids sort after the originals
        rows.append(r)
        near[r["id"]] = rows[j]["id"]
    bad = {
        "b0": _row(9000, "q about x", "", valid=True),
        "b1": _row(9001, "what is this thing", "As an AI language model I cannot help with that.", ""),
        "b2": _row(9002, "some query here", "the same text twice", "The same text, twice!"),
        "b3": _row(9003, "what is the capital of france", "Q: what is the capital of France? Paris.", ""),
        "b4": _row(9004, "a rejected one", "some positive text here", "", valid=False),
        "b5": dict(_row(9005, "what is a b-tree", "A balanced search tree for disks.", ""), task=",]{"),
    }
    for k, r in bad.items():
        rows.append(dict(r, id=k))
    return rows, exact, near


def _ctx(tmp_path, rows, **dedup_kw) -> StageContext:
    store = RunStore(str(tmp_path / "run"))
    src = store.stage("revision", "fp-in")
    for k in range(0, len(rows), 100):  # several input shards
        src.write_shard(f"in-{k:05d}", rows[k:k + 100])
    cfg = dataclasses.replace(RunConfig(), dedup=DedupConfig(batch_size=128, **dedup_kw), filters=FiltersConfig())
    return StageContext(cfg=cfg, name="dedup", out=store.stage("dedup", "fp-out"), inputs={"samples": src},
                        store=store, run_name="t")


def _check(ctx, extra, rows, exact, near):
    d = extra["dedup"]
    kept = ctx.out.read_table()
    removed = shards_at(ctx.out, "removed").read_table()
    kept_ids, removed_ids = kept.column("id").to_pylist(), removed.column("id").to_pylist()
    assert len(kept_ids) == len(set(kept_ids)) and len(removed_ids) == len(set(removed_ids))
    assert sorted(kept_ids + removed_ids) == sorted(r["id"] for r in rows)  # every input exactly once
    assert d["rows_in"] == len(rows) and d["rows_out"] == len(kept_ids)
    why = dict(zip(removed_ids, removed.column("removed_reason").to_pylist()))
    dup_of = dict(zip(removed_ids, removed.column("duplicate_of").to_pylist()))
    for i, orig in exact.items():
        assert why[i] == "exact_duplicate" and dup_of[i] == orig
    hits = [i for i in near if why.get(i) == "near_duplicate" and dup_of[i] == near[i]]
    assert len(hits) >= 0.9 * len(near)
    assert why["b0"] == "empty_positive" and why["b1"].startswith("boilerplate")
    assert why["b2"] == "positive_equals_negative" and why["b3"] == "query_in_positive"
    assert why["b4"] == "invalid" and why["b5"] == "degenerate_task"
    assert d["exact_duplicates"] == len(exact) and d["near_duplicates"] == len(hits)
    assert d["filtered"] == {"boilerplate_positive": 1, "empty_positive": 1, "invalid": 1,
                             "positive_equals_negative": 1, "query_in_positive": 1, "degenerate_task": 1}
    assert d["clusters"] == len(exact) + len(hits)
    assert d["band_layout"]["bands"] * d["band_layout"]["rows"] <= 128
    # Lineage and dedup_cluster: a kept representative's cluster is itself; a removed copy points at it.
    lin = dict(zip(kept_ids, kept.column("lineage").to_pylist()))
    assert all(json.loads(v)["dedup_cluster"] == k for k, v in lin.items())
    assert json.loads(lin["s00000"])["task_id"] == "task0"
    assert pc.all(pc.equal(kept.column("dedup_cluster"), kept.column("id"))).as_py()
    rem_lin = dict(zip(removed_ids, removed.column("lineage").to_pylist()))
    assert json.loads(rem_lin["x00003"])["dedup_cluster"] == "s00003"


def test_dedup_stage_end_to_end_and_resume(ray_local, tmp_path):
    rows, exact, near = _samples()
    ctx = _ctx(tmp_path, rows, bucket_partition_rows=1500)  # several bucket partitions: a real shuffle
    first = dedup_stage(ctx)
    assert first["dedup"]["bucket_partitions"] > 1
    _check(ctx, first, rows, exact, near)

    # As if killed inside the signature step: some batches done, no later step, kept/removed outputs partial.
    fs = ctx.out.fs
    steps = ctx.out.artifact("steps")
    for name in ("signatures", "buckets", "clusters", "removed"):
        fs.rm(f"{steps}/{name}.json")
    for rel in ("edges", "clusters"):
        fs.rm(shards_at(ctx.out, rel)._path(shards_at(ctx.out, rel).data_url), recursive=True)
    for part in (ctx.out, shards_at(ctx.out, "removed")):
        for n in part.shard_names()[1:]:
            fs.rm(part._path(part.shard_url(n)))
    sig = shards_at(ctx.out, "signatures")
    for n in sig.shard_names()[::2]:
        fs.rm(sig._path(sig.shard_url(n)))
    kept_sigs = {n: fs.modified(sig._path(sig.shard_url(n))) for n in sig.shard_names()}
    again = dedup_stage(ctx)
    assert again == first
    # Finished signature batches were not recomputed.
    assert {n: fs.modified(sig._path(sig.shard_url(n))) for n in kept_sigs} == kept_sigs
    _check(ctx, again, rows, exact, near)


def test_dedup_stage_rejects_unknown_field(tmp_path):
    rows, _, _ = _samples(20)
    ctx = _ctx(tmp_path, rows, fields=("query", "answer"))
    with pytest.raises(ValueError, match="answer"):
        dedup_stage(ctx)


def test_dedup_that_keeps_nothing_fails_naming_the_reasons(ray_local, tmp_path):
    """A stage never reports success while writing only rejects: every row filtered (here, each task description
    is an e-mail address) is an error naming the counts and where the removed rows are, and they stay there."""
    from speed_ray.errors import DataError

    rows = [dict(_row(i, f"query number {i} here", f"a positive passage number {i} about things"),
                 task="someone@example.com") for i in range(30)]
    ctx = _ctx(tmp_path, rows)
    with pytest.raises(DataError, match=r"kept none of the 30 rows.*degenerate_task: 30"):
        dedup_stage(ctx)
    assert shards_at(ctx.out, "removed").num_rows() == 30 and not ctx.out.done
