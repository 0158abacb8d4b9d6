"""The paper's experiments as configs: the ablations' DAGs are Table 2's, the tiny ablations reuse the stages the
tiny run already finished, and the grids / baselines / generator comparison carry the paper's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

import studies_fakes
from speed_ray import pipeline
from speed_ray.config import read_yaml
from speed_ray.pipeline import build_plan, run_pipeline
from speed_ray.run_config import load_config

EXP = Path(__file__).resolve().parents[1] / "configs" / "experiments"
TABLE2 = {"full": 63.2, "sft_only": 62.6, "no_dpo": 62.8, "no_revisor": 62.9}


@pytest.mark.parametrize("variant", list(TABLE2))
def test_paper_ablations_are_table_2(variant):
    d = read_yaml(EXP / f"ablation_{variant}.yaml")
    assert d["pipeline"]["variant"] == variant and d["pipeline"]["paper_result"] == TABLE2[variant]
    assert d["synthesis"]["n_samples"] == 230000
    assert d["run"]["run_dir"] == read_yaml(EXP.parent / "paper.yaml")["run"]["run_dir"]   # they share stages
    tiny = load_config(EXP / f"tiny_ablation_{variant}.yaml")
    assert tiny.pipeline.variant == variant and tiny.pipeline.paper_result == TABLE2[variant]
    assert tiny.run.run_dir == load_config(EXP.parent / "tiny.yaml").run.run_dir


def test_tiny_ablations_run_the_papers_dags_and_reuse_done_stages(tmp_path):
    over = [f"run.run_dir={tmp_path / 'run'}"]
    run_pipeline(load_config(EXP.parent / "tiny.yaml", over), loader=studies_fakes.fake_load)
    ran: dict[str, list[str]] = {}
    for variant in ("full", "no_revisor", "no_dpo", "sft_only"):
        before = len(studies_fakes.calls(str(tmp_path / "run")))
        summary = run_pipeline(load_config(EXP / f"tiny_ablation_{variant}.yaml", over), loader=studies_fakes.fake_load)
        ran[variant] = studies_fakes.calls(str(tmp_path / "run"))[before:]
        assert set(summary["stages"]) == {s.name for s in build_plan(variant)}
    assert ran["full"] == []                                   # same settings as tiny.yaml: all reused
    assert ran["no_revisor"] == ["dedup", "screen", "train_embedder", "evaluate"]   # the senior's raw synthesis is reused
    assert ran["no_dpo"] == ["synthesis", "revision", "dedup", "screen", "train_embedder", "evaluate"]   # the junior writes
    assert ran["sft_only"] == ["dedup", "screen", "train_embedder", "evaluate"]     # the junior's synthesis from no_dpo
    # The without-DPO run never judges or trains a senior generator; the without-revisor run never revises.
    plans = {v: {s.name for s in build_plan(v)} for v in TABLE2}
    assert not {"judge", "senior_dpo"} & plans["no_dpo"]
    assert not {"revise_signals", "revisor_sft", "revision"} & plans["no_revisor"]


def test_grids_are_one_setting_sweeps_with_the_papers_ranges():
    expect = {"grid_temperature": ("synthesis.temperature", 0.2, 1.5),
              "grid_seed_samples": ("seed_data.n_samples", 5000, 100000),
              "grid_dpo_beta": ("senior_dpo.beta", 0.05, 0.3),
              "grid_dpo_pairs": ("judge.n_lists", 5000, 15000),
              "grid_revise_signals": ("revise_signals.n_samples", 5000, 50000),
              "grid_tasks_per_topic": ("brainstorm.tasks_per_topic", 1, 5)}
    for name, (key, lo, hi) in expect.items():
        sw = read_yaml(EXP / f"{name}.yaml")["sweep"]
        assert sw["sizes"] == [230000] and list(sw["axes"]) == [key], name
        assert min(sw["axes"][key]) == lo and max(sw["axes"][key]) == hi, name
    assert read_yaml(EXP / "grid_topic_truncate.yaml")["sweep"]["axes"]["topics.truncate"] == [True, False]
    models = read_yaml(EXP / "grid_base_model.yaml")["sweep"]["axes"]["junior_sft.base_model"]
    assert len(models) == 4 and any("Llama-3-8B" in m for m in models) and any("gemma" in m for m in models)


def test_baselines_and_generator_comparison():
    d = read_yaml(EXP / "direct_instruct.yaml")
    assert d["pipeline"]["variant"] == "direct_instruct"
    assert d["synthesis"]["engine"]["model"] == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert read_yaml(EXP / "direct_teacher.yaml")["pipeline"]["variant"] == "direct_teacher"
    small, large = (read_yaml(EXP / f"generator_{s}.yaml") for s in ("8b", "70b"))
    assert small["pipeline"]["variant"] == large["pipeline"]["variant"] == "direct_instruct"
    assert "8B" in small["synthesis"]["engine"]["model"] and "70B" in large["synthesis"]["engine"]["model"]
    assert large["synthesis"]["engine"]["tensor_parallel_size"] == 4
    a, b = (load_config(EXP / f"tiny_generator_{s}.yaml") for s in ("small", "large"))
    assert a.synthesis.engine.model != b.synthesis.engine.model and a.run.run_dir == b.run.run_dir


def test_tiny_studies_load():
    sw = load_config(EXP / "tiny_sweep.yaml")
    assert len(sw.sweep.sizes) == 3 and sw.sweep.sizes[-1] <= sw.synthesis.n_samples
    inf = load_config(EXP / "tiny_influence.yaml")
    assert len(inf.influence.categories) == 2
