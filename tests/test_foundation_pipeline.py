"""The stage graph over the real store: skip when done, re-run exactly the changed stage and its downstream,
atomic manifests, resume from partial shards, and every variant's DAG."""

from __future__ import annotations

import json

import pytest

from speed_ray import pipeline
from speed_ray.pipeline import StageError, build_plan, fingerprints, run_pipeline
from speed_ray.run_config import build_config
from speed_ray.store import RunStore

CALLS: list[str] = []


def _fake_stage(ctx):
    """Writes one shard naming the stage and its inputs' fingerprints."""
    CALLS.append(ctx.name)
    ups = {role: out.fingerprint for role, out in ctx.inputs.items()}
    ctx.out.write_shard("part-0", [{"id": f"{ctx.name}-0", "stage": ctx.name, "inputs": json.dumps(ups)}])
    return {"metrics": {"ok": 1}}


@pytest.fixture
def fake_stages(monkeypatch):
    CALLS.clear()
    return CALLS


def _cfg(tmp_path, **over):
    data = {"run": {"name": "t", "run_dir": str(tmp_path / "run")}}
    for k, v in over.items():
        section, key = k.split("__")
        data.setdefault(section, {})[key] = v
    return build_config(data)


def test_full_run_then_rerun_skips_everything(tmp_path, fake_stages):
    cfg = _cfg(tmp_path)
    summary = run_pipeline(cfg, loader=lambda fn: _fake_stage)
    plan = build_plan("full")
    # Every stage once, each after its inputs; the independent teacher stages (judge, revise_signals) run together
    # in threads, so their order between themselves is the scheduler's.
    assert sorted(fake_stages) == sorted(s.name for s in plan)
    assert all(fake_stages.index(up) < fake_stages.index(s.name) for s in plan for up in s.inputs.values() if up)
    assert all(s["state"] == "ran" for s in summary["stages"].values())
    fake_stages.clear()
    summary = run_pipeline(cfg, loader=lambda fn: _fake_stage)
    assert fake_stages == []
    assert all(s["state"] == "skipped" for s in summary["stages"].values())


def test_changed_setting_reruns_that_stage_and_downstream_only(tmp_path, fake_stages):
    run_pipeline(_cfg(tmp_path), loader=lambda fn: _fake_stage)
    fake_stages.clear()
    run_pipeline(_cfg(tmp_path, senior_dpo__beta=0.2), loader=lambda fn: _fake_stage)
    # senior_dpo feeds synthesis -> revision -> dedup -> train_embedder -> evaluate; revisor_sft etc. do not change.
    assert fake_stages == ["senior_dpo", "synthesis", "revision", "dedup", "screen", "train_embedder", "evaluate"]
    fake_stages.clear()
    run_pipeline(_cfg(tmp_path, dedup__threshold=0.7), loader=lambda fn: _fake_stage)
    assert fake_stages == ["dedup", "screen", "train_embedder", "evaluate"]


def test_variants_share_a_run_dir_and_reuse_done_stages(tmp_path, fake_stages):
    run_pipeline(_cfg(tmp_path), loader=lambda fn: _fake_stage)
    fake_stages.clear()
    run_pipeline(_cfg(tmp_path, pipeline__variant="no_revisor"), loader=lambda fn: _fake_stage)
    # Everything up to the senior generator is reused; synthesis reads the same senior, so it is reused too.
    assert fake_stages == ["dedup", "screen", "train_embedder", "evaluate"]
    fake_stages.clear()
    run_pipeline(_cfg(tmp_path, pipeline__variant="sft_only"), loader=lambda fn: _fake_stage)
    assert fake_stages == ["synthesis", "dedup", "screen", "train_embedder", "evaluate"]


def test_variant_dags_match_the_paper():
    names = {v: [s.name for s in build_plan(v)] for v in pipeline.VARIANTS}
    assert "senior_dpo" not in names["no_dpo"] and "judge" not in names["no_dpo"]
    assert "revisor_sft" in names["no_dpo"] and "revision" in names["no_dpo"]
    assert "revisor_sft" not in names["no_revisor"] and "revision" not in names["no_revisor"]
    assert "senior_dpo" in names["no_revisor"]
    assert not {"judge", "senior_dpo", "revisor_sft", "root_data", "revision"} & set(names["sft_only"])
    assert not {"seed_data", "junior_sft"} & set(names["direct_instruct"])
    assert "teacher_synthesis" in names["direct_teacher"] and "synthesis" not in names["direct_teacher"]
    plan = {s.name: s for s in build_plan("no_dpo")}
    assert plan["synthesis"].inputs["generator"] == "junior_sft"
    plan = {s.name: s for s in build_plan("full")}
    assert plan["synthesis"].inputs["generator"] == "senior_dpo"
    assert plan["senior_dpo"].inputs["reference"] == "junior_sft"


def test_failed_stage_leaves_no_manifest_and_keeps_shards(tmp_path, monkeypatch):
    calls = []

    def flaky(ctx):
        calls.append(ctx.name)
        if ctx.name == "brainstorm" and not ctx.out.has_shard("a"):
            ctx.out.write_shard("a", [{"id": "x"}])
            raise RuntimeError("killed mid-stage")
        if ctx.name == "brainstorm":
            assert ctx.out.shard_names() == ["a"]  # resumes from what it wrote
            ctx.out.write_shard("b", [{"id": "y"}])
        else:
            ctx.out.write_shard("part-0", [{"id": ctx.name}])

    loader = lambda fn: flaky
    cfg = _cfg(tmp_path)
    with pytest.raises(StageError, match="brainstorm"):
        run_pipeline(cfg, stages=["topics", "brainstorm"], loader=loader)
    fps = fingerprints(cfg, build_plan("full"))
    out = RunStore(cfg.run.run_dir).stage("brainstorm", fps["brainstorm"])
    assert not out.done and out.shard_names() == ["a"]
    run_pipeline(cfg, stages=["topics", "brainstorm"], loader=loader)
    assert out.done and out.manifest["rows"] == 2
    assert calls == ["topics", "brainstorm", "brainstorm"]


def test_stage_needing_an_unfinished_input_names_it(tmp_path, fake_stages):
    with pytest.raises(StageError, match="needs 'junior_sft'"):
        run_pipeline(_cfg(tmp_path), stages=["root_data"], loader=lambda fn: _fake_stage)


def test_unknown_stage_is_an_error(tmp_path, fake_stages):
    with pytest.raises(StageError, match="unknown stage"):
        run_pipeline(_cfg(tmp_path), stages=["nope"], loader=lambda fn: _fake_stage)


def test_manifest_records_settings_versions_and_costs(tmp_path, fake_stages):
    cfg = _cfg(tmp_path)
    run_pipeline(cfg, stages=["topics"], loader=lambda fn: _fake_stage)
    out = RunStore(cfg.run.run_dir).stage("topics", fingerprints(cfg, build_plan("full"))["topics"])
    m = out.manifest
    assert m["stage"] == "topics" and m["rows"] == 1
    assert m["settings"]["topics"]["n_topics"] == cfg.topics.n_topics
    assert "ray" in m["versions"] and "torch" in m["versions"]
    assert set(m["cost"]) >= {"calls", "prompt_tokens", "completion_tokens", "cpu_hours", "gpu_hours"}
    assert m["ended_at"] >= m["started_at"]


def test_local_teacher_runs_only_during_teacher_stages(tmp_path, monkeypatch):
    """The local teacher server holds CPUs: it is up for teacher stages and stopped before any other stage
    (on 2 CPUs a lingering replica starved synthesis's Ray Data operators), then started again when needed."""
    import speed_ray.generate.server as server

    events: list[str] = []
    monkeypatch.setattr(server, "start_local_server", lambda *a: events.append("start") or "http://t/v1")
    monkeypatch.setattr(server, "stop_local_server", lambda: events.append("stop"))

    from speed_ray.teacher.endpoint import teacher_base_url

    def stage(ctx):
        if pipeline._ALL[ctx.name].uses_teacher:
            assert teacher_base_url(ctx) == "http://t/v1"
        events.append(ctx.name)
        ctx.out.write_shard("part-0", [{"id": f"{ctx.name}-0"}])

    loader = lambda fn: stage
    run_pipeline(_cfg(tmp_path), loader=loader)
    seq = " ".join(events)
    assert seq.startswith("topics start brainstorm seed_data stop junior_sft root_data start"), seq
    assert seq[len("topics start brainstorm seed_data stop junior_sft root_data start "):].startswith(
        ("judge revise_signals stop senior_dpo", "revise_signals judge stop senior_dpo")), seq
    assert events.count("start") == events.count("stop") == 2


def test_independent_teacher_stages_run_concurrently(tmp_path, monkeypatch):
    """judge and revise_signals both read root_data: they run at the same time (their requests share the
    endpoint's batches); stages that feed each other (brainstorm -> seed_data) never do. A failure in one keeps
    the other's output and still fails the run."""
    import threading
    import time

    from speed_ray.pipeline import stage_groups

    groups = [[s.name for s in g] for g in stage_groups(build_plan("full"))]
    assert ["judge", "revise_signals"] in groups and ["brainstorm"] in groups and ["seed_data"] in groups
    assert all(len(g) == 1 for g in stage_groups(build_plan("full"), concurrent_teacher=False))

    barrier = threading.Barrier(2, timeout=30)

    def stage(ctx):
        if ctx.name in ("judge", "revise_signals"):
            barrier.wait()          # deadlocks (times out) unless both run at once
            if ctx.name == "judge":
                time.sleep(0.2)
                raise RuntimeError("judge endpoint down")
        ctx.out.write_shard("part-0", [{"id": f"{ctx.name}-0"}])

    loader = lambda fn: stage
    cfg = _cfg(tmp_path)
    with pytest.raises(StageError, match="judge endpoint down"):
        run_pipeline(cfg, loader=loader)
    status = {r["stage"]: r["state"] for r in pipeline.plan_status(cfg)}
    assert status["revise_signals"] == "done" and status["judge"] != "done" and status["senior_dpo"] == "pending"


def test_force_recomputes_from_scratch_and_keeps_the_old_output(tmp_path, monkeypatch):
    """--force re-runs a done stage from nothing (not a resume over its old shards), and the stages that read
    it; old outputs are moved under run_dir/replaced/, never deleted, and fingerprints stay the same."""
    seen: list[tuple[str, int]] = []

    def stage(ctx):
        seen.append((ctx.name, len(ctx.out.shard_names())))
        ctx.out.write_shard("part-0", [{"id": f"{ctx.name}-0"}])

    loader = lambda fn: stage
    cfg = _cfg(tmp_path)
    run_pipeline(cfg, loader=loader)
    seen.clear()
    summary = run_pipeline(cfg, force=["dedup"], loader=loader)
    down = ["dedup", "screen", "train_embedder", "evaluate"]  # what reads dedup's output is recomputed too
    assert [n for n, _ in seen] == down and all(k == 0 for _, k in seen)
    assert all(summary["stages"][n]["state"] == "ran" for n in down)
    assert summary["stages"]["revision"]["state"] == "skipped"
    old = list((tmp_path / "run" / "replaced" / "dedup").iterdir())
    assert len(old) == 1 and (old[0] / "manifest.json").exists() and list((old[0] / "data").glob("*.parquet"))
    assert RunStore(str(tmp_path / "run")).fingerprints("dedup") == [fingerprints(cfg, build_plan("full"))["dedup"]]


def test_run_stage_owns_skip_force_and_the_manifest(tmp_path):
    """The public run_stage: the pipeline, the studies and `train-embedder` all call it. Done -> skipped; forced ->
    the old output set aside and the stage run from nothing; the manifest records settings, rows and cost."""
    from speed_ray.pipeline import run_stage, stage_spec

    seen = []

    def stage(ctx):
        seen.append(len(ctx.out.shard_names()))
        ctx.ledger.calls += 3
        ctx.out.write_shard("part-0", [{"id": "a"}, {"id": "b"}])
        return {"metrics": {"ok": 1}}

    cfg = _cfg(tmp_path, topics__n_topics=7)
    spec = stage_spec("topics")
    fps = fingerprints(cfg, [spec])
    first = run_stage(cfg, spec, fps, loader=lambda fn: stage)
    again = run_stage(cfg, spec, fps, loader=lambda fn: stage)
    forced = run_stage(cfg, spec, fps, loader=lambda fn: stage, force=True)
    assert [first["state"], again["state"], forced["state"]] == ["ran", "skipped", "ran"] and seen == [0, 0]
    man = RunStore(cfg.run.run_dir).stage("topics", fps["topics"]).manifest
    assert man["rows"] == 2 and man["cost"]["calls"] == 3 and man["settings"]["topics"]["n_topics"] == 7
    assert (tmp_path / "run" / "replaced").exists()
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        stage_spec("nope")


def test_stage_facts_are_read_from_the_plan():
    """What the driver prints, the report's generator column and the sweep's cost model come from StageSpec
    facts, so a variant's rewiring needs no list of its own anywhere else."""
    from speed_ray.studies.report import generator_of

    full = {s.name: s for s in build_plan("full")}
    assert [s for s in full if full[s].cost_role == "fixed"] == [
        "seed_data", "junior_sft", "root_data", "judge", "revise_signals", "senior_dpo", "revisor_sft"]
    assert [s for s in full if full[s].cost_role == "unit"] == ["synthesis", "revision"]
    assert {s.name for s in build_plan("direct_teacher") if s.generator_role == "synthesizer"} == {"teacher_synthesis"}
    assert {s.produces for s in full.values()} == {"data", "model", "evaluation"}
    assert all(s.shows_as for s in full.values() if s.produces == "model")
    cfg = {"junior_sft": {"base_model": "J"}, "senior_dpo": {"base_model": "S"}, "teacher": {"model": "T"},
           "synthesis": {"engine": {"model": None}}}
    assert generator_of({**cfg, "pipeline": {"variant": "full"}}) == "S (senior)"
    assert generator_of({**cfg, "pipeline": {"variant": "no_dpo"}}) == "J (junior)"
    assert generator_of({**cfg, "pipeline": {"variant": "sft_only"}}) == "J (junior)"
    assert generator_of({**cfg, "pipeline": {"variant": "direct_teacher"}}) == "T"
    assert generator_of({**cfg, "pipeline": {"variant": "direct_instruct"},
                         "synthesis": {"engine": {"model": "I"}}}) == "I"
