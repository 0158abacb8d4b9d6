"""Fitting and statistics on known inputs: a synthetic log-linear curve recovers its a and b; the power law recovers
its asymptote; influence recovers planted effects and flags only them as significant; plots are written."""

from __future__ import annotations

import numpy as np
import pytest

from speed_ray.studies.cost import cost_per_point, cost_table
from speed_ray.studies.influence import all_subsets, by_task_category, compute_influence
from speed_ray.studies.scaling import fit_loglinear, fit_power, fit_with_bootstrap


def test_loglinear_recovers_a_and_b():
    n = np.array([1e3, 3e3, 1e4, 3e4, 1e5, 3e5])
    y = 40.0 + 2.5 * np.log(n)
    p = fit_loglinear(n, y)
    assert p["a"] == pytest.approx(40.0, abs=1e-8) and p["b"] == pytest.approx(2.5, abs=1e-8)


def test_bootstrap_over_tasks_covers_truth_and_predicts_extrapolation():
    rng = np.random.default_rng(0)
    n = np.array([1e3, 1e4, 1e5, 1e6])
    a, b = 30.0, 3.0
    task_offsets = rng.normal(0, 4, size=20)                        # tasks differ in level...
    scores = a + b * np.log(n)[:, None] + task_offsets[None, :] + rng.normal(0, 0.2, size=(4, 20))
    fit, band = fit_with_bootstrap(n, scores, "loglinear", n_boot=300)
    true_a = a + task_offsets.mean()
    assert fit.ci["b"][0] <= b <= fit.ci["b"][1]
    assert fit.params["a"] == pytest.approx(true_a, abs=0.5)
    p10 = fit.predictions["10x"]
    assert p10["n"] == pytest.approx(1e7)
    assert p10["lo"] <= true_a + b * np.log(1e7) <= p10["hi"]
    assert p10["lo"] <= p10["mean"] <= p10["hi"]
    assert fit.predictions["2x"]["n"] == pytest.approx(2e6)
    assert len(band["n"]) == len(band["lo"]) == len(band["hi"]) and all(
        lo <= hi + 1e-9 for lo, hi in zip(band["lo"], band["hi"]))
    assert fit.r2 > 0.99


def test_power_law_recovers_saturation():
    n = np.geomspace(1e3, 1e7, 9)
    y = 70.0 - 300.0 * n ** -0.5
    p = fit_power(n, y)
    assert p["c"] == pytest.approx(70.0, abs=0.05) and p["alpha"] == pytest.approx(0.5, abs=0.02)


def test_power_law_on_unsaturated_points_says_so():
    """Points that keep rising (log-linear or faster, like the tiny sweep's) push alpha to its floor: the fit
    then carries a note that c and k mean nothing; a genuine saturating curve carries none."""
    from speed_ray.studies.scaling import fit_note

    n = np.array([4.0, 8.0, 16.0])
    p = fit_power(n, np.array([68.92, 68.98, 69.33]))
    assert isinstance(p["k"], float) and "not identifiable" in fit_note("power", p)
    sat = np.geomspace(1e3, 1e7, 9)
    assert fit_note("power", fit_power(sat, 70.0 - 300.0 * sat ** -0.5)) is None
    assert fit_note("loglinear", fit_loglinear(n, [1.0, 2.0, 3.0])) is None


def test_fits_reject_too_few_points():
    with pytest.raises(ValueError, match="at least 2"):
        fit_loglinear([100, 100], [1, 2])
    with pytest.raises(ValueError, match="at least 3"):
        fit_power([100, 1000], [1, 2])


def test_influence_recovers_planted_effects():
    cats = ["short-short", "short-long", "long-short", "long-long"]
    subsets = all_subsets(cats)
    assert len(subsets) == 16 and () in subsets and tuple(cats) in subsets
    tasks = ["STSB", "SciFact", "Banking77"]
    rng = np.random.default_rng(1)
    effect = {("short-long", "SciFact"): 3.0, ("short-long", "STSB"): -2.0, ("long-short", "Banking77"): 4.0}
    scores = np.zeros((16, 3))
    for m, s in enumerate(subsets):
        for j, t in enumerate(tasks):
            scores[m, j] = 50 + sum(v for (c, tt), v in effect.items() if tt == t and c in s) + rng.normal(0, 0.1)
    res = compute_influence(subsets, scores, cats, tasks, n_boot=400)
    i, j = cats.index("short-long"), tasks.index("SciFact")
    assert res.influence[i, j] == pytest.approx(3.0, abs=0.2)
    assert res.influence[i, tasks.index("STSB")] == pytest.approx(-2.0, abs=0.2)
    planted = {(cats.index(c), tasks.index(t)) for c, t in effect}
    for ci in range(4):
        for tj in range(3):
            assert bool(res.significant[ci, tj]) == ((ci, tj) in planted), (cats[ci], tasks[tj])
    grouped = by_task_category(res, {"STSB": "STS", "SciFact": "Retrieval", "Banking77": "Classification"},
                               n_boot=200)
    assert grouped.tasks == ["Classification", "Retrieval", "STS"]
    assert grouped.normalized[cats.index("long-short"), 0] > 0


def test_influence_validates_shapes():
    with pytest.raises(ValueError, match="scores must be"):
        compute_influence([("a",), ()], np.zeros((3, 1)), ["a"], ["t"])
    with pytest.raises(ValueError, match="unknown categories"):
        compute_influence([("z",), ()], np.zeros((2, 1)), ["a"], ["t"])


def test_plots_are_written(tmp_path):
    from speed_ray.studies.plots import influence_heatmap, scaling_plot

    n = np.array([1e3, 1e4, 1e5, 1e6])
    scores = 40 + 2 * np.log(n)[:, None] + np.random.default_rng(0).normal(0, 0.3, (4, 5))
    fits, bands = {}, {}
    for kind in ("loglinear", "power"):
        fits[kind], bands[kind] = fit_with_bootstrap(n, scores, kind, n_boot=20)
    p = scaling_plot(str(tmp_path / "s.png"), n, scores.mean(1), fits, bands)
    assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    cats, tasks = ["a", "b"], ["t1", "t2"]
    subsets = all_subsets(cats)
    res = compute_influence(subsets, np.random.default_rng(0).normal(size=(4, 2)), cats, tasks, n_boot=50)
    p = influence_heatmap(str(tmp_path / "h.png"), res)
    assert open(p, "rb").read(4) == b"\x89PNG"


def test_cost_table_and_cost_per_point():
    t = cost_table({"seed_data": {"rows": 10, "duration_s": 36, "cost": {"calls": 10, "prompt_tokens": 100,
                                                                          "completion_tokens": 50}},
                    "synthesis": {"rows": 100, "cost": {"gpu_hours": 2.0}}})
    assert t["total"]["calls"] == 10 and t["total"]["total_tokens"] == 150 and t["total"]["gpu_hours"] == 2.0
    systems = {r["system"]: r for r in t["comparison"]}
    assert systems["SPEED"]["calls"] == 45_000 and systems["E5-mistral"]["tokens"] == 180_000_000
    pts = cost_per_point([{"n": 1000, "score": 50.0}, {"n": 10000, "score": 52.0}], fixed_cost=1.0, unit_cost=0.001)
    assert pts[1]["marginal_cost_per_point"] == pytest.approx((11 - 2) / 2)
