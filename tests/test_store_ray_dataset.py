"""StageOutput.ray_dataset: a stage's shards as a streaming Ray Dataset, read by at most READ_TASKS map tasks that ask
for the CPUs the caller gives (a quarter by default), so no read waits for a whole free CPU."""

from __future__ import annotations

import threading
import uuid

import pytest

from speed_ray.store import READ_CPUS, RunStore


def _stage(run_dir: str, shards: int, rows: int = 3):
    out = RunStore(run_dir).stage("s", "fp")
    for i in range(shards):
        out.write_shard(f"{i:05d}", {"id": [f"{i}-{j}" for j in range(rows)], "x": list(range(rows))})
    return out


def test_every_row_of_every_shard_including_an_empty_one_and_a_drifting_schema(ray_local, tmp_path):
    out = _stage(str(tmp_path), 12)
    out.write_shard("empty", {"id": [], "x": []})
    # a column that is all null in one shard (Arrow type null) and strings in another
    out.write_shard("note-null", {"id": ["n-0"], "x": [0], "note": [None]})
    out.write_shard("note-str", {"id": ["n-1"], "x": [1], "note": ["hello"]})
    got = out.ray_dataset().take_all()
    assert sorted(r["id"] for r in got) == sorted([f"{i}-{j}" for i in range(12) for j in range(3)] + ["n-0", "n-1"])
    assert {r["id"]: r.get("note") for r in got}["n-1"] == "hello"


def test_columns_are_read_alone_and_a_missing_one_is_named(ray_local, tmp_path):
    out = _stage(str(tmp_path), 3)
    ds = out.ray_dataset(columns=["x", "id"])
    rows = ds.take_all()
    assert len(rows) == 9 and all(list(r) == ["x", "id"] for r in rows)
    with pytest.raises(Exception, match=r"no column\(s\) \['nope'\]"):
        out.ray_dataset(columns=["id", "nope"]).take_all()


def test_no_stage_without_shards(ray_local, tmp_path):
    with pytest.raises(FileNotFoundError, match="no data shards"):
        RunStore(str(tmp_path)).stage("s", "fp").ray_dataset()


def test_a_read_starts_when_no_node_has_a_whole_cpu_free(ray_local, tmp_path):
    """The hang this design removes: ray.data.read_parquet lists files in a task of one whole CPU, which never starts
    while every node's CPUs are partly held (two stages' teacher actors at 0.25 CPU on two 1-CPU nodes): the stage
    waited forever with no error. Here every CPU of the test cluster is held but half of one."""
    ray = ray_local
    out = _stage(str(tmp_path), 6)

    @ray.remote
    class Holder:
        def ping(self):
            return 1

    total = ray.cluster_resources()["CPU"]
    holder = Holder.options(num_cpus=total - 0.5).remote()
    ray.get(holder.ping.remote())
    assert READ_CPUS <= 0.5
    got: list = []
    reader = threading.Thread(target=lambda: got.extend(out.ray_dataset().map_batches(
        lambda b: b, batch_format="pyarrow", num_cpus=0.1).take_all()), daemon=True)
    try:
        reader.start()
        reader.join(120)
        assert not reader.is_alive(), "the read did not finish in 120 s with half a CPU free"
    finally:
        ray.kill(holder)     # lets a hung read go on, so the session's Ray is usable after a failure
        reader.join(120)
    assert len(got) == 18


def test_a_stage_on_s3_is_read_by_the_workers(ray_local, s3_server):
    out = _stage(f"s3://{s3_server['bucket']}/ray-dataset-{uuid.uuid4().hex[:8]}", 4, rows=5)
    assert sorted(r["id"] for r in out.ray_dataset(columns=["id"]).take_all()) == sorted(
        f"{i}-{j}" for i in range(4) for j in range(5))


def test_many_shards_share_read_tasks(ray_local, tmp_path, monkeypatch):
    from speed_ray import store

    monkeypatch.setattr(store, "READ_TASKS", 4)
    out = _stage(str(tmp_path), 10, rows=2)
    ds = out.ray_dataset()
    assert sorted(r["id"] for r in ds.take_all()) == sorted(f"{i}-{j}" for i in range(10) for j in range(2))
    assert "MapBatches(read_shards): 4 tasks executed" in ds.stats()


def test_the_read_fuses_into_a_map_that_asks_for_the_same_cpus(ray_local, tmp_path):
    out = _stage(str(tmp_path), 3)

    def double(b):
        return b.set_column(1, "x", [[2 * v for v in b.column("x").to_pylist()]])

    fused = out.ray_dataset(num_cpus=1).map_batches(double, batch_format="pyarrow", num_cpus=1)
    assert sorted(r["x"] for r in fused.take_all()) == [0, 0, 0, 2, 2, 2, 4, 4, 4]
    assert "MapBatches(read_shards)->MapBatches(double)" in fused.stats()
    apart = out.ray_dataset().map_batches(double, batch_format="pyarrow", num_cpus=1)
    apart.take_all()
    assert "MapBatches(read_shards)->MapBatches(double)" not in apart.stats()
