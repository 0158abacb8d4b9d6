"""Dedup and the generation data path at paper scale: nothing that grows with N in the driver, the stub engine's
corpus mode (valid samples for every task type, planted near duplicates), and the paper-scale benchmark's --quick
run (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from speed_ray.store import RunStore, StageOutput

REPO = Path(__file__).resolve().parents[1]


# ---- done ids off the driver -----------------------------------------------------------------------------------
def _outputs(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    out = store.stage("synthesis", "fp")
    from speed_ray.llm.shards import rejects_output

    rej = rejects_output(out)
    out.write_shard("a", {"id": [f"r{i}" for i in range(0, 60)]})
    out.write_shard("b", {"id": [f"r{i}" for i in range(60, 90)]})
    rej.write_shard("a", {"id": [f"r{i}" for i in range(90, 100)] + ["r5"]})   # r5 in both: counted once
    return out, rej


def test_done_set_without_ray_is_local(tmp_path, monkeypatch):
    import ray

    from speed_ray.streaming import done_set

    monkeypatch.setattr(ray, "is_initialized", lambda: False)   # as in a process without Ray (the suite may have one)

    out, rej = _outputs(tmp_path)
    d = done_set(out, rej)
    assert len(d) == 100 and d.hashes is not None
    assert d.contains(["r0", "r99", "r100", "x"]).tolist() == [True, True, False, False]
    assert len(done_set(StageOutput(str(tmp_path / "run"), "other", "fp"))) == 0


def test_done_set_stays_in_the_object_store_and_filters(ray_local, tmp_path):
    from speed_ray.llm.shards import done
    from speed_ray.streaming import filter_pending

    out, _ = _outputs(tmp_path)
    d = done(out)
    assert len(d) == 100 and bool(d)
    assert d.hashes is None and d.ref is not None        # the driver holds a count and a reference only
    ds = ray_local.data.from_items([{"id": f"r{i}", "x": i} for i in range(150)], override_num_blocks=3)
    left = sorted(r["id"] for r in filter_pending(ds, d).take_all())
    assert left == sorted(f"r{i}" for i in range(100, 150))


# ---- the dedup stage: components and removal table in a worker ------------------------------------------------------
def test_dedup_stage_keeps_ids_and_components_out_of_the_driver(ray_local, tmp_path, monkeypatch):
    """The driver of a million-row dedup must not hold the pairs, the components, the removal table or the done ids:
    in this (driver) process, computing components, reading whole shard sets and building id sets fail. The stage
    still completes (its workers import the real ones), resumes from a partial state, and gives the same answer."""
    from speed_ray.dedup import stage as dedup_mod
    from test_dedup_stage import _check, _ctx, _samples

    rows, exact, near = _samples()
    ctx = _ctx(tmp_path, rows, bucket_partition_rows=1500)
    first = dedup_mod.dedup_stage(ctx)
    _check(ctx, first, rows, exact, near)
    # partial: the clusters and removed steps undone, half of the kept shards gone
    fs = ctx.out.fs
    for name in ("clusters", "removed"):
        fs.rm(f"{ctx.out.artifact('steps')}/{name}.json")
    for part in (ctx.out, dedup_mod.shards_at(ctx.out, "removed")):
        for n in part.shard_names()[::2]:
            fs.rm(part._path(part.shard_url(n)))

    def refuse(*a, **k):
        raise AssertionError("called in the driver")

    monkeypatch.setattr(dedup_mod, "clusters", refuse)
    monkeypatch.setattr(StageOutput, "read_table", refuse)
    monkeypatch.setattr(StageOutput, "read_rows", refuse)
    monkeypatch.setattr("speed_ray.streaming.done_ids", refuse)
    again = dedup_mod.dedup_stage(ctx)
    monkeypatch.undo()
    assert again == first
    _check(ctx, again, rows, exact, near)


# ---- the stub engine's corpus mode ----------------------------------------------------------------------------------
def _stub_samples(model: str, n: int, task_type: str = "retrieval", seed0: int = 0):
    from speed_ray.generate.engine import StubEngine
    from speed_ray.llm.rows import LLMRequest
    from speed_ray.synth.schemas import sample_schema

    eng = StubEngine(model)
    reqs = [LLMRequest([{"role": "user", "content": f"prompt {i}"}], json_schema=sample_schema(task_type),
                       seed=seed0 + i) for i in range(n)]
    return reqs, eng.generate(reqs)


def _removed_share(queries_positives: list[tuple[str, str]]) -> float:
    from speed_ray.dedup.components import find_duplicates
    from speed_ray.dedup.lsh import optimal_bands

    bands, rows = optimal_bands(0.8, 128)
    out = find_duplicates([f"id{i:06d}" for i in range(len(queries_positives))],
                          [f"{q}\n{p}" for q, p in queries_positives], bands=bands, rows=rows)
    return sum(r is not None for r in out.column("removed_reason").to_pylist()) / len(queries_positives)


@pytest.mark.parametrize("task_type", ["retrieval", "classification", "matching_short", "matching_long", "sts",
                                       "bitext"])
def test_stub_corpus_is_valid_for_every_task_type_and_deterministic(task_type):
    from speed_ray.dedup.filters import quality_reason
    from speed_ray.config import to_dict
    from speed_ray.dedup.config import FiltersConfig
    from speed_ray.synth.parsing import parse_sample

    _, a = _stub_samples("stub:corpus=1", 200, task_type)
    _, b = _stub_samples("stub:corpus=1", 200, task_type)
    assert [r.text for r in a] == [r.text for r in b]
    rules = to_dict(FiltersConfig())
    for r in a:
        p = parse_sample(r.text, task_type)
        assert p.ok, (p.reason, r.text)
        assert r.finish_reason == "stop" and r.completion_tokens == len(r.text.split())
        assert quality_reason(p.query, p.positive, p.negative, True, **rules) is None   # dedup's filters keep it
        assert len(p.positive.split()) >= 50
    assert len({r.text for r in a}) == 200


def test_stub_corpus_distinct_rows_stay_distinct_and_dup_plants_a_fifth():
    from speed_ray.synth.parsing import parse_sample

    _, plain = _stub_samples("stub:corpus=1", 3000)
    parsed = [parse_sample(r.text, "retrieval") for r in plain]
    assert _removed_share([(p.query, p.positive) for p in parsed]) == 0.0
    _, dup = _stub_samples("stub:dup=0.2,rows=3000", 3000)
    parsed = [parse_sample(r.text, "retrieval") for r in dup]
    assert all(p.ok for p in parsed)
    assert 0.16 <= _removed_share([(p.query, p.positive) for p in parsed]) <= 0.24


def test_stub_revision_keeps_the_document_so_duplicates_survive():
    from speed_ray.generate.engine import StubEngine
    from speed_ray.llm.rows import LLMRequest
    from speed_ray.synth.parsing import parse_sample
    from speed_ray.synth.prompts import revisor_messages
    from speed_ray.synth.schemas import sample_schema

    reqs, res = _stub_samples("stub:dup=0.2,rows=2000", 2000)
    rev = [LLMRequest(revisor_messages(json.dumps(q.messages), r.text), json_schema=sample_schema("retrieval"),
                      seed=7 + i) for i, (q, r) in enumerate(zip(reqs, res))]
    out = StubEngine("stub:corpus=1").generate(rev)
    before = [parse_sample(r.text, "retrieval") for r in res]
    after = [parse_sample(r.text, "retrieval") for r in out]
    assert all(p.ok for p in after)
    assert [p.positive.split()[-1] for p in after] == [p.positive.split()[-1] for p in before]  # stubdoc<key>
    share = _removed_share([(p.query, p.positive) for p in after])
    assert abs(share - _removed_share([(p.query, p.positive) for p in before])) < 0.02


def test_stub_default_output_unchanged_and_options_checked():
    from speed_ray.generate.engine import StubEngine
    from speed_ray.llm.rows import LLMRequest

    r = LLMRequest([{"role": "user", "content": "hello"}], seed=3)
    out = StubEngine().generate([r])[0]
    assert json.loads(out.text) == {"query": "q 8db5496807f4", "positive": "p 8db5496807f4",
                                    "hard_negative": "n 8db5496807f4"}
    with pytest.raises(ValueError, match="rows=N"):
        StubEngine("stub:dup=0.2")


# ---- the benchmark ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_paper_scale_quick_meets_the_goals(tmp_path):
    """benchmarks/paper_scale.py --quick: a two-node cluster; the teacher stages against the fake server (300 ms,
    random 429s and 5xx), the three alignment stages (a few tiny-Llama steps on all their rows), then synthesis +
    revision + dedup + the embedder at 20K rows, the three killed once at a random point and resumed: nothing lost
    or duplicated, every teacher request answered once despite the faults, every row prepared for training, memory
    within the limits, the embedder trained from its streamed feed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "paper_scale.py"), "--quick"],
                         capture_output=True, text=True, timeout=3600, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-4000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    g = res["goals"]
    assert g["kills"] == 3 and g["kill_runs"] == 3, res["kills"]
    assert g["lost"] == 0 and g["duplicated"] == 0 and g["unexpected"] == 0, res["kills"]
    assert all(k.get("killed", True) for k in res["kills"]), res["kills"]   # each kill landed mid-stage
    assert g["kills_same_as_clean"]
    emb = res["results"]["embedder"]["20000"]["summary"]
    # the feed read every kept row; the incomplete ones (here the matching rows, which have no negative) are counted
    # apart, the rest train
    assert emb["steps"] == 4 and emb["rows_in"] == res["results"]["dedup"]["20000"]["summary"]["rows_out"], emb
    assert emb["triples"] == emb["rows_in"] - emb["rows_dropped_incomplete"], emb
    assert g["driver_peak_ok"] and g["worker_peak_ok"], g
    assert set(res["results"]) == {"brainstorm", "seed_data", "judge", "revise_signals", "junior_sft", "senior_dpo",
                                   "revisor_sft", "synthesis", "revision", "dedup", "embedder"}
    assert g["stage_ids_ok"]
    counts = res["teacher"]["counts"]["20000"]
    want = {"brainstorm": 5 * counts["brainstorm"], "seed_data": counts["seed_data"], "judge": counts["judge"],
            "revise_signals": counts["revise_signals"]}
    for stage, requests in want.items():            # each request answered once, through the injected faults
        r = res["results"][stage]["20000"]
        t, srv = r["summary"], r["summary"]["server"]
        assert t["requests"] == requests and t["answered"] == requests and t["pending"] == 0, (stage, t)
        assert t["calls"] == (4 * counts["brainstorm"] if stage == "brainstorm" else requests), (stage, t)
        assert t["failed_calls"] == 0 and t["cached_calls"] == 0, (stage, t)
        assert srv["http_429"] > 0 and t["retries"] >= srv["http_429"] + srv["http_5xx"] > 0, (stage, t)
        assert t["valid"] > 0 and t["valid_share"] >= 0.99, (stage, t)
        assert r["ids"]["expected"] == requests and r["ids"]["lost"] == 0 and r["ids"]["duplicated"] == 0, r["ids"]
    for stage, source in (("junior_sft", "seed_data"), ("senior_dpo", "judge"), ("revisor_sft", "revise_signals")):
        a = res["results"][stage]["20000"]["summary"]      # all rows prepared, the steps run on both nodes
        assert a["rows_prepared"] == a["rows_in"] == res["results"][source]["20000"]["summary"]["valid"], (stage, a)
        assert a["steps"] == res["align_steps"] and a["world_size"] == 2, (stage, a)
    d = res["results"]["dedup"]["20000"]["summary"]
    assert 0.15 <= d["removed"] / d["rows_in"] <= 0.25          # the planted fifth, found
    assert res["stub_engine"]["rows_per_cpu_s"] > 0
