"""The embedder's training feed: the same batches as the in-memory functions, streamed from files in batch order, with
nothing in the driver, nested subsets, and a resume that rebuilds the same files."""

from __future__ import annotations

import numpy as np
import pytest

from speed_ray.embedder.data import make_batches, select_rows, to_triples, worker_slice
from speed_ray.store import StageOutput

TYPES = ["retrieval", "sts", "classification"]


def _rows(n=70):
    rows = []
    for i in range(n):
        t = TYPES[i % 3] if i % 7 else "retrieval"
        rows.append({"id": f"s{i}", "task_type": t, "task": f"task {i % 5}", "query": f"query {i}",
                     "positive": f"positive {i}", "negative": "" if i % 11 == 5 else f"negative {i}"})
    return rows


def _ctx(tmp_path, rows, **embedder):
    from speed_ray.stage import StageContext
    from speed_ray.run_config import build_config
    from speed_ray.store import RunStore

    cfg = build_config({"run": {"run_dir": str(tmp_path), "seed": 3},
                        "embedder": {"base_model": "offline:minilm", "batch_size": 4, "max_steps": 30,
                                     "one_task_per_batch": True, "train_pairs": False, **embedder}})
    store = RunStore(str(tmp_path))
    data = store.stage("dedup", "fp0")
    for k in range(0, len(rows), 25):
        data.write_shard(f"s{k}", rows[k:k + 25])
    data.write_manifest({"stage": "dedup"})
    return StageContext(cfg=cfg, name="train_embedder", out=store.stage("train_embedder", "fp1"),
                        inputs={"data": data}, store=store, run_name="t")


def _in_memory(rows, cfg, seed, step, rank=0, world=1):
    """The in-memory reference: usable triples, the first n_samples of them in the seed's order, make_batches per
    epoch (n_samples counts triples that can train: a row without a negative is not one)."""
    triples, _ = to_triples(rows, cfg.symmetric_task_types)
    triples = select_rows(triples, cfg.n_samples, cfg.task_types, seed)
    n = len(make_batches(triples, cfg.batch_size, cfg.one_task_per_batch, seed, 0))
    epoch, i = divmod(step, n)
    return worker_slice(make_batches(triples, cfg.batch_size, cfg.one_task_per_batch, seed, epoch)[i], rank, world)


@pytest.mark.parametrize("embedder", [{}, {"one_task_per_batch": False, "n_samples": 40},
                                      {"task_types": ("retrieval", "sts"), "batch_size": 6, "num_workers": 2}])
def test_feed_streams_the_in_memory_batches_with_nothing_in_the_driver(ray_local, tmp_path, monkeypatch, embedder):
    from speed_ray.embedder.feed import FeedReader, prepare_feed

    rows = _rows()
    ctx = _ctx(tmp_path, rows, **embedder)
    cfg = ctx.cfg.embedder

    def refuse(*a, **k):
        raise AssertionError("called in the driver")

    monkeypatch.setattr(StageOutput, "read_table", refuse)
    monkeypatch.setattr(StageOutput, "read_rows", refuse)
    plan = prepare_feed(ctx, cfg, 3)
    monkeypatch.undo()
    n_valid = sum(1 for r in rows if r["negative"] and (not cfg.task_types or r["task_type"] in cfg.task_types))
    assert plan.summary["triples"] == min(n_valid, cfg.n_samples or n_valid)
    assert plan.summary["rows_dropped_incomplete"] == sum(
        1 for r in rows if not r["negative"] and (not cfg.task_types or r["task_type"] in cfg.task_types))
    assert plan.epochs >= 2   # 30 steps over fewer batches: several epochs, each reshuffled
    world = cfg.num_workers
    readers = [FeedReader(plan, r, world) for r in range(world)]
    for step in range(30):
        for r in range(world):
            assert readers[r].batch(step) == _in_memory(rows, cfg, 3, step, r, world), (step, r)


def test_feed_subsets_are_nested_and_a_resume_rebuilds_the_same_files(ray_local, tmp_path):
    from speed_ray.embedder.feed import FeedReader, plan_feed, prepare_feed

    rows = _rows()
    ctx = _ctx(tmp_path, rows)
    plan = prepare_feed(ctx, ctx.cfg.embedder, 3)
    first = [FeedReader(plan).batch(s) for s in range(plan.n_batches * plan.epochs)]
    # killed before the feed was marked, with half of the triples shards lost
    fs = ctx.out.fs
    fs.rm(ctx.out._path(ctx.out.artifact("steps")), recursive=True)
    fs.rm(ctx.out._path(ctx.out.artifact("feed")), recursive=True)
    from speed_ray.embedder.feed import triples_output, triples_url
    from speed_ray.store import shards_at

    shared = triples_output(ctx.inputs["data"], ctx.cfg.embedder, 3)
    triples = shards_at(shared)
    triples.data_url = triples_url(ctx.inputs["data"], ctx.cfg.embedder, 3)
    fs.rm(shared._path(shared.artifact("steps")), recursive=True)
    for n in triples.shard_names()[::2]:
        fs.rm(triples._path(triples.shard_url(n)))
    again = prepare_feed(ctx, ctx.cfg.embedder, 3)
    assert again == plan
    assert [FeedReader(again).batch(s) for s in range(plan.n_batches * plan.epochs)] == first
    # nested: the n smallest order keys, whatever the other settings
    table = triples.read_table(columns=["key", "task_type", "source", "incomplete"])
    base = {"public_fraction": 0.0, "batch_size": 4, "one_task_per_batch": True, "epochs": 1.0, "max_steps": -1}
    small = plan_feed(table, {**base, "n_samples": 20}, 3)[1]
    big = plan_feed(table, {**base, "n_samples": 40}, 3)[1]
    assert set(small.tolist()) < set(big.tolist()) and (len(small), len(big)) == (20, 40)


def test_feed_mixes_public_triples_and_rejects_a_batch_it_cannot_fill(ray_local, tmp_path):
    import json

    from speed_ray.embedder.data import DataError
    from speed_ray.embedder.feed import FeedReader, prepare_feed

    pub = tmp_path / "public.jsonl"
    pub.write_text("".join(json.dumps({"query": f"pq {i}", "positive": f"pp {i}", "negative": f"pn {i}",
                                       "task": "public task"}) + "\n" for i in range(30)))
    rows = _rows(30)
    ctx = _ctx(tmp_path, rows, public_data=str(pub), public_fraction=0.25, one_task_per_batch=False)
    plan = prepare_feed(ctx, ctx.cfg.embedder, 3)
    n_syn = plan.summary["rows_selected"]
    assert plan.summary["public_rows"] == round(n_syn * 0.25 / 0.75)
    seen = [t for s in range(plan.n_batches) for t in FeedReader(plan).batch(s)]
    assert any(t["source"] == "public" for t in seen) and len({t["id"] for t in seen}) == len(seen)

    ctx = _ctx(tmp_path / "b", _rows(6), batch_size=8)
    with pytest.raises(DataError, match="cannot fill one batch"):
        prepare_feed(ctx, ctx.cfg.embedder, 3)


def test_feed_reader_reads_only_its_rows(tmp_path):
    """A worker reads its slice of a step's batch from the row groups that hold it (any world size)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from speed_ray.embedder.data import TRIPLE_COLUMNS
    from speed_ray.embedder.feed import FeedPlan, FeedReader

    b, n_batches = 6, 5
    (tmp_path / "e000").mkdir()
    rows = [{c: f"{c}{i}" for c in TRIPLE_COLUMNS} for i in range(b * n_batches)]
    for f, start in enumerate(range(0, len(rows), 12)):
        pq.write_table(pa.Table.from_pylist(rows[start:start + 12]), tmp_path / "e000" / f"f{f:05d}.parquet",
                       row_group_size=4)
    plan = FeedPlan(str(tmp_path), n_batches, b, 1, 12, {})
    for world in (1, 2, 3):
        for step in range(n_batches * 2):
            got = [t for r in range(world) for t in FeedReader(plan, r, world).batch(step)]
            assert got == rows[(step % n_batches) * b:(step % n_batches + 1) * b]
    with pytest.raises(ValueError, match="multiple"):
        FeedReader(plan, 0, 4)
    assert np.all(True)


def test_feed_batches_never_repeat_a_text(ray_local, tmp_path):
    """Rows that share a positive (several claims, one evidence passage) are planned into different batches."""
    from speed_ray.embedder.feed import FeedReader, prepare_feed

    rows = [{"id": f"s{i}", "task_type": "retrieval", "task": "t", "query": f"claim {i}",
             "positive": f"evidence {i % 9}", "negative": f"other {i}"} for i in range(72)]
    ctx = _ctx(tmp_path, rows, max_steps=8)
    plan = prepare_feed(ctx, ctx.cfg.embedder, 3)
    for step in range(plan.n_batches):
        b = FeedReader(plan).batch(step)
        assert len({t["positive"] for t in b}) == len(b), b


def test_rows_without_a_negative_train_as_pairs_by_default(ray_local, tmp_path):
    """SPEED's short-long matching samples have no hard negative: they train with in-batch negatives (pairs)
    instead of being dropped, and never share a batch with triples."""
    from speed_ray.embedder.feed import FeedReader, prepare_feed

    rows = _rows()
    ctx = _ctx(tmp_path, rows, train_pairs=True, one_task_per_batch=False)
    plan = prepare_feed(ctx, ctx.cfg.embedder, 3)
    n_pairs = sum(1 for r in rows if not r["negative"])
    assert plan.summary["rows_dropped_incomplete"] == 0 and plan.summary["pairs"] == n_pairs
    batches = [FeedReader(plan).batch(s) for s in range(plan.n_batches)]
    assert all(len({t["negative"] is None for t in b}) == 1 for b in batches)


def test_sweep_points_share_pass_one(ray_local, tmp_path, monkeypatch):
    """Two train_embedder stages on the same rows that differ only in n_samples (two points of the scaling sweep)
    convert the rows to triples once: the second reads the first's triples and runs no pass 1. Another task-type
    filter (the influence study) gets triples of its own. The batches equal the in-memory reference either way."""
    import dataclasses

    from speed_ray.embedder import feed
    from speed_ray.embedder.feed import FeedReader, prepare_feed, triples_output, triples_url
    from speed_ray.store import StepMarkers, shards_at

    rows = _rows()
    small = _ctx(tmp_path, rows, n_samples=20)
    plan_small = prepare_feed(small, small.cfg.embedder, 3)
    shared = triples_output(small.inputs["data"], small.cfg.embedder, 3)
    triples = shards_at(shared)
    triples.data_url = triples_url(small.inputs["data"], small.cfg.embedder, 3)
    shards = sorted(triples.shard_names())
    assert shards and StepMarkers(shared).get("triples")["made_by"] == small.out.url

    from speed_ray.run_config import replace

    big = dataclasses.replace(small, out=small.store.stage("train_embedder", "fp2"),
                              cfg=replace(small.cfg, ["embedder.n_samples=40"]))
    monkeypatch.setattr(feed, "_Triples", None)   # pass 1 would fail: it must not run
    plan_big = prepare_feed(big, big.cfg.embedder, 3)
    monkeypatch.undo()
    assert triples_url(big.inputs["data"], big.cfg.embedder, 3) == triples.data_url
    assert sorted(triples.shard_names()) == shards
    assert StepMarkers(big.out).get("triples") == {"shared": triples.data_url}
    assert (plan_small.summary["triples"], plan_big.summary["triples"]) == (20, 40)
    for plan, cfg in ((plan_small, small.cfg.embedder), (plan_big, big.cfg.embedder)):
        assert [FeedReader(plan).batch(s) for s in range(plan.n_batches)] == \
            [_in_memory(rows, cfg, 3, s) for s in range(plan.n_batches)]
    # a task-type filter converts other rows: its own triples
    assert triples_output(small.inputs["data"], dataclasses.replace(small.cfg.embedder, task_types=("sts",)),
                          3).url != shared.url
