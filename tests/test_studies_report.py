"""The run report over a fake-stage run directory: stage table with costs and rates, evaluation, our result next to
the paper's, the cost comparison with Table 5, the sweep section, and the cross-run (ablation/generator) table."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

import studies_fakes
from speed_ray import pipeline
from speed_ray.run_config import build_config
from speed_ray.studies.report import report_main, runs_table, write_report


def _cfg(tmp_path, name, variant, paper):
    return build_config({"run": {"name": name, "run_dir": str(tmp_path / "run")}, "synthesis": {"n_samples": 50},
                         "pipeline": {"variant": variant, "paper_result": paper}})


def test_report_has_stages_costs_scores_and_the_paper(tmp_path):
    cfg = _cfg(tmp_path, "full", "full", 63.2)
    pipeline.run_pipeline(cfg, loader=studies_fakes.fake_load)
    url = write_report(cfg.run.run_dir, "full")
    md = open(url).read()
    assert "| synthesis | done | 50 |" in md and "parse_rate=0.950" in md
    assert "| seed_data | done |" in md and "| 10 | 1,500 |" in md              # teacher calls and tokens
    assert "SPEED paper | 63.2" in md and "Δ" in md
    assert "E5-mistral | 500,000 | 180,000,000" in md and "this run" in md
    assert "SciFact" in md
    assert os.path.getsize(os.path.join(os.path.dirname(url), "stages.png")) > 0


def test_cross_run_table_shows_ablations_and_generators(tmp_path, capsys):
    for name, variant, paper in (("full", "full", 63.2), ("no-dpo", "no_dpo", 62.8), ("sft", "sft_only", 62.6)):
        pipeline.run_pipeline(_cfg(tmp_path, name, variant, paper), loader=studies_fakes.fake_load)
    rows = {r["run"]: r for r in runs_table(__import__("speed_ray.store", fromlist=["RunStore"]).RunStore(
        str(tmp_path / "run")))}
    assert set(rows) == {"full", "no-dpo", "sft"}
    assert rows["no-dpo"]["variant"] == "no_dpo" and rows["no-dpo"]["paper"] == 62.8
    assert rows["full"]["calls"] > rows["sft"]["calls"]                  # judge + revise_signals cost teacher calls
    assert "(junior)" in rows["sft"]["generator"] and "(senior)" in rows["full"]["generator"]
    study = tmp_path / "run" / "runs" / "my-sweep" / "sweep"        # a study's dir holds its own markdown
    study.mkdir(parents=True)
    (study / "sweep.md").write_text("# Sweep\n")
    assert report_main(SimpleNamespace(run_dir=str(tmp_path / "run"), run=None)) == 0
    assert f"my-sweep: {study / 'sweep.md'}" in capsys.readouterr().out
    md = open(tmp_path / "run" / "report.md").read()
    assert "| no-dpo | no_dpo |" in md and "62.8" in md
    assert "| n/c |" in md and "not comparable" in md     # these fake runs do not evaluate MTEB(eng, v1)
    full = build_config({"evaluate": {"benchmark": "MTEB(eng, v1)"}})
    from speed_ray.config import to_dict
    from speed_ray.studies.report import paper_comparable
    assert paper_comparable(to_dict(full)) and not paper_comparable(to_dict(_cfg(tmp_path, "x", "full", 63.2)))
    for name in rows:
        assert (tmp_path / "run" / "runs" / name / "report" / "report.md").exists()


def test_report_names_a_missing_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run 'nope'"):
        write_report(str(tmp_path), "nope")


def test_report_and_status_show_the_screens_decisions_and_score_distributions(tmp_path, capsys):
    """The screen stage's manifest (removals by reason, rows kept with their negative changed, the guide's quantiles
    per task type) becomes a section of report.md with quality.png, three figures of report.html, and lines of
    `speed-ray status`."""
    from types import SimpleNamespace

    from speed_ray.driver import status_main

    def q(p50):
        return {"n": 10, "mean": p50, "p05": p50 - 0.2, "p25": p50 - 0.1, "p50": p50, "p75": p50 + 0.1,
                "p95": p50 + 0.2}

    def stage(ctx):
        extra = studies_fakes.fake_stage(ctx)
        if ctx.name == "screen":
            extra["screen"] = {"rows_in": 50, "rows_out": 44, "removed": {"false_negative": 4, "contaminated": 2},
                               "guide": "offline:minilm", "margin": 0.05, "action": "drop",
                               "actions": {"removed_negative": 3, "mined": 5},
                               "decontamination": {"hits_by_task": {"STSBenchmark": 2}}}
            extra["quality"] = {"by_task_type": {
                t: {"rows": 22, "guide_pos_score": q(0.8), "guide_neg_score": q(0.3), "guide_margin": q(0.5)}
                for t in ("retrieval", "sts")}}
        return extra

    cfg = _cfg(tmp_path, "full", "full", 63.2)
    pipeline.run_pipeline(cfg, loader=lambda fn: stage)
    url = write_report(cfg.run.run_dir, "full")
    md = open(url).read()
    assert "## Data quality" in md and "| false_negative | 4 |" in md and "STSBenchmark 2" in md
    assert "| kept, negative changed | rows |" in md and "| removed_negative | 3 |" in md and "| mined | 5 |" in md
    assert os.path.getsize(os.path.join(os.path.dirname(url), "quality.png")) > 0
    page = open(os.path.join(os.path.dirname(url), "report.html")).read()
    assert 'id="fig-screen"' in page and 'id="fig-quality"' in page and 'id="fig-screen-actions"' in page
    capsys.readouterr()
    assert status_main(SimpleNamespace(run_dir=cfg.run.run_dir, run=None, config=None, overrides=[], json=False,
                                       watch=False)) == 0
    out = capsys.readouterr().out
    assert ("quality: the screen kept 44 of 50 rows; removed false_negative 4, contaminated 2; changed in place "
            "mined 5, removed_negative 3 (guide offline:minilm)") in out
    assert "retrieval" in out and "q-pos 0.80  q-neg 0.30  margin 0.50" in out


def test_a_screen_that_removed_nothing_has_no_empty_removal_table(tmp_path):
    """The demo's screen removes no row (it keeps one as a pair): report.md says so instead of printing a table
    header with no rows under it."""
    def stage(ctx):
        extra = studies_fakes.fake_stage(ctx)
        if ctx.name == "screen":
            extra["screen"] = {"rows_in": 12, "rows_out": 12, "removed": {"false_negative": 0}, "guide": "offline:minilm",
                               "margin": 0.05, "action": "remove_negative", "actions": {"removed_negative": 1}}
        return extra

    cfg = _cfg(tmp_path, "full", "full", 63.2)
    pipeline.run_pipeline(cfg, loader=lambda fn: stage)
    md = open(write_report(cfg.run.run_dir, "full")).read()
    section = md.split("## Data quality", 1)[1]
    assert "| removed because |" not in section and "It removed no row." in section
    assert "| removed_negative | 1 |" in section


def test_the_run_summary_says_where_everything_is_and_writes_the_report(tmp_path, capsys):
    """print_summary (the end of `speed-ray run`): each finished output by what the plan calls it, then the
    report's path (a NameError there was only logged as a warning)."""
    from speed_ray.driver import print_summary

    cfg = _cfg(tmp_path, "full", "full", 63.2)
    summary = pipeline.run_pipeline(cfg, loader=studies_fakes.fake_load)
    capsys.readouterr()
    print_summary(cfg, summary)
    out = capsys.readouterr().out
    for label in ("junior generator", "senior generator", "revisor", "synthetic data", "deduplicated data",
                  "training data", "embedder"):
        assert f"{label}: " in out, label
    assert "report: " in out and os.path.exists(os.path.join(str(tmp_path / "run"), "runs", "full", "report",
                                                             "report.md"))
