"""The store's promise: change a setting and exactly the stages that depend on it re-run.

A stage's fingerprint hashes only its StageSpec.config_keys, so every setting the stage reads must be under one of
them (or be one that cannot change what it writes: pipeline.NOT_FINGERPRINTED, fields marked {"fingerprint":
False}). The stages run here with ctx.cfg recording what they read (speed_ray.config_view), in the driver and in
their Ray workers, against the fake teacher server and the stub engine; the training and evaluation stages run for
real only in the slow test. And a fingerprint hashes only settings that differ from their defaults, so a field added
to a config class with a default does not re-run finished stages."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import pickle
from pathlib import Path

import pytest

from speed_ray import pipeline
from speed_ray.align.config import DPOTrainerConfig, TrainerConfig
from speed_ray.config import to_dict
from speed_ray.config_view import ConfigView, Recorder, for_workers, replace, unwrap
from speed_ray.pipeline import (NOT_FINGERPRINTED, build_plan, fingerprint_settings, fingerprints, run_pipeline,
                                uncovered_reads)
from speed_ray.run_config import RunConfig, build_config, load_config
from speed_ray.store import RunStore
from speed_ray.teacher.config import JudgeConfig, SamplingConfig, TeacherConfig

from fake_openai import FakeOpenAI  # tests/ is on sys.path under pytest
from test_teacher_stages import responder

TYPES = ["retrieval", "classification", "matching_short", "matching_long", "sts"]


# ---- the recording view -------------------------------------------------------------------------------------
def test_view_records_leaves_and_passes_for_the_config():
    cfg = build_config({"teacher": {"judge_temperature": 0.2}})
    rec = Recorder()
    view = ConfigView(cfg, rec)
    teacher = view.teacher
    assert rec.paths == set()                         # a section is not a read
    assert teacher.judge_temperature == 0.2 and view.teacher.sampling.top_p == 1.0
    assert rec.paths == {"teacher.judge_temperature", "teacher.sampling.top_p"}
    assert isinstance(view, RunConfig) and isinstance(teacher, TeacherConfig)
    assert isinstance(view.senior_dpo, DPOTrainerConfig) and isinstance(view.senior_dpo, TrainerConfig)
    assert dataclasses.is_dataclass(teacher) and [f.name for f in dataclasses.fields(teacher)] == \
        [f.name for f in dataclasses.fields(TeacherConfig)]
    assert repr(teacher) == repr(cfg.teacher) and teacher == cfg.teacher and unwrap(view) is cfg
    assert copy.deepcopy(teacher) is teacher and hash(view.teacher.sampling) == hash(cfg.teacher.sampling)
    assert rec.paths == {"teacher.judge_temperature", "teacher.sampling.top_p"}   # comparing, hashing: no reads
    with pytest.raises(dataclasses.FrozenInstanceError):
        teacher.model = "x"


def test_view_asdict_to_dict_and_replace():
    cfg = RunConfig()
    rec = Recorder()
    view = ConfigView(cfg, rec)
    assert dataclasses.asdict(view.teacher.sampling) == dataclasses.asdict(cfg.teacher.sampling)
    assert rec.paths == {f"teacher.sampling.{k}" for k in ("temperature", "top_p", "max_tokens")}
    assert to_dict(view.judge) == to_dict(cfg.judge) and "judge.n_lists" in rec.paths
    # config_view.replace keeps a view and records only what is read afterwards
    rec.paths.clear()
    per = replace(view.teacher, concurrency=3)
    assert type(per) is ConfigView and isinstance(per, TeacherConfig) and rec.paths == set()
    assert per.concurrency == 3 and per.model == cfg.teacher.model
    assert rec.paths == {"teacher.concurrency", "teacher.model"}
    # plain dataclasses.replace works too; it copies, so reads, every field
    plain = dataclasses.replace(view.teacher, concurrency=5)
    assert type(plain) is TeacherConfig and plain.concurrency == 5 and "teacher.judge_temperature" in rec.paths


def test_view_crossing_a_process_records_into_its_sink(tmp_path):
    cfg = RunConfig()
    plain_view = ConfigView(cfg, Recorder()).teacher
    assert type(pickle.loads(pickle.dumps(plain_view))) is TeacherConfig   # no sink: the plain config travels
    rec = Recorder(str(tmp_path / "sink"))
    remote = pickle.loads(pickle.dumps(ConfigView(cfg, rec).teacher))    # as a Ray worker would get it
    assert type(remote) is ConfigView and isinstance(remote, TeacherConfig)
    assert remote.sampling.max_tokens == cfg.teacher.sampling.max_tokens
    assert rec.paths == set() and rec.all_paths() == {"teacher.sampling.max_tokens"}
    # for_workers: Ray Data's metadata export (dataclasses.asdict in the driver) is not a read; the workers' are
    shipped = for_workers(ConfigView(cfg, rec).teacher)
    assert dataclasses.asdict(shipped) == dataclasses.asdict(cfg.teacher) and rec.paths == set()
    assert pickle.loads(pickle.dumps(shipped)).timeout_s and "teacher.timeout_s" in rec.all_paths()
    assert for_workers(plain_view) is cfg.teacher


# ---- fingerprints: the keys that were missing ----------------------------------------------------------------
def _alone(name: str, cfg: RunConfig) -> str:
    """A stage's fingerprint from its own settings only (its inputs left out)."""
    spec = next(s for s in build_plan("full") if s.name == name)
    return fingerprints(cfg, [pipeline._rewire(spec, **{r: None for r in spec.inputs})])[name]


def _changed(a: RunConfig, b: RunConfig, variant: str = "full") -> set[str]:
    fa, fb = fingerprints(a, build_plan(variant)), fingerprints(b, build_plan(variant))
    return {n for n in fa if fa[n] != fb[n]}


def test_judge_temperature_reruns_the_judge_and_downstream():
    a = build_config({})
    b = build_config({"teacher": {"judge_temperature": 0.7}})
    assert _alone("judge", a) != _alone("judge", b)
    assert _changed(a, b) == {"judge", "senior_dpo", "synthesis", "revision", "dedup", "screen", "train_embedder", "evaluate"}


def test_teacher_sampling_reruns_brainstorm_and_judge():
    a = build_config({})
    for over in ({"top_p": 0.9}, {"max_tokens": 300}):
        b = build_config({"teacher": {"sampling": over}})
        assert _alone("brainstorm", a) != _alone("brainstorm", b), over
        assert _alone("judge", a) != _alone("judge", b), over
        assert _alone("revise_signals", a) != _alone("revise_signals", b), over
    # the judge decodes at judge_temperature, so the sampling temperature is not one of its settings
    b = build_config({"teacher": {"sampling": {"temperature": 0.5}}})
    assert _alone("brainstorm", a) != _alone("brainstorm", b) and _alone("judge", a) == _alone("judge", b)
    assert _changed(a, b) == {s.name for s in build_plan("full")} - {"topics"}


def test_changed_judge_temperature_reruns_judge_in_a_real_run(tmp_path, monkeypatch):
    calls: list[str] = []

    def stage(ctx):
        calls.append(ctx.name)
        ctx.out.write_shard("part-0", [{"id": f"{ctx.name}-0"}])

    loader = lambda fn: stage
    run = {"run": {"name": "t", "run_dir": str(tmp_path / "run")}}
    run_pipeline(build_config(run), loader=loader)
    calls.clear()
    run_pipeline(build_config({**run, "teacher": {"judge_temperature": 0.5}}), loader=loader)
    assert calls == ["judge", "senior_dpo", "synthesis", "revision", "dedup", "screen", "train_embedder", "evaluate"]


# ---- fingerprints: upgrade-stable ------------------------------------------------------------------------------
def _with_new_field(cls: type, name: str = "new_knob", default=3) -> type:
    """cls as a later release might ship it: one more field, with a default."""
    return dataclasses.make_dataclass(cls.__name__, [(name, type(default), dataclasses.field(default=default))],
                                      bases=(cls,), frozen=True)


def _upgrade(obj, **extra):
    return _with_new_field(type(obj))(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, **extra)


def test_a_new_defaulted_field_changes_no_fingerprint():
    cfg = build_config({"teacher": {"sampling": {"top_p": 0.95}, "judge_temperature": 0.1},
                        "judge": {"n_lists": 5}, "revisor_sft": {"max_steps": 7}})
    upgraded = dataclasses.replace(
        cfg, teacher=dataclasses.replace(cfg.teacher, sampling=_upgrade(cfg.teacher.sampling)),
        judge=_upgrade(cfg.judge), revisor_sft=_upgrade(cfg.revisor_sft), topics=_upgrade(cfg.topics),
        senior_dpo=_upgrade(cfg.senior_dpo), root_data=dataclasses.replace(
            cfg.root_data, engine=_upgrade(cfg.root_data.engine)))
    assert upgraded.teacher.sampling.new_knob == 3
    for variant in pipeline.VARIANTS:
        assert _changed(cfg, upgraded, variant) == set(), variant
    # a section left out of the config takes RunConfig's factory values (revisor_sft's learning rate is not the
    # class default): also stable
    bare = RunConfig()
    assert _changed(bare, dataclasses.replace(bare, revisor_sft=_upgrade(bare.revisor_sft))) == set()
    # the new field set away from its default, or a real value changed, does change them
    knob = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher,
                                                                sampling=_upgrade(cfg.teacher.sampling, new_knob=4)))
    assert {"brainstorm", "judge"} <= _changed(cfg, knob)
    assert "revisor_sft" in _changed(cfg, dataclasses.replace(upgraded, revisor_sft=_upgrade(
        dataclasses.replace(cfg.revisor_sft, learning_rate=1e-6))))
    assert _alone("judge", cfg) != _alone("judge", dataclasses.replace(upgraded, judge=_upgrade(JudgeConfig(3))))
    # a default spelled out is the default
    explicit = build_config({"teacher": {"sampling": {"top_p": 0.95, "temperature": 1.0}, "judge_temperature": 0.1,
                                         "model": TeacherConfig().model}, "judge": {"n_lists": 5},
                             "revisor_sft": {"max_steps": 7, "learning_rate": TrainerConfig().learning_rate}})
    assert _changed(cfg, explicit) == set()


def test_manifest_settings_stay_complete_while_the_hash_drops_defaults():
    cfg = build_config({"teacher": {"sampling": {"top_p": 0.9}}})
    spec = next(s for s in build_plan("full") if s.name == "judge")
    settings = fingerprint_settings(cfg, spec)
    assert settings["teacher.judge_temperature"] == 0.0 and settings["teacher.sampling.max_tokens"] == 1024
    assert settings["judge"] == {"n_lists": None} and settings["teacher.model"] == TeacherConfig().model
    assert SamplingConfig().top_p != 0.9


# ---- every stage's reads are fingerprinted ---------------------------------------------------------------
def _reads(root: Path) -> dict[str, set[str]]:
    return {p.stem: set(json.loads(p.read_text())) for p in root.glob("*.json")}


def _assert_reads_covered(cfg: RunConfig, reads: dict[str, set[str]], stages: set[str]) -> None:
    specs = {s.name: s for v in pipeline.VARIANTS for s in build_plan(v)}
    assert stages <= set(reads), f"no reads recorded for {stages - set(reads)}"
    assert all(reads[name] for name in stages)
    uncovered = {name: uncovered_reads(cfg, specs[name], reads[name]) for name in sorted(stages)}
    assert {name: paths for name, paths in uncovered.items() if paths} == {}


@pytest.fixture
def teacher_server():
    with FakeOpenAI(responder=responder) as srv:
        yield srv


@pytest.fixture
def reads_dir(tmp_path, monkeypatch):
    root = tmp_path / "reads"
    root.mkdir()
    monkeypatch.setattr(pipeline, "READS_DIR", str(root))
    return root


def _fake_model_stage(ctx):
    """A trained-generator stand-in: the stub engine does not load the model it is given."""
    return {"model_path": f"stub-{ctx.name}"}


def _fake_eval_stage(ctx):
    ctx.out.write_shard("part-0", [{"id": ctx.name}])
    return {"model_path": f"stub-{ctx.name}"}


FAKED = {"junior_sft": _fake_model_stage, "senior_dpo": _fake_model_stage, "revisor_sft": _fake_model_stage,
         "train_embedder": _fake_eval_stage, "evaluate": _fake_eval_stage}


def _fake_training_config(tmp_path, base_url: str) -> RunConfig:
    engine = {"kind": "stub", "model": "stub", "batch_size": 4, "max_new_tokens": 200, "num_cpus_per_replica": 0.25}
    return build_config({
        "run": {"name": "reads", "run_dir": str(tmp_path / "run"), "seed": 3},
        "topics": {"n_topics": 2}, "brainstorm": {"task_types": TYPES},
        "teacher": {"base_url": base_url, "model": "fake-gpt", "concurrency": 4, "max_retries": 1,
                    "backoff_base_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 5.0, "json_mode": "json_object",
                    "shard_rows": 8, "request_batch_size": 8, "judge_temperature": 0.0,
                    "min_valid_share": 0.0},     # the fake answers revisions of sts samples only
        "seed_data": {"n_samples": 6},
        "root_data": {"n_prompts": 3, "samples_per_prompt": 2, "engine": engine},
        "synthesis": {"n_samples": 6, "shard_size": 4, "engine": engine},
        "revision": {"shard_size": 4, "engine": engine},
        "dedup": {"fields": ["query", "positive"], "num_perm": 32},
        "embedder": {"base_model": "offline:minilm"},      # the screen stage's guide
        "screen": {"batch_size": 8, "cpus_per_actor": 0.5},
    })


def fake_training(fn: str):
    """The stage loader with the training and evaluation stages replaced by stand-ins (they run for real in the slow
    rehearsal test)."""
    return FAKED.get(fn.rsplit(":", 1)[1].removesuffix("_stage")) or pipeline.load_stage(fn)


def test_teacher_stages_read_only_fingerprinted_settings(ray_local, tmp_path, teacher_server, reads_dir):
    """The teacher stages up to the judge, for real on small inputs at the fake server (the judge builds its
    requests in Ray workers), root_data on the stub engine."""
    cfg = _fake_training_config(tmp_path, teacher_server.base_url)
    stages = ["topics", "brainstorm", "seed_data", "junior_sft", "root_data", "judge"]
    summary = run_pipeline(cfg, stages=stages, loader=fake_training)
    assert [n for n, s in summary["stages"].items() if s["state"] == "ran"] == stages
    reads = _reads(reads_dir)
    _assert_reads_covered(cfg, reads, set(stages) - set(FAKED))
    # the judge's reads in its Ray workers are the ones its fingerprint used to miss
    assert {"teacher.judge_temperature", "teacher.sampling.top_p", "teacher.sampling.max_tokens"} <= reads["judge"]
    assert "teacher.sampling.temperature" not in reads["judge"]
    assert {"teacher.sampling.temperature", "teacher.sampling.top_p"} <= reads["brainstorm"]
    old_judge = dataclasses.replace(next(s for s in build_plan("full") if s.name == "judge"),
                                    config_keys=("judge", "teacher.model", "teacher.local_server.model",
                                                 "teacher.json_mode"))
    # (run.seed and teacher.seed_requests: the per-request seed every teacher request carries since)
    assert uncovered_reads(cfg, old_judge, reads["judge"]) == [
        "run.seed", "teacher.judge_temperature", "teacher.sampling.max_tokens", "teacher.sampling.top_p",
        "teacher.seed_requests"]


@pytest.mark.slow
def test_every_stage_but_training_reads_only_fingerprinted_settings(ray_local, tmp_path, teacher_server, reads_dir):
    """Every stage of every variant but training and evaluation, for real: generation on the stub engine, dedup."""
    cfg = _fake_training_config(tmp_path, teacher_server.base_url)
    summary = run_pipeline(cfg, loader=fake_training)
    assert all(s["state"] == "ran" for s in summary["stages"].values())
    for variant, stages in (("direct_teacher", ["teacher_synthesis"]), ("direct_instruct", ["synthesis"])):
        run_pipeline(dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, variant=variant)),
                     stages=stages, loader=fake_training)
    every = {s.name for v in pipeline.VARIANTS for s in build_plan(v)}
    _assert_reads_covered(cfg, _reads(reads_dir), every - set(FAKED))


def test_screen_reads_only_fingerprinted_settings(ray_local, tmp_path, reads_dir):
    """The screen stage for real (MiniLM guide in its Ray actors, decontamination index in a Ray task) on a few
    deduplicated rows: every setting it reads, in the driver and in its workers, is under its config_keys."""
    cfg = build_config({"run": {"name": "r", "run_dir": str(tmp_path / "run")},
                        "embedder": {"base_model": "offline:minilm"},
                        "screen": {"batch_size": 4, "cpus_per_actor": 0.5, "margin": 0.1}})
    fps = fingerprints(cfg, build_plan("full"))
    dedup = RunStore(cfg.run.run_dir).stage("dedup", fps["dedup"])
    dedup.write_shard("part-0", [{"id": f"d{i}", "task": "Find the answer", "task_type": "qa",
                                  "query": f"question number {i} about rivers", "positive": f"answer {i} on rivers",
                                  "negative": "a recipe for bread" if i % 2 else "", "lineage": "{}"}
                                 for i in range(6)])
    dedup.write_manifest({"stage": "dedup", "fingerprint": fps["dedup"]})
    summary = run_pipeline(cfg, stages=["screen"])
    assert summary["stages"]["screen"]["state"] == "ran"
    reads = _reads(reads_dir)
    _assert_reads_covered(cfg, reads, {"screen"})
    assert {"screen.margin", "screen.guide_model", "embedder.base_model", "evaluate.local_tasks"} <= reads["screen"]
    assert {"screen.max_length", "screen.instructions"} <= reads["screen"]


def test_an_uncovered_read_is_warned_about(tmp_path, monkeypatch, caplog):
    def stage(ctx):
        _ = ctx.cfg.teacher.judge_temperature, ctx.cfg.topics.n_topics, ctx.cfg.run.run_dir
        ctx.out.write_shard("part-0", [{"id": "x"}])

    loader = lambda fn: stage
    cfg = build_config({"run": {"name": "t", "run_dir": str(tmp_path / "run")}})
    with caplog.at_level(logging.WARNING, logger="speed_ray"):
        run_pipeline(cfg, stages=["topics"], loader=loader)
    warned = [r.getMessage() for r in caplog.records if "does not cover" in r.getMessage()]
    assert len(warned) == 1 and "teacher.judge_temperature" in warned[0] and "n_topics" not in warned[0]


def test_not_fingerprinted_names_real_settings():
    cfg = RunConfig()
    for path in NOT_FINGERPRINTED:
        node = cfg
        for part in path.split("."):
            assert dataclasses.is_dataclass(node) and part in {f.name for f in dataclasses.fields(node)}, path
            node = getattr(node, part)
    keys = {k for v in pipeline.VARIANTS for s in build_plan(v) for k in s.config_keys}
    assert not {p for p in NOT_FINGERPRINTED for k in keys if p == k or p.startswith(k + ".")}


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_every_stage_of_every_variant_reads_only_fingerprinted_settings(ray_local, tmp_path, tiny_llama, evaldata,
                                                                        teacher_server, reads_dir):
    """configs/rehearsal.yaml (the paper's kinds of settings, shrunk) with every stage for real, training and
    evaluation included, on a local run directory; then the stages the other variants wire differently."""
    cfg = load_config("configs/rehearsal.yaml", [f"run.run_dir={tmp_path / 'run'}",
                                                 f"teacher.base_url={teacher_server.base_url}",
                                                 "synthesis.engine.model=stub"])
    summary = run_pipeline(cfg)
    assert all(s["state"] == "ran" for s in summary["stages"].values())
    for variant, stages in (("sft_only", ["synthesis"]), ("no_dpo", ["synthesis", "revision"]),
                            ("direct_instruct", ["synthesis"]), ("direct_teacher", ["teacher_synthesis"])):
        run_pipeline(dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, variant=variant)),
                     stages=stages)
    every = {s.name for v in pipeline.VARIANTS for s in build_plan(v)}
    _assert_reads_covered(cfg, _reads(reads_dir), every)
    assert RunStore(cfg.run.run_dir).stage("evaluate", fingerprints(cfg, build_plan("full"))["evaluate"]).done


def test_fingerprints_need_no_working_directory(monkeypatch):
    """A Ray job's driver may have no working directory left when the pipeline computes fingerprints. Comparing
    settings with their defaults must not build default sections (RunSection resolves run_dir against the working
    directory): `ray job submit ... jobs.speed_pipeline` failed with a bare "[Errno 2]" before."""
    import os

    from speed_ray.run_config import load_config

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"), ["run.run_dir=/tmp/x"])
    plan = pipeline.build_plan(cfg.pipeline.variant)

    def gone():
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(os, "getcwd", gone)
    fps = pipeline.fingerprints(cfg, plan)
    monkeypatch.undo()
    assert fps == pipeline.fingerprints(cfg, plan)
