"""root_data, synthesis and revision stages on a real local Ray and the real store (stub and HF engines),
including killing the driver and a worker mid-stage and resuming."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from speed_ray.llm.metrics import LowValidShare, check_valid_share
from speed_ray.pipeline import StageContext, StageError, build_plan, fingerprints, run_pipeline
from speed_ray.run_config import build_config
from speed_ray.store import RunStore

TYPES = ("retrieval", "classification", "matching_short", "matching_long")


def _cfg(run_dir, **sections):
    data = {"run": {"run_dir": str(run_dir), "seed": 7}}
    data.update(sections)
    return build_config(data)


def _tasks_stage(store: RunStore, fingerprint: str = "fp-tasks", fail_types: tuple[str, ...] = ()):
    """A finished brainstorm stage; the tasks of `fail_types` carry FAIL_ME (the faulty engine fails them)."""
    out = store.stage("brainstorm", fingerprint)
    rows = [{"id": f"t{t}{i}", "topic": f"Topic {i}", "task_type": t,
             "task": f"Find {t} documents about {i}." + (" FAIL_ME" if t in fail_types else ""),
             "lineage": json.dumps({"topic": f"Topic {i}"})} for t in TYPES for i in range(3)]
    out.write_shard("part-0", rows)
    out.write_manifest({"rows": len(rows)})
    return out


def _model_stage(store: RunStore, name: str, path: str):
    out = store.stage(name, f"fp-{name}")
    out.write_manifest({"model_path": path})
    return out


def _ctx(cfg, name: str, inputs: dict) -> StageContext:
    store = RunStore(cfg.run.run_dir)
    return StageContext(cfg=cfg, name=name, out=store.stage(name, f"fp-{name}"), inputs=inputs, store=store,
                        run_name="t")


def _engine(**kw):
    return {"kind": "stub", "batch_size": 4, "max_new_tokens": 200, "num_cpus_per_replica": 0.5, **kw}


def _faulty(**kw):
    """The stub engine with injected faults (tests/faulty_engine.py), as a custom engine."""
    return _engine(kind="custom", factory="faulty_engine:FaultyEngine", **kw)


def _all_ids(ctx) -> list[str]:
    from speed_ray.llm.shards import rejects_output

    ids = ctx.out.read_table(columns=["id"]).column("id").to_pylist() if ctx.out.shard_names() else []
    rej = rejects_output(ctx.out)
    if rej.shard_names():
        ids += rej.read_table(columns=["id"]).column("id").to_pylist()
    return ids


def test_synthesis_stage_streams_by_mixture(ray_local, tmp_path):
    from speed_ray.generate.stages import synthesis_stage

    cfg = _cfg(tmp_path, synthesis={"n_samples": 46, "shard_size": 8, "engine": _engine(model="stub")},
               mixture={"weights": {"retrieval": 1, "classification": 1, "matching": 2}})
    store = RunStore(cfg.run.run_dir)
    ctx = _ctx(cfg, "synthesis", {"tasks": _tasks_stage(store)})   # no generator: the direct_instruct wiring
    man = synthesis_stage(ctx)
    rows = ctx.out.read_rows()
    assert len(rows) == 46 and len({r["id"] for r in rows}) == 46
    counts = Counter(r["task_type"] for r in rows)
    assert counts["matching_short"] + counts["matching_long"] == 23        # exact mixture allocation
    assert counts["retrieval"] + counts["classification"] == 23 and abs(counts["retrieval"] - 11.5) <= 0.5
    r = rows[0]
    assert r["valid"] and json.loads(r["sample"]) and r["query"] and r["positive"]
    assert json.loads(r["prompt"])[-1]["role"] == "user"
    lin = json.loads(r["lineage"])
    assert lin["generator"] == "stub" and lin["task_type"] == r["task_type"] and "task_id" in lin
    assert man["metrics"]["parse_rate"] == 1.0 and man["metrics"]["rows"] == 46
    assert man["metrics"]["samples_per_s"] > 0 and ctx.ledger.cpu_seconds > 0
    # the plan is deterministic: a second stage dir with the same seed gets the same ids and prompts
    ctx2 = StageContext(cfg=cfg, name="synthesis", out=store.stage("synthesis", "fp-other"), inputs=ctx.inputs,
                        store=store, run_name="t")
    synthesis_stage(ctx2)
    assert sorted((r["id"], r["prompt"]) for r in ctx2.out.read_rows(columns=["id", "prompt"])) == \
        sorted((r["id"], r["prompt"]) for r in rows)


def test_synthesis_rejects_are_counted_and_kept_out(ray_local, tmp_path):
    from speed_ray.llm.shards import rejects_output
    from speed_ray.generate.stages import synthesis_stage

    # unconstrained, the stub writes {query, positive, hard_negative}: wrong keys for every task type
    cfg = _cfg(tmp_path, synthesis={"n_samples": 12, "shard_size": 5,
                                    "engine": _engine(model="stub", structured_output=False)})
    store = RunStore(cfg.run.run_dir)
    ctx = _ctx(cfg, "synthesis", {"tasks": _tasks_stage(store)})
    with pytest.raises(LowValidShare, match=r"^synthesis: 0 of 12 rows valid \(0\.0%, floor 50%\); "
                                            r"top reject reasons: missing_key:"):
        synthesis_stage(ctx)                             # nothing valid: never a success
    assert ctx.out.num_rows() == 0
    rej = rejects_output(ctx.out).read_rows()
    assert len(rej) == 12 and not any(r["valid"] for r in rej)
    # the floor disabled (0) still fails a stage with nothing valid; the rerun only re-checks the written rejects
    cfg0 = _cfg(tmp_path, synthesis={"n_samples": 12, "shard_size": 5, "min_valid_share": 0,
                                     "engine": _engine(model="stub", structured_output=False)})
    with pytest.raises(LowValidShare, match="Nothing valid fails a stage whatever its floor") as err:
        synthesis_stage(_ctx(cfg0, "synthesis", ctx.inputs))
    m = err.value.metrics
    assert m["rejected"] == 12 and m["parse_rate"] == 0.0 and m["generated_this_run"] == 0
    assert sum(m["reject_reasons"].values()) == 12 and len(rejects_output(ctx.out).read_rows()) == 12


def test_valid_share_check_message_and_rules():
    reasons = {"truncated": 812, "invalid_json: Expecting value: line 1": 100, "invalid_json": 50,
               "generation_error": 35, "missing_key:query": 3, "refusal": 2, "empty:S1": 1}
    with pytest.raises(LowValidShare) as err:
        check_valid_share("synthesis", 3, 1000, 0.5, reasons, setting="synthesis.min_valid_share",
                          where="/run/stages/synthesis/fp", examples={"CUDA error: out of memory": 30, "x": 5})
    assert str(err.value) == (
        "synthesis: 3 of 1000 rows valid (0.3%, floor 50%); top reject reasons: truncated 812, invalid_json 150, "
        "generation_error 35 (e.g. 'CUDA error: out of memory'), missing_key:query 3, refusal 2, "
        "1 more reason(s) 1. Its shards are kept at /run/stages/synthesis/fp: fix the cause and rerun to resume, "
        "or lower synthesis.min_valid_share (0 disables the floor).")
    assert err.value.metrics == {"valid_share": 0.003, "min_valid_share": 0.5}
    assert check_valid_share("s", 500, 1000, 0.5, reasons) == {"valid_share": 0.5, "min_valid_share": 0.5}
    assert check_valid_share("s", 1, 1000, 0.0, reasons)["valid_share"] == 0.001      # 0: floor disabled
    with pytest.raises(LowValidShare, match="^revision: 0 of 4 revisions parsed .*floor 0%"):
        check_valid_share("revision", 0, 4, 0.0, {"no_json": 4}, unit="revisions", verb="parsed")
    with pytest.raises(LowValidShare, match="^judge: nothing valid: 0 of 7 planned requests have an answer"):
        check_valid_share("judge", 0, 0, 0.0, {}, unit="requests", planned=7)
    assert check_valid_share("s", 0, 0, 0.5, {})["valid_share"] == 0.0                 # nothing planned


def test_floor_is_not_part_of_the_fingerprint(tmp_path):
    """The floor checks the output, it does not shape it: changing it must reuse the shards it judged."""
    def fps(**sections):
        cfg = _cfg(tmp_path, pipeline={"variant": "full"}, **sections)
        return fingerprints(cfg, build_plan("full"))

    base = fps()
    lowered = fps(synthesis={"min_valid_share": 0.1}, root_data={"min_valid_share": 0.0},
                  revision={"min_valid_share": 0.9}, teacher={"min_valid_share": 0.2})
    assert lowered == base
    assert fps(synthesis={"n_samples": 7})["synthesis"] != base["synthesis"]      # a real setting still counts
    with pytest.raises(Exception, match="synthesis.min_valid_share"):
        fps(synthesis={"min_valid_share": 1.5})


def test_mostly_rejects_fails_loudly_keeps_shards_and_lower_floor_reuses_them(ray_local, tmp_path):
    """The pipeline fails a synthesis stage that writes mostly rejects, keeps what it wrote, and a rerun with a
    lower floor (same fingerprint) completes from those shards without generating anything again."""
    from types import SimpleNamespace

    from speed_ray.llm.shards import rejects_output

    def cfg_with(**synthesis):
        # retrieval's 12-word stub JSON is cut at 10 tokens (truncated), classification tasks carry FAIL_ME
        # (generation_error), matching's 8-word JSON fits: 6 of 24 valid
        return _cfg(tmp_path / "run", pipeline={"variant": "direct_instruct"},
                    mixture={"weights": {"retrieval": 2, "classification": 1, "matching": 1}},
                    synthesis={"n_samples": 24, "shard_size": 4, **synthesis,
                               "engine": _faulty(model="stub", max_new_tokens=10)})

    cfg = cfg_with()
    fps = fingerprints(cfg, build_plan("direct_instruct"))
    store = RunStore(cfg.run.run_dir)
    _tasks_stage(store, fps["brainstorm"], fail_types=("classification",))
    with pytest.raises(StageError) as err:
        run_pipeline(cfg, stages=["synthesis"])
    assert ("synthesis: 6 of 24 rows valid (25.0%, floor 50%); top reject reasons: truncated 12, "
            "generation_error 6 (e.g. 'asked to fail (FAIL_ME)')") in str(err.value)
    out = store.stage("synthesis", fps["synthesis"])
    assert not out.done and out.num_rows() == 6 and rejects_output(out).num_rows() == 18
    before = _settled(SimpleNamespace(out=out))

    lowered = cfg_with(min_valid_share=0.2)
    assert fingerprints(lowered, build_plan("direct_instruct")) == fps
    summary = run_pipeline(lowered, stages=["synthesis"])
    assert summary["stages"]["synthesis"]["state"] == "ran" and out.done
    m = out.manifest["metrics"]
    assert m["generated_this_run"] == 0 and m["rows"] == 6 and m["rejected"] == 18
    assert m["valid_share"] == 0.25 and m["min_valid_share"] == 0.2
    assert m["reject_reasons"] == {"truncated": 12, "generation_error": 6}
    for url, mtime in before.items():                  # the written shards were reused untouched
        assert os.stat(out._path(url)).st_mtime_ns == mtime, url


def test_root_data_stage_k_outputs_per_prompt(ray_local, tmp_path):
    from speed_ray.generate.stages import root_data_stage

    cfg = _cfg(tmp_path, root_data={"n_prompts": 6, "samples_per_prompt": 3, "engine": _engine()})
    store = RunStore(cfg.run.run_dir)
    ctx = _ctx(cfg, "root_data", {"tasks": _tasks_stage(store), "generator": _model_stage(store, "junior_sft",
                                                                                          "stub")})
    man = root_data_stage(ctx)
    rows = ctx.out.read_rows()
    assert len(rows) == 6 and len({r["id"] for r in rows}) == 6
    for r in rows:
        assert len(r["outputs"]) == 3 and len(r["samples"]) == 3
        assert len(set(r["outputs"])) == 3              # each of the k samples has its own seed
        assert all(json.loads(s) for s in r["samples"])
        assert r["generator"] == "junior_sft@fp-junior_sft"
    assert man["metrics"]["parse_rate"] == 1.0 and man["metrics"]["valid_share"] == 1.0
    assert all(r["output_reject_reasons"] == ["", "", ""] for r in rows)


def test_root_data_floor_counts_outputs_not_lists(ray_local, tmp_path):
    from speed_ray.generate.stages import root_data_stage

    # 3 of 4 prompts are classification tasks the faulty engine fails: 2 of 8 outputs parse, although every list is
    # written
    cfg = _cfg(tmp_path, root_data={"n_prompts": 4, "samples_per_prompt": 2, "engine": _faulty()},
               mixture={"weights": {"classification": 3, "retrieval": 1}})
    store = RunStore(cfg.run.run_dir)
    ctx = _ctx(cfg, "root_data", {"tasks": _tasks_stage(store, fail_types=("classification",)),
                                  "generator": _model_stage(store, "junior_sft", "stub")})
    with pytest.raises(LowValidShare) as err:
        root_data_stage(ctx)
    assert str(err.value).startswith(
        "root_data: 2 of 8 outputs parsed (25.0%, floor 50%); top reject reasons: generation_error 6 "
        "(e.g. 'asked to fail (FAIL_ME)'). Its shards are kept")
    rows = ctx.out.read_rows()
    assert len(rows) == 4 and sum(r["n_valid"] for r in rows) == 2
    assert sorted(x for r in rows for x in r["output_reject_reasons"]) == [""] * 2 + ["generation_error"] * 6


def test_revision_stage_keeps_original_and_counts_failures(ray_local, tmp_path):
    from speed_ray.generate.stages import revision_stage, synthesis_stage

    cfg = _cfg(tmp_path, synthesis={"n_samples": 10, "shard_size": 4, "engine": _engine(model="stub")},
               revision={"shard_size": 4, "engine": _engine(structured_output=False)})
    store = RunStore(cfg.run.run_dir)
    syn = _ctx(cfg, "synthesis", {"tasks": _tasks_stage(store)})
    synthesis_stage(syn)
    syn.out.write_manifest({"rows": 10})
    ctx = _ctx(cfg, "revision", {"samples": syn.out, "revisor": _model_stage(store, "revisor_sft", "stub")})
    # a revisor that fails on every row is broken: the stage fails, with the failed revisions' reasons, and its
    # rows (each keeping its original sample) stay on disk
    with pytest.raises(LowValidShare, match=r"^revision: 0 of 10 revisions parsed \(0\.0%, floor 50%\); top reject "
                                            r"reasons: missing_key:\w+ \d+") as err:
        revision_stage(ctx)
    man = {"metrics": err.value.metrics}
    rows = ctx.out.read_rows()
    originals = {r["id"]: r for r in syn.out.read_rows()}
    assert len(rows) == 10 and {r["id"] for r in rows} == set(originals)
    for r in rows:   # unconstrained stub output has the wrong keys: every revision fails, the original stays
        o = originals[r["id"]]
        assert r["revision_failed"] and not r["revised"]
        assert r["text"] == o["text"] and r["sample"] == o["sample"] and r["original_text"] == o["text"]
        assert r["valid"] and r["revision_reject_reason"]
    assert man["metrics"]["revision_failed_total"] == 10 and man["metrics"]["parse_rate"] == 0.0

    cfg2 = _cfg(tmp_path, revision={"shard_size": 4, "engine": _engine()})
    ctx2 = StageContext(cfg=cfg2, name="revision", out=store.stage("revision", "fp-rev2"), inputs=ctx.inputs,
                        store=store, run_name="t")
    revision_stage(ctx2)
    for r in ctx2.out.read_rows():
        o = originals[r["id"]]
        assert r["revised"] and not r["revision_failed"]
        assert r["original_sample"] == o["sample"] and r["original_text"] == o["text"]
        assert r["sample"] != o["sample"] and json.loads(r["sample"])


def test_worker_killed_mid_stage_is_retried(ray_local, tmp_path):
    from speed_ray.generate.stages import synthesis_stage

    marker = tmp_path / "crash-once"
    marker.write_text("x")
    cfg = _cfg(tmp_path / "run", synthesis={"n_samples": 24, "shard_size": 4,
                                            "engine": _faulty(model=f"stub:crash_once={marker}")})
    store = RunStore(cfg.run.run_dir)
    ctx = _ctx(cfg, "synthesis", {"tasks": _tasks_stage(store)})
    synthesis_stage(ctx)
    assert not marker.exists()                           # an actor did die
    ids = _all_ids(ctx)
    assert len(ids) == 24 and len(set(ids)) == 24


def _settled(ctx, quiet_s: float = 3.0, timeout_s: float = 120.0) -> dict[str, int]:
    """Shard url -> mtime of the shards holding rows, once nothing has changed for quiet_s (tasks of a failed
    or killed run may still be landing a write), so the rerun is checked against what it will really find."""
    from speed_ray.llm.shards import rejects_output

    import pyarrow.parquet as pq

    def snap():
        out = {}
        for o in (ctx.out, rejects_output(ctx.out)):
            for name in o.shard_names():
                path = o._path(o.shard_url(name))
                # an empty rejects shard holds no ids: a rerun may legitimately rewrite it (sink.py writes it
                # before the data shard, so a run stopped between the two leaves one behind)
                if pq.ParquetFile(path).metadata.num_rows:
                    out[o.shard_url(name)] = os.stat(path).st_mtime_ns
        return out

    last, since, deadline = snap(), time.time(), time.time() + timeout_s
    while time.time() - since < quiet_s and time.time() < deadline:
        time.sleep(0.25)
        cur = snap()
        if cur != last:
            last, since = cur, time.time()
    return last


def _assert_resumed(ctx, man, n: int, partial: set[str], shards_before: dict[str, int]) -> None:
    ids = _all_ids(ctx)
    assert len(ids) == n and len(set(ids)) == n and partial <= set(ids)   # every prompt exactly once
    assert man["metrics"]["generated_this_run"] == n - len(partial)       # only the missing ones were generated
    assert man["metrics"]["rows"] + man["metrics"]["rejected"] == n
    for url, mtime in shards_before.items():                               # written shards are reused, untouched
        assert os.stat(ctx.out._path(url)).st_mtime_ns == mtime, url


def test_stage_failed_mid_way_resumes_exactly_once(ray_local, tmp_path):
    from speed_ray.generate.stages import synthesis_stage

    n = 24
    marker = tmp_path / "fail-once"
    marker.write_text("x")
    out = RunStore(str(tmp_path / "run")).stage("synthesis", "fp-synthesis")
    data_dir = out._path(out.data_url)
    cfg = _cfg(tmp_path / "run", synthesis={"n_samples": n, "shard_size": 4, "engine": _faulty(
        model=f"stub:fail_once={marker},fail_when={data_dir}")})
    store = RunStore(cfg.run.run_dir)
    ctx = _ctx(cfg, "synthesis", {"tasks": _tasks_stage(store)})
    with pytest.raises(Exception, match="injected failure"):
        synthesis_stage(ctx)                             # a worker-side error fails the run with shards written
    assert not marker.exists()
    before = _settled(ctx)
    partial = set(_all_ids(ctx))
    assert len(before) >= 2 and 0 < len(partial) < n
    man = synthesis_stage(ctx)
    _assert_resumed(ctx, man, n, partial, before)


_DRIVER = """
import json, sys
sys.path.insert(0, {repo!r})
import ray
ray.init(address={address!r}, include_dashboard=False, log_to_driver=False)
ray.data.DataContext.get_current().enable_progress_bars = False
from speed_ray.stage import StageContext
from speed_ray.run_config import build_config
from speed_ray.store import RunStore
from speed_ray.generate.stages import synthesis_stage
cfg = build_config(json.loads({cfg!r}))
store = RunStore(cfg.run.run_dir)
ctx = StageContext(cfg=cfg, name="synthesis", out=store.stage("synthesis", "fp-synthesis"),
                   inputs={{"tasks": store.stage("brainstorm", "fp-tasks")}}, store=store, run_name="t")
synthesis_stage(ctx)
"""


@pytest.mark.slow
def test_driver_killed_mid_stage_resumes_exactly_once(ray_local, tmp_path):
    """The `ray job submit` failure: the driver dies (SIGKILL), the cluster lives on, a new driver reruns."""
    from speed_ray.generate.stages import synthesis_stage

    n = 40
    data = {"run": {"run_dir": str(tmp_path / "run"), "seed": 7},
            "synthesis": {"n_samples": n, "shard_size": 2, "engine": _engine(model="stub:delay=0.4", batch_size=2)}}
    cfg = build_config(data)
    store = RunStore(cfg.run.run_dir)
    _tasks_stage(store)
    ctx = _ctx(cfg, "synthesis", {"tasks": store.stage("brainstorm", "fp-tasks")})
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # a second driver on the session's cluster: no second Ray to start on a loaded machine
    address = ray_local.get_runtime_context().gcs_address
    script = _DRIVER.format(repo=repo, address=address, cfg=json.dumps(data))
    log = tmp_path / "driver.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=err, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len(ctx.out.shard_names()) < 3 and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, log.read_text()[-3000:]
        assert len(ctx.out.shard_names()) >= 3, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _settled(ctx)       # Ray reaps the dead job's workers; wait until nothing more lands
    partial = set(_all_ids(ctx))
    assert 0 < len(partial) < n
    man = synthesis_stage(ctx)
    _assert_resumed(ctx, man, n, partial, before)


@pytest.mark.slow
def test_hf_engine_stage_with_tiny_llama(ray_local, tmp_path, tiny_llama):
    from speed_ray.generate.stages import synthesis_stage

    cfg = _cfg(tmp_path, synthesis={"n_samples": 6, "shard_size": 3,
                                    "engine": {"kind": "hf", "batch_size": 3, "max_new_tokens": 48,
                                               "num_cpus_per_replica": 1.0}})
    store = RunStore(cfg.run.run_dir)
    ctx = _ctx(cfg, "synthesis", {"tasks": _tasks_stage(store), "generator": _model_stage(store, "senior_dpo",
                                                                                          tiny_llama)})
    man = synthesis_stage(ctx)
    ids = _all_ids(ctx)
    assert len(ids) == 6 and len(set(ids)) == 6
    m = man["metrics"]
    assert m["rows"] + m["rejected"] == 6 and m["output_tokens_per_s"] > 0
    assert man["engine"]["kind"] == "hf"


def test_adapter_goes_on_its_base_never_on_the_merged_checkpoint(tmp_path):
    """use_adapter with an unreadable adapter_config.json used to fall back to the merged checkpoint (LoRA twice)."""
    from types import SimpleNamespace

    from speed_ray.generate.config import EngineConfig
    from speed_ray.generate.stages import _model_for

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    man = {"model_path": str(tmp_path / "merged"), "adapter_path": str(adapter)}
    up = SimpleNamespace(manifest=man, stage="senior_dpo", fingerprint="f", manifest_url="m.json")
    ctx = SimpleNamespace(name="synthesis", inputs={"generator": up}, log=lambda *a: None)
    eng = EngineConfig(kind="hf", use_adapter=True)
    with pytest.raises(ValueError, match="base model of .*unknown"):
        _model_for(ctx, "generator", eng)
    man["base_model"] = "/models/junior"
    assert _model_for(ctx, "generator", eng)[:2] == ("/models/junior", str(adapter))
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "s3://b/junior/model"}))
    assert _model_for(ctx, "generator", eng)[0] == "s3://b/junior/model"
    assert _model_for(ctx, "generator", EngineConfig(kind="hf"))[:2] == (str(tmp_path / "merged"), None)


def _revisor_batch():
    """Revision rows as the engine returns them: the sample's columns (text renamed source_text), the request
    columns, and the revisor's answer."""
    import pyarrow as pa

    good = json.dumps({"user_query": "new query words", "positive_document": "a new positive passage here",
                       "hard_negative_document": "a new negative passage here"})
    rows = [  # revised | answer without the schema's keys | the engine failed | no sample column value
        {"text": good, "finish_reason": "stop", "error": "", "sample": '{"old": 1}'},
        {"text": '{"nope": 1}', "finish_reason": "stop", "error": "", "sample": '{"old": 2}'},
        {"text": "", "finish_reason": "error", "error": "boom", "sample": '{"old": 3}'},
        {"text": "not json at all", "finish_reason": "length", "error": "", "sample": None},
    ]
    cols = {"id": [f"r{i}" for i in range(4)], "task_type": ["retrieval"] * 4, "prompt": ["p"] * 4,
            "source_text": [f"orig text {i}" for i in range(4)], "sample": [r["sample"] for r in rows],
            "query": [f"q{i}" for i in range(4)], "positive": [f"pos{i}" for i in range(4)],
            "negative": ["neg0", None, "neg2", "neg3"], "valid": [True, True, False, True],
            "reject_reason": ["", "", "too_short", ""], "lineage": ['{"generator": "g"}'] * 4,
            "original_prompt_tokens": [5] * 4,
            "messages": ["[]"] * 4, "temperature": [1.0] * 4, "top_p": [1.0] * 4, "max_tokens": [64] * 4,
            "response_format": [""] * 4, "seed": [1] * 4,
            "text": [r["text"] for r in rows], "prompt_tokens": [3] * 4, "completion_tokens": [7] * 4,
            "cached": [False] * 4, "error": [r["error"] for r in rows], "attempts": [1] * 4,
            "finish_reason": [r["finish_reason"] for r in rows], "engine": ["stub"] * 4}
    return pa.table(cols)


def test_revised_rows_replace_only_what_a_parsed_revision_gives():
    from speed_ray.generate.stages import _RevisedRows

    out = _RevisedRows("revisor_sft@x")(_revisor_batch())
    assert not {"messages", "temperature", "top_p", "max_tokens", "response_format", "seed",
                "source_text"} & set(out.column_names)
    # the sample's columns keep their places; the revision's own come after them, in one fixed order
    assert out.column_names[:11] == ["id", "task_type", "prompt", "sample", "query", "positive", "negative", "valid",
                                     "reject_reason", "lineage", "original_prompt_tokens"]
    assert out.column_names[-7:] == ["engine", "original_text", "original_sample", "revised", "revision_failed",
                                     "text", "revision_reject_reason"]
    r = out.to_pylist()
    assert r[0]["revised"] and not r[0]["revision_failed"] and r[0]["revision_reject_reason"] == ""
    assert (r[0]["query"], r[0]["positive"], r[0]["negative"]) == (
        "new query words", "a new positive passage here", "a new negative passage here")
    assert json.loads(r[0]["sample"])["user_query"] == "new query words" and r[0]["text"].startswith("{")
    assert r[0]["original_text"] == "orig text 0" and r[0]["original_sample"] == '{"old": 1}'
    assert json.loads(r[0]["lineage"]) == {"generator": "g", "revision": "revisor_sft@x"}
    for i in (1, 2, 3):   # not revised: the original sample, text and fields stay; the reason is kept
        assert not r[i]["revised"] and r[i]["revision_failed"]
        assert r[i]["text"] == f"orig text {i}" and r[i]["query"] == f"q{i}" and r[i]["positive"] == f"pos{i}"
        assert json.loads(r[i]["lineage"])["revision"] == "failed"
    assert r[1]["negative"] is None and r[1]["sample"] == '{"old": 2}' and r[1]["valid"]
    assert r[1]["revision_reject_reason"].startswith("missing_key")
    assert r[2]["revision_reject_reason"] == "generation_error" and not r[2]["valid"]
    assert r[2]["reject_reason"] == "too_short"
    assert r[3]["revision_reject_reason"] == "truncated" and r[3]["original_sample"] == "" and r[3]["sample"] is None
    assert r[0]["prompt_tokens"] == 3 and r[0]["original_prompt_tokens"] == 5   # the call's own counts stay


def test_requests_build_messages_from_the_named_columns_only():
    import pyarrow as pa

    from speed_ray.generate.stages import _requests

    class Capture:
        def map_batches(self, fn, **_):
            self.fn = fn
            return self

    seen = []

    def messages(r):
        seen.append(sorted(r))
        return json.dumps([{"role": "user", "content": r["prompt"]}])

    batch = pa.table({"id": ["a", "b"], "task_type": ["retrieval", "sts"], "prompt": ["p1", "p2"],
                      "wide": ["x" * 100] * 2, "seed": [0, 0]})
    out = _requests(Capture(), 0.7, 0.9, 128, True, 3, messages_fn=messages,
                    messages_columns=("prompt", "missing")).fn(batch)
    assert seen == [["prompt"], ["prompt"]]
    assert out.column_names == ["id", "task_type", "prompt", "wide", "seed", "messages", "temperature", "top_p",
                                "max_tokens", "response_format"]
    assert out.column("seed").to_pylist() != [0, 0] and out.column("max_tokens").to_pylist() == [128, 128]
    assert json.loads(out.column("response_format")[0].as_py())["json_schema"]["name"] == "retrieval_sample"
    plain = _requests(Capture(), 1.0, 1.0, 64, False, 3).fn(batch.drop_columns(["seed"]))
    assert plain.column("messages").to_pylist() == ["p1", "p2"] and plain.column("response_format").to_pylist() == ["", ""]
