"""The scaling sweep's orchestration with light fake stages: the grid, nested sizes, shared upstream stages run
once, resume point by point, Ray fan-out, and the fits/plots/tables written under runs/<name>/sweep/."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("RAY_raylet_start_wait_time_s", "180")   # this CI box is heavily loaded; Ray starts slowly

import studies_fakes  # noqa: E402
from speed_ray import pipeline
from speed_ray.run_config import build_config
from speed_ray.studies import sweep
from speed_ray.studies.sweep import grid_points, point_slots, run_sweep


def _cfg(tmp_path, **sweep_cfg):
    return build_config({"run": {"name": "sw", "run_dir": str(tmp_path / "run"), "num_cpus": 2},
                         "synthesis": {"n_samples": 400},
                         "sweep": {"sizes": [25, 100, 400], "n_bootstrap": 50, **sweep_cfg}})


def test_grid_is_sizes_by_axes_by_seeds_with_distinct_names(tmp_path):
    cfg = _cfg(tmp_path, axes={"synthesis.temperature": [0.2, 1.0]}, seeds=[0, 1])
    pts = grid_points(cfg)
    assert len(pts) == 3 * 2 * 2
    assert len({p.name for p in pts}) == len(pts)
    p = next(p for p in pts if p.n == 100 and p.seed == 1 and p.axes == {"synthesis.temperature": 0.2})
    c = sweep.point_config(cfg, p)
    assert (c.embedder.n_samples, c.run.seed, c.synthesis.temperature, c.run.name) == (100, 1, 0.2, p.name)


def test_point_slots_never_oversubscribe_a_small_cluster():
    # 2 CPUs, 1 per point task + 1 per trainer worker: one point at a time, not two deadlocked tasks.
    assert point_slots(4, 1.0, 1.0, 2.0) == (1, 1.0)
    assert point_slots(4, 0.5, 1.0, 8.0) == (4, 0.5)
    slots, cpus = point_slots(2, 2.0, 1.0, 2.0)     # a point cannot reserve what its trainer needs
    assert (slots, cpus) == (1, 1.0)
    assert point_slots(3, 1.0, 0.0, 0.0) == (3, 1.0)   # autoscaling cluster with no CPUs yet: trust the config


def test_three_point_sweep_shares_upstream_fits_and_resumes(tmp_path):
    cfg = _cfg(tmp_path)
    res = run_sweep(cfg, loader=studies_fakes.fake_load)
    run_dir = cfg.run.run_dir
    ran = studies_fakes.calls(run_dir)
    upstream = sweep.upstream_stages(cfg)
    assert all(ran.count(s) == 1 for s in upstream)           # the shared pool is made once
    assert ran.count("train_embedder") == 3 and ran.count("evaluate") == 3
    # Nested subsets of one pool: each point trains on exactly N rows of the same dedup output.
    assert [p["rows_used"] for p in res["points"]] == [25, 100, 400]
    fps = {pipeline.plan_status(sweep.point_config(cfg, p))[-3]["fingerprint"] for p in grid_points(cfg)}
    assert len(fps) == 1
    base = os.path.join(run_dir, "runs", "sw", "sweep")
    for f in ("points.json", "fits.json", "scaling.png", "sweep.md"):
        assert os.path.getsize(os.path.join(base, f)) > 0, f
    fits = json.load(open(os.path.join(base, "fits.json")))["all"]["fits"]
    # The fakes' average follows a + b ln N with b = mean(SLOPE)/3.
    b = sum(studies_fakes.SLOPE.values()) / len(studies_fakes.SLOPE) / 3
    assert fits["loglinear"]["params"]["b"] == pytest.approx(b, abs=0.1)
    assert fits["loglinear"]["predictions"]["10x"]["n"] == 4000
    assert "params" in fits["power"]
    md = open(os.path.join(base, "sweep.md")).read()
    assert "loglinear" in md and "Cost per point" in md
    # Second invocation: nothing runs, every point is skipped.
    res2 = run_sweep(cfg, loader=studies_fakes.fake_load)
    assert studies_fakes.calls(run_dir) == ran
    assert all(set(p["stages"].values()) == {"skipped"} for p in res2["points"])


def test_interrupted_sweep_resumes_point_by_point(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    real = studies_fakes.fake_stage

    def dies_on_last_point(ctx):
        if ctx.name == "train_embedder" and ctx.cfg.embedder.n_samples == 400:
            raise RuntimeError("node lost")
        return real(ctx)

    loader = lambda fn: dies_on_last_point
    with pytest.raises(pipeline.StageError, match="node lost"):
        run_sweep(cfg, loader=loader)
    before = studies_fakes.calls(cfg.run.run_dir)
    loader = studies_fakes.fake_load
    res = run_sweep(cfg, loader=loader)
    new = studies_fakes.calls(cfg.run.run_dir)[len(before):]
    assert new == ["train_embedder", "evaluate"]                # only the unfinished point ran
    states = {p["n"]: p["stages"]["train_embedder"] for p in res["points"]}
    assert states == {25: "skipped", 100: "skipped", 400: "ran"}


def test_points_fan_out_as_ray_tasks(tmp_path, ray_local, monkeypatch):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(studies_fakes)   # the fake stages travel to the Ray workers by value
    monkeypatch.setattr(sweep, "_slots", lambda m, c, cfg: (2, 0.25))
    cfg = _cfg(tmp_path, max_concurrent=2, num_cpus_per_point=0.25)
    res = run_sweep(cfg, loader=studies_fakes.fake_load)
    assert [p["state"] for p in res["points"]] == ["done"] * 3
    assert studies_fakes.calls(cfg.run.run_dir).count("train_embedder") == 3


def test_points_larger_than_the_pool_are_skipped_with_a_reason(tmp_path):
    cfg = _cfg(tmp_path, sizes=[50, 100, 1000])
    res = run_sweep(cfg, loader=studies_fakes.fake_load)
    assert [p["n"] for p in res["points"]] == [50, 100]
    assert "1000 > 400" in res["skipped_points"][0]
    assert "skipped" in res["fits"]["all"]["fits"]["power"]     # two sizes cannot fit three parameters


def test_one_setting_grid_draws_score_per_value(tmp_path):
    cfg = _cfg(tmp_path, sizes=[100], axes={"senior_dpo.beta": [0.05, 0.1, 0.3]})
    res = run_sweep(cfg, loader=studies_fakes.fake_load)
    assert len(res["points"]) == 3
    ran = studies_fakes.calls(cfg.run.run_dir)
    assert ran.count("senior_dpo") == 3 and ran.count("junior_sft") == 1   # each beta re-runs DPO and downstream only
    assert os.path.getsize(os.path.join(cfg.run.run_dir, "runs", "sw", "sweep", "axis.png")) > 0


@pytest.mark.slow
def test_real_three_point_sweep_on_the_tiny_config(tmp_path, ray_local, evaldata):
    """The real stages end to end: one tiny pool, three nested sizes, fits and plots (tens of minutes on 2 CPUs)."""
    from pathlib import Path

    from speed_ray.run_config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "experiments" / "tiny_sweep.yaml",
                      [f"run.run_dir={tmp_path / 'run'}"])
    res = run_sweep(cfg)
    done = [p for p in res["points"] if p["state"] == "done"]
    assert len(done) + len(res["skipped_points"]) == 3 and len(done) >= 2
    assert [p["rows_used"] for p in done] == sorted(p["rows_used"] for p in done)
    assert all(p["scores"] for p in done)
    assert os.path.exists(os.path.join(cfg.run.run_dir, "runs", "tiny-sweep", "sweep", "sweep.md"))
