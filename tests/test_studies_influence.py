"""The influence study's orchestration with fake stages: 2^k models (the empty subset = the base embedder, evaluated
untrained), shared upstream once, the planted category effect found, tables and heatmaps written, resume."""

from __future__ import annotations

import json
import os

import pytest

import studies_fakes
from speed_ray import pipeline
from speed_ray.run_config import build_config
from speed_ray.studies.influence_job import run_influence, subset_config


def _cfg(tmp_path):
    return build_config({"run": {"name": "inf", "run_dir": str(tmp_path / "run")}, "synthesis": {"n_samples": 100},
                         "influence": {"categories": ["retrieval", "classification"], "n_bootstrap": 200,
                                       "n_samples": 10}})


def test_subset_config_trains_on_exactly_that_subset(tmp_path):
    c = subset_config(_cfg(tmp_path), ("retrieval", "classification"))
    assert c.embedder.task_types == ("retrieval", "classification") and c.embedder.n_samples == 20
    assert c.run.name == "inf-infl-retrieval+classification"


def test_two_category_study_finds_the_planted_effect_and_resumes(tmp_path):
    cfg = _cfg(tmp_path)
    out = run_influence(cfg, loader=studies_fakes.fake_load)
    ran = studies_fakes.calls(cfg.run.run_dir)
    assert ran.count("train_embedder") == 3 and ran.count("evaluate") == 3 and ran.count("evaluate_base") == 1
    assert ran.count("synthesis") == 1 and ran.count("senior_dpo") == 1     # one shared pool
    assert sorted(tuple(m["subset"]) for m in out["models"]) == [(), ("classification",), ("retrieval",),
                                                                  ("retrieval", "classification")]
    res = out["result"]
    r, c = res.categories.index("retrieval"), res.categories.index("classification")
    sci, bank = res.tasks.index("SciFact"), res.tasks.index("Banking77Classification")
    # Retrieval data moves SciFact far more than classification data does, and vice versa for Banking77.
    assert res.influence[r, sci] > res.influence[c, sci] + 4
    assert res.influence[c, bank] > res.influence[r, bank] + 2
    by = out["by_category"]
    assert set(by.tasks) == {"STS", "Retrieval", "Classification"}      # task types from the results files
    base = os.path.join(cfg.run.run_dir, "runs", "inf", "influence")
    for f in ("models.json", "influence.json", "influence.md", "heatmap.png", "heatmap_by_category.png"):
        assert os.path.getsize(os.path.join(base, f)) > 0, f
    table = json.load(open(os.path.join(base, "influence.json")))
    assert len(table["per_task"]) == 2 * 4 and {"significant", "lo", "hi"} <= set(table["per_task"][0])
    out2 = run_influence(cfg, loader=studies_fakes.fake_load)
    assert studies_fakes.calls(cfg.run.run_dir) == ran                   # nothing re-runs
    assert out2["states"][""] == "skipped"
