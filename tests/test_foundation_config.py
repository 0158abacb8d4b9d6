"""Typed configs: every file under configs/ loads; unknown keys, wrong types and impossible values name the key
and the file; overrides; the CLI turns user errors into one line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from speed_ray.config import ConfigError
from speed_ray.run_config import RunConfig, load_config, replace

REPO = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "tasks" not in p.parts)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    from speed_ray.pipeline import build_plan

    assert build_plan(cfg.pipeline.variant)


def test_paper_config_has_the_published_settings():
    cfg = load_config(REPO / "configs" / "paper.yaml")
    assert cfg.junior_sft.learning_rate == 1e-4 and cfg.junior_sft.batch_size == 16
    assert cfg.senior_dpo.learning_rate == 1e-5 and cfg.senior_dpo.beta == 0.1 and cfg.senior_dpo.batch_size == 16
    assert cfg.revisor_sft.learning_rate == 5e-6 and cfg.revisor_sft.batch_size == 24
    assert cfg.synthesis.temperature == 1.0 and cfg.synthesis.top_p == 1.0 and cfg.teacher.judge_temperature == 0.0
    assert cfg.mixture.weights == {"classification": 7, "sts": 7, "retrieval": 7, "matching": 2}
    assert cfg.synthesis.n_samples == 1_150_000
    assert cfg.embedder.batch_size == 1536 and cfg.embedder.lora_r == 16
    assert "Mistral-7B-v0.1" in cfg.embedder.base_model and "Llama-3-8B" in cfg.junior_sft.base_model
    assert cfg.teacher.model.startswith("gpt-4o")


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_key_and_file(tmp_path):
    p = _write(tmp_path, "junior_sft:\n  lr: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "junior_sft.lr" in str(e.value) and str(p) in str(e.value) and "unknown key" in str(e.value)


def test_wrong_type_and_impossible_value(tmp_path):
    with pytest.raises(ConfigError, match=r"senior_dpo\.beta.*expected a number"):
        load_config(_write(tmp_path, "senior_dpo:\n  beta: high\n"))
    with pytest.raises(ConfigError, match=r"senior_dpo\.beta.*must be > 0"):
        load_config(_write(tmp_path, "senior_dpo:\n  beta: -1\n"))
    with pytest.raises(ConfigError, match=r"pipeline\.variant"):
        load_config(_write(tmp_path, "pipeline:\n  variant: nope\n"))
    with pytest.raises(ConfigError, match=r"mixture\.weights\.chess"):
        load_config(_write(tmp_path, "mixture:\n  weights: {chess: 1}\n"))
    with pytest.raises(ConfigError, match=r"junior_sft\.strategy.*use_gpu"):
        load_config(_write(tmp_path, "junior_sft:\n  strategy: fsdp\n"))


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_and_base_inheritance(tmp_path):
    (tmp_path / "base.yaml").write_text("run: {name: b}\nsenior_dpo: {beta: 0.2}\n")
    p = _write(tmp_path, "_base: base.yaml\nrun: {seed: 3}\n")
    cfg = load_config(p, ["senior_dpo.beta=0.3", "synthesis.engine.batch_size=4", "embedder.task_types=[sts]"])
    assert cfg.run.name == "b" and cfg.run.seed == 3
    assert cfg.senior_dpo.beta == 0.3 and cfg.synthesis.engine.batch_size == 4 and cfg.embedder.task_types == ("sts",)
    with pytest.raises(ConfigError, match="command line"):
        load_config(p, ["senior_dpo.nope=1"])
    assert replace(cfg, ["run.seed=5"]).run.seed == 5


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "speed_ray.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def test_cli_user_errors_are_one_line_without_traceback(tmp_path):
    bad = _write(tmp_path, "junior_sft:\n  lr: 1\n")
    for args in (["run", str(bad)], ["run", str(tmp_path / "missing.yaml")], ["run", "configs/tiny.yaml", "x.y=1"],
                 ["run", "configs/tiny.yaml", "oops"]):
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr
        assert r.stderr.strip().startswith("speed-ray: error:"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_help_on_every_command():
    from speed_ray.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in sub.choices:
        r = _cli(name, "--help")
        assert r.returncode == 0 and "usage:" in r.stdout, name
