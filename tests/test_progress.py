"""Progress in the user's units: the pure core (shard counts -> a Progress -> a line) and the driver-side monitor
around real pipeline runs (real Parquet shards, real threads), in the terminal and in runs/<name>/progress.log."""

from __future__ import annotations

import io
import json
import os
import time

import pyarrow as pa
import pytest

from speed_ray import pipeline
from speed_ray.progress import (Expectation, expectation, format_line, progress_record, read_steps, shard_stats)
from speed_ray.run_config import build_config


def test_shard_stats_count_requests_once_and_their_tokens_once():
    # a brainstorm request writes several rows, each carrying the request's tokens
    t = pa.table({"request_id": ["a", "a", "b"], "prompt_tokens": [10, 10, 7], "completion_tokens": [5, 5, 3]})
    s = shard_stats(t)
    assert (s.units, s.valid, s.prompt_tokens, s.completion_tokens) == (2, 2, 17, 8)
    rej = shard_stats(pa.table({"request_id": ["c", "d"], "reject_reason": ["no_json", ""]}), rejects=True)
    assert (rej.units, rej.valid, rej.reasons) == (2, 0, {"no_json": 1, "invalid": 1})
    mixed = shard_stats(pa.table({"valid": [True, False, False], "reject_reason": ["", "truncated", "truncated"]}))
    assert (mixed.units, mixed.valid, mixed.reasons) == (3, 1, {"truncated": 2})


def test_record_has_valid_share_top_reasons_tokens_cost_rate_and_eta():
    data = [shard_stats(pa.table({"request_id": [f"r{i}" for i in range(80)], "prompt_tokens": [100] * 80,
                                  "completion_tokens": [50] * 80}))]
    rej = [shard_stats(pa.table({"request_id": [f"x{i}" for i in range(20)],
                                 "reject_reason": ["no_json"] * 12 + ["truncated"] * 5 + ["refusal"] * 2 + ["x"],
                                 "prompt_tokens": [100] * 20, "completion_tokens": [50] * 20}), rejects=True)]
    p = progress_record("seed_data", Expectation("requests", 400), 10.0, data, rej, done_at_start=50,
                        usd_per_mtok=(1.0, 2.0))
    assert (p.done, p.total, p.valid, p.answered) == (100, 400, 80, 100)
    assert p.reasons == (("no_json", 12), ("truncated", 5), ("refusal", 2))
    assert p.tokens == 15_000 and p.usd == pytest.approx((10_000 * 1 + 5_000 * 2) / 1e6)
    assert p.rate == pytest.approx(5.0) and p.eta_s == pytest.approx(60.0)     # (100-50)/10 s; 300 left
    line = format_line(p)
    for part in ("seed_data  100/400 requests (25%)", "valid 80.0%", "rejects no_json 12, truncated 5, refusal 2",
                 "tokens 15.0k", "$0.0200", "5 requests/s", "ETA 1m00s"):
        assert part in line, (part, line)


def test_training_progress_reads_the_step_log():
    steps = read_steps('{"step": 1, "total_steps": 8, "loss": 2.5}\n{"step": 2, "total_steps": 8, "loss": 2.0}\n{"st')
    p = progress_record("train_embedder", Expectation("steps", None), 4.0, steps=steps)
    assert (p.done, p.total, p.loss) == (2, 8, 2.0) and p.valid is None
    assert "train_embedder  2/8 steps (25%)" in format_line(p) and "loss 2.0000" in format_line(p)


def test_expectation_from_config_and_inputs():
    from speed_ray.pipeline import stage_spec

    cfg = {"synthesis": {"n_samples": 500}, "judge": {"n_lists": 30}, "revise_signals": {"n_samples": None},
           "brainstorm": {"task_types": ["retrieval", "sts"]}, "root_data": {"n_prompts": 40}}

    def exp(stage, rows):   # the unit and the counting are the stage's StageSpec facts
        spec = stage_spec(stage)
        return expectation(stage, cfg, rows, spec.unit, spec.counted_by)

    assert exp("synthesis", {"tasks": 9}) == Expectation("samples", 500)
    assert exp("teacher_synthesis", {}) == Expectation("requests", 500)
    assert exp("judge", {"root": 12}) == Expectation("requests", 12)      # fewer lists than asked
    assert exp("revise_signals", {"root": 12}) == Expectation("requests", 12)
    assert exp("brainstorm", {"topics": 10}) == Expectation("requests", 20)
    assert exp("revision", {"samples": 77}) == Expectation("samples", 77)
    assert exp("dedup", {"samples": 77}) == Expectation("steps", 4, "markers")
    assert exp("train_embedder", {"data": 77}) == Expectation("steps", None, "step_log")   # the step log says


# ---- the monitor around real runs ----------------------------------------------------------------------------
def _slow_stage(ctx) -> dict:
    """Writes its output in a few shards over ~0.6 s: data rows, rejects with reasons, teacher tokens."""
    from speed_ray.llm.shards import rejects_output as rejects_of
    from speed_ray.steplog import StepLog, steps_url

    name = ctx.name
    if name == "train_embedder":
        log = StepLog(steps_url(ctx.out.artifacts_url), min_interval_s=0)
        for s in range(1, 6):
            log.log(s, 5, loss=3.0 - 0.4 * s)
            time.sleep(0.12)
        return {"model_path": ctx.out.artifact("model")}
    if name == "evaluate":
        return {"scores": {}}
    if name == "topics":
        ctx.out.write_shard("t", [{"id": f"t{i}"} for i in range(4)])
        return {}
    rej = rejects_of(ctx.out)
    for k in range(4):
        ctx.out.write_shard(f"p{k}", [{"id": f"{k}-{i}", "request_id": f"{k}-{i}", "valid": True,
                                       "prompt_tokens": 100, "completion_tokens": 40} for i in range(4)])
        rej.write_shard(f"p{k}", [{"request_id": f"{k}-r", "reject_reason": "no_json" if k else "truncated",
                                   "prompt_tokens": 100, "completion_tokens": 40}])
        time.sleep(0.15)
    if name == "dedup" and os.environ.get("SR_TEST_FAIL_DEDUP"):
        raise RuntimeError("planted failure")
    return {}


@pytest.fixture
def slow(monkeypatch):
    monkeypatch.setenv("SPEED_RAY_PROGRESS", "1")
    monkeypatch.setenv("SPEED_RAY_PROGRESS_INTERVAL", "0.1")


def _slow_loader(fn: str):
    return _slow_stage


def _cfg(tmp_path):
    return build_config({"run": {"name": "demo", "run_dir": str(tmp_path / "run")},
                         "pipeline": {"variant": "direct_teacher"}, "synthesis": {"n_samples": 20},
                         "teacher": {"model": "gpt-4o-mini"}})


def test_monitor_writes_every_stage_progress_to_the_log_and_the_terminal(tmp_path, slow, capsys):
    cfg = _cfg(tmp_path)
    pipeline.run_pipeline(cfg, loader=_slow_loader)
    lines = (tmp_path / "run" / "runs" / "demo" / "progress.log").read_text().splitlines()
    by_stage = {}
    for ln in lines:
        by_stage.setdefault(ln.split()[2], []).append(ln)
    assert set(by_stage) == {"topics", "brainstorm", "teacher_synthesis", "dedup", "screen", "train_embedder",
                             "evaluate"}
    syn = by_stage["teacher_synthesis"]
    assert len(syn) >= 3, syn                                  # lines while it ran, not only the last one
    assert any("/20 requests" in ln and "valid 80.0%" in ln for ln in syn[:-1]), syn
    last = syn[-1]
    assert "[done]" in last and "20/20 requests (100%)" in last and "rejects no_json 3, truncated 1" in last
    assert "tokens 2.8k" in last and "$0.0" in last and "took " in last   # 20 requests x 140 tokens, priced
    assert "valid" not in by_stage["topics"][-1]               # topics are not parsed: no valid share
    emb = by_stage["train_embedder"][-1]
    assert "5/5 steps (100%)" in emb and "loss 1.0000" in emb and "[done]" in emb
    err = capsys.readouterr().err
    assert "teacher_synthesis [done]  20/20 requests" in err   # the same lines on a non-TTY stderr
    assert "Total Progress" not in err


def test_a_failed_stage_says_so(tmp_path, slow, monkeypatch):
    monkeypatch.setenv("SR_TEST_FAIL_DEDUP", "1")
    with pytest.raises(pipeline.StageError, match="planted failure"):
        pipeline.run_pipeline(_cfg(tmp_path), loader=_slow_loader)
    log = (tmp_path / "run" / "runs" / "demo" / "progress.log").read_text()
    assert "dedup [failed]" in log


def test_the_bar_on_a_terminal_is_tqdm(tmp_path):
    from speed_ray.monitor import StageMonitor
    from speed_ray.store import RunStore

    class Tty(io.StringIO):
        def isatty(self):
            return True

    store = RunStore(str(tmp_path))
    out = store.stage("synthesis", "fp")
    out.write_shard("a", [{"id": str(i), "valid": i % 4 != 0, "reject_reason": "" if i % 4 else "no_json"}
                          for i in range(8)])
    tty = Tty()
    mon = StageMonitor(out, Expectation("samples", 16), store.run_url("r", "progress.log"), store, interval=60,
                       stream=tty).start()
    mon.stop("done")
    shown = tty.getvalue()
    assert "synthesis 8/16 samples" in shown and "50%" in shown and "50%, valid 75.0%" in shown
    assert "|##########          |" in shown or "█" in shown            # a bar, not only numbers
    assert json.dumps(mon.last.as_dict())    # the record serializes (status --watch --json)


# ---- `speed-ray status RUN_DIR --watch`: a run driven by another thread, seen from its run directory only ------
def test_status_watch_follows_a_run_to_its_end(tmp_path, slow, monkeypatch, capsys):
    import threading

    from speed_ray.cli import main

    monkeypatch.setenv("SPEED_RAY_PROGRESS_INTERVAL", "0.05")
    cfg = _cfg(tmp_path)
    pipeline.run_pipeline(cfg, stages=["topics"], loader=_slow_loader)   # the run exists (plan.json) before the watch starts
    capsys.readouterr()
    started = threading.Event()

    def loader(fn: str):      # the run has rewritten its plan.json once a stage starts
        started.set()
        return _slow_stage

    runner = threading.Thread(target=pipeline.run_pipeline, args=(cfg,), kwargs={"loader": loader})
    runner.start()
    # Watched before the new run rewrites plan.json, the first run's summary would say it finished (it had).
    assert started.wait(60)
    try:
        rc = main(["status", str(tmp_path / "run"), "--watch", "--interval", "0.1"])
    finally:
        runner.join()
    out = capsys.readouterr().out
    assert rc == 0 and out.rstrip().endswith("finished: every stage is done"), out[-2000:]
    frames = out.split("run demo (direct_teacher)")[1:]
    assert len(frames) >= 3
    assert any("[pending]" in f for f in frames)                         # later stages before they start
    running = [ln for f in frames for ln in f.splitlines() if ln.strip().startswith("teacher_synthesis  ")]
    assert any("/20 requests" in ln and "valid 80.0%" in ln and "tokens" in ln and "ETA" in ln for ln in running), \
        running
    assert "teacher_synthesis [done]" in frames[-1] and "train_embedder [done]" in frames[-1]


def test_status_watch_names_bad_input(tmp_path, capsys):
    from speed_ray.cli import main

    assert main(["status", str(tmp_path / "nope"), "--watch"]) == 2
    err = capsys.readouterr().err
    assert "run directory" in err and "does not exist" in err
    runs = tmp_path / "run" / "runs" / "r"
    runs.mkdir(parents=True)
    (runs / "plan.json").write_text('{"variant": "full", "stages": [')
    assert main(["status", str(tmp_path / "run"), "--watch"]) == 2
    err = capsys.readouterr().err
    assert "plan.json is not valid JSON" in err and str(runs) in err
    (runs / "plan.json").write_text(json.dumps({"variant": "x", "stages": [{"stage": "topics", "fingerprint": "f"}]}))
    man = tmp_path / "run" / "stages" / "topics" / "f" / "manifest.json"
    man.parent.mkdir(parents=True)
    man.write_text("{not json")
    assert main(["status", str(tmp_path / "run"), "--watch", "--run", "r"]) == 2
    err = capsys.readouterr().err
    assert "corrupt manifest" in err and str(man) in err


def test_ray_operator_output_is_quiet_unless_verbose(monkeypatch):
    import logging

    import ray.data

    from speed_ray.raylocal import quiet_ray

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.enable_operator_progress_bars, ctx.print_on_execution_start)
    names = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "ray.data._internal.progress")
    levels = {n: logging.getLogger(n).level for n in names}
    try:
        monkeypatch.delenv("SPEED_RAY_VERBOSE", raising=False)
        quiet_ray()
        assert not (ctx.enable_progress_bars or ctx.enable_operator_progress_bars or ctx.print_on_execution_start)
        assert logging.getLogger("ray.data").level == logging.WARNING
        monkeypatch.setenv("SPEED_RAY_VERBOSE", "1")          # what `speed-ray -v` sets
        quiet_ray()
        assert ctx.enable_progress_bars and ctx.enable_operator_progress_bars and ctx.print_on_execution_start
        assert logging.getLogger("ray.data").level == logging.INFO
    finally:
        ctx.enable_progress_bars, ctx.enable_operator_progress_bars, ctx.print_on_execution_start = saved
        for n, lv in levels.items():
            logging.getLogger(n).setLevel(lv)


def test_jobs_pass_verbose_to_the_cli(monkeypatch):
    import speed_ray.cli as cli
    from jobs._entry import job_main

    seen = []
    monkeypatch.setattr(cli, "main", lambda argv: seen.append(argv) or 0)
    assert job_main("x", argv=["--config", "c.yaml", "-v", "a.b=1"]) == 0
    assert seen == [["run", "c.yaml", "a.b=1", "-v"]]


def test_a_local_rays_workers_keep_ray_trains_info_and_cleaner_warnings_out_unless_verbose(monkeypatch):
    """Ray Train's per-report INFO lines and its placement-group cleaner's warning every few seconds (a local Ray
    has no dashboard, so no state API) reached the demo's terminal 260 times; a worker setup hook quiets them."""
    import importlib
    import logging

    import ray

    from speed_ray import raylocal

    seen = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append(kw))
    monkeypatch.setattr(raylocal, "quiet_ray", lambda: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("SPEED_RAY_VERBOSE", "0")
    raylocal.ensure_ray(None, 2)
    hook = seen[-1]["runtime_env"]["worker_process_setup_hook"]
    mod, fn = hook.rsplit(".", 1)
    cleaner = logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner")
    old = cleaner.level, logging.getLogger("ray.train").level
    try:
        getattr(importlib.import_module(mod), fn)()          # what each worker process runs first
        assert cleaner.getEffectiveLevel() == logging.ERROR
        assert logging.getLogger("ray.train").getEffectiveLevel() == logging.WARNING
    finally:
        cleaner.setLevel(old[0])
        logging.getLogger("ray.train").setLevel(old[1])
    monkeypatch.setenv("SPEED_RAY_VERBOSE", "1")
    raylocal.ensure_ray(None, 2)
    assert "worker_process_setup_hook" not in seen[-1]["runtime_env"]
