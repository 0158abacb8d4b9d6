"""Costs in dollars (speed_ray/pricing.py): teacher tokens at the model's price, GPU hours at the accelerator's,
overridable in the config's `pricing` section; shown per stage and per run in the cost table, the report and
`speed-ray status`, with E5-mistral's and SPEED's budgets at the same prices."""

from __future__ import annotations

import argparse

import pytest

from speed_ray.config import ConfigError
from speed_ray.pricing import PricingConfig, gpu_price, teacher_price, usd
from speed_ray.run_config import build_config
from speed_ray.studies.cost import cost_table, markdown


def test_teacher_prices_match_the_longest_prefix_and_take_overrides():
    assert teacher_price("gpt-4o-2024-08-06") == (2.50, 10.00)
    assert teacher_price("gpt-4o-2024-05-13") == (5.00, 15.00)      # SPEED's snapshot has its own price
    assert teacher_price("gpt-4o-mini-2024-07-18") == (0.15, 0.60)
    assert teacher_price("offline:smollm2") == (0.0, 0.0)
    assert teacher_price("my-llama-70b") is None
    mine = PricingConfig(teacher_usd_per_mtok={"my-llama": (0.2, 0.4), "gpt-4o": (1.0, 2.0)})
    assert teacher_price("my-llama-70b", mine) == (0.2, 0.4) and teacher_price("gpt-4o-2024-08-06", mine) == (1.0, 2.0)
    assert gpu_price() == 3.00 and gpu_price(PricingConfig(accelerator="L4")) == 0.80
    assert gpu_price(PricingConfig(accelerator="TPU-v5", gpu_usd_per_hour={"TPU-v5": 4.2})) == 4.2


def test_usd_prices_each_part_and_names_what_it_cannot_price():
    cost = {"prompt_tokens": 2_000_000, "completion_tokens": 500_000, "gpu_hours": 2.0, "cpu_hours": 10.0}
    d = usd(cost, "gpt-4o-mini", PricingConfig(cpu_usd_per_hour=0.05))
    assert d["teacher_usd"] == pytest.approx(2 * 0.15 + 0.5 * 0.60)
    assert d["gpu_usd"] == pytest.approx(6.0) and d["cpu_usd"] == pytest.approx(0.5)
    assert d["total_usd"] == pytest.approx(0.6 + 6.0 + 0.5) and d["unpriced"] == []
    d = usd(cost, "my-llama", PricingConfig(accelerator="TPU-v5"))
    assert d["teacher_usd"] is None and d["gpu_usd"] is None and d["total_usd"] == 0.0
    assert d["unpriced"] == ["teacher model 'my-llama'", "accelerator 'TPU-v5'"]


def test_pricing_section_is_typed_config():
    cfg = build_config({"pricing": {"teacher_usd_per_mtok": {"my-llama": [0.2, 0.4]}, "accelerator": "A100-80G"}})
    assert cfg.pricing.teacher_usd_per_mtok == {"my-llama": (0.2, 0.4)} and gpu_price(cfg.pricing) == 2.00
    with pytest.raises(ConfigError, match="teacher_usd_per_mtok.my-llama"):
        build_config({"pricing": {"teacher_usd_per_mtok": {"my-llama": [-1, 0.4]}}})
    with pytest.raises(ConfigError, match="cpu_usd_per_hour"):
        build_config({"pricing": {"cpu_usd_per_hour": -0.1}})


def test_cost_table_in_dollars_with_the_paper_budgets_at_the_same_prices():
    manifests = {"seed_data": {"rows": 10, "cost": {"calls": 10, "prompt_tokens": 600_000,
                                                    "completion_tokens": 400_000, "total_tokens": 1_000_000}},
                 "train_embedder": {"rows": 0, "cost": {"gpu_hours": 4.0}}}
    t = cost_table(manifests, "gpt-4o-mini")
    seed = t["stages"][0]
    assert seed["total_usd"] == pytest.approx(0.6 * 0.15 + 0.4 * 0.60)
    assert t["stages"][1]["total_usd"] == pytest.approx(12.0)
    assert t["total"]["total_usd"] == pytest.approx(0.33 + 12.0)
    refs = {r["system"]: r for r in t["comparison"]}
    # published totals priced at this run's own dollars per token: 0.33 $ per 1M
    assert refs["SPEED"]["teacher_usd"] == pytest.approx(32 * 0.33)
    assert refs["E5-mistral"]["teacher_usd"] == pytest.approx(180 * 0.33)
    md = markdown(t)
    assert "$12.33" in md and "$10.56" in md and "gpt-4o-mini" in md
    # before any teacher call: the model's mean price; an unknown model: n/a, named
    assert cost_table({}, "gpt-4o-mini")["comparison"][1]["teacher_usd"] == pytest.approx(32 * 0.375)
    unknown = cost_table(manifests, "my-llama")
    assert unknown["comparison"][0]["teacher_usd"] is None and "n/a" in markdown(unknown)
    assert "teacher model 'my-llama'" in markdown(unknown)


def test_status_shows_dollars_per_stage_and_for_the_run(tmp_path, monkeypatch, capsys):
    from speed_ray import pipeline
    from speed_ray.driver import status_main

    def stage(ctx):
        if pipeline._ALL[ctx.name].uses_teacher:
            ctx.ledger.calls, ctx.ledger.prompt_tokens, ctx.ledger.completion_tokens = 10, 1_000_000, 1_000_000
        ctx.out.write_shard("part-0", [{"id": f"{ctx.name}-0"}])

    loader = lambda fn: stage
    cfg = build_config({"run": {"name": "t", "run_dir": str(tmp_path / "run")}, "teacher": {"model": "gpt-4o-mini"},
                        "pipeline": {"stages": ["topics", "brainstorm"]}})
    pipeline.run_pipeline(cfg, stages=["topics", "brainstorm"], loader=loader)
    capsys.readouterr()
    args = argparse.Namespace(run_dir=str(tmp_path / "run"), run=None, config=None, overrides=[], json=False)
    assert status_main(args) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("brainstorm"))
    assert line.rstrip().endswith("$0.75")            # 1M in at 0.15 + 1M out at 0.60
    assert "total" in out and "$0.75" in out.split("total", 1)[1] and "gpt-4o-mini" in out
