"""Full-size reproduction of all-MiniLM-L6-v2's published MTEB scores from the local loaders (slow: it encodes
~35k texts on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from speed_ray.evaluate.config import EvalConfig

TASKS = Path(__file__).resolve().parents[1] / "configs" / "tasks"
PUBLISHED = {"stsb": ("STSBenchmark", 82.03), "sickr": ("SICK-R", 77.58), "scifact": ("SciFact", 64.51),
             "banking77": ("Banking77Classification", 80.04)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PUBLISHED))
def test_reproduces_published_minilm_score(name, minilm, evaldata, tmp_path):
    from speed_ray.evaluate.run import run_evaluation

    task, published = PUBLISHED[name]
    cfg = EvalConfig(local_tasks=(str(TASKS / f"{name}.yaml"),), data_root=str(evaldata), instructions=False,
                     cache_dir=str(tmp_path / "cache"))
    res = run_evaluation("offline:minilm", cfg, None)
    assert res["models"]["offline:minilm"]["scores"][task] == pytest.approx(published, abs=0.1)
