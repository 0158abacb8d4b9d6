"""Scaling-law fits for score vs synthetic data size: SPEED's log-linear law (Sec. 4.4, Fig. 4) and a saturating
power law (the fit the paper's Limitations ask for), with bootstrap-over-tasks confidence intervals."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Fit:
    kind: str                       # "loglinear" | "power"
    params: dict[str, float]
    r2: float
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)   # per-parameter 95% interval
    predictions: dict[str, dict[str, float]] = field(default_factory=dict)  # "2x"/"10x": {n, mean, lo, hi}

    def predict(self, n) -> np.ndarray:
        return predict(self.kind, self.params, np.asarray(n, dtype=float))


def predict(kind: str, p: dict[str, float], n: np.ndarray) -> np.ndarray:
    if kind == "loglinear":
        return p["a"] + p["b"] * np.log(n)
    if kind == "power":
        return p["c"] - p["k"] * np.power(n, -p["alpha"])
    raise ValueError(f"unknown fit kind {kind!r}")


def fit_loglinear(n, y) -> dict[str, float]:
    """Least squares for y = a + b ln N."""
    n, y = np.asarray(n, float), np.asarray(y, float)
    _check(n, y, 2)
    b, a = np.polyfit(np.log(n), y, 1)
    return {"a": float(a), "b": float(b)}


def fit_power(n, y) -> dict[str, float]:
    """Least squares for the saturating y = c - k N^-alpha (c: the asymptote), k >= 0, alpha in (0, 2].

    For a fixed alpha the model is linear in (c, k), so alpha is profiled: a log-spaced grid, then a bounded 1-d
    refinement around the best grid value. Fast and deterministic (the bootstrap calls it hundreds of times), and it
    cannot stall on the flat (k, alpha) valley that makes a 3-parameter curve_fit crawl on three points.
    """
    from scipy.optimize import minimize_scalar

    n, y = np.asarray(n, float), np.asarray(y, float)
    _check(n, y, 3)
    scale = n.min()   # N / N_min keeps N^-alpha in (0, 1] for every alpha: well conditioned

    def solve(alpha: float) -> tuple[float, float, float]:
        x = np.power(n / scale, -alpha)
        X = np.stack([np.ones_like(x), -x], axis=1)
        (c, k), *_ = np.linalg.lstsq(X, y, rcond=None)
        if k < 0:   # a falling curve is not a saturating law: the best k >= 0 is k = 0
            c, k = float(y.mean()), 0.0
        return float(np.sum((c - k * x - y) ** 2)), float(c), float(k)

    grid = np.geomspace(ALPHA_FLOOR, 2.0, 120)
    sses = [solve(a)[0] for a in grid]
    i = int(np.argmin(sses))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    alpha = float(grid[i])
    if hi > lo:
        r = minimize_scalar(lambda a: solve(a)[0], bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
        if r.success and r.fun <= sses[i]:
            alpha = float(r.x)
    sse, c, k = solve(alpha)
    if not np.isfinite(sse):
        raise ValueError("power-law fit did not converge")
    return {"c": c, "k": float(k * scale ** alpha), "alpha": alpha}


ALPHA_FLOOR = 1e-4      # the power law's smallest exponent: there, c - k N^-alpha is a + b ln N in disguise


def fit_note(kind: str, params: dict[str, float]) -> str | None:
    """Why a fit's parameters mean less than they seem, or None."""
    if kind == "power" and params.get("alpha", 1.0) <= ALPHA_FLOOR * 1.01:
        return ("no saturation in these points: alpha sits at its floor, so the power law reduces to the log-linear "
                "law and c, k are not identifiable (only its predictions are meaningful)")
    if kind == "power" and params.get("k", 1.0) == 0.0:
        return "scores do not rise with N: the saturating law is flat (k = 0)"
    return None


def _check(n: np.ndarray, y: np.ndarray, min_points: int) -> None:
    if n.shape != y.shape or n.ndim != 1:
        raise ValueError("sizes and scores must be 1-d and of equal length")
    if len(np.unique(n)) < min_points:
        raise ValueError(f"need at least {min_points} distinct sizes to fit, got {len(np.unique(n))}")
    if np.any(n <= 0):
        raise ValueError("sizes must be > 0")


def r_squared(y, yhat) -> float:
    y, yhat = np.asarray(y, float), np.asarray(yhat, float)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - yhat) ** 2)) / ss_tot if ss_tot > 0 else 1.0


FITTERS = {"loglinear": fit_loglinear, "power": fit_power}


def fit_with_bootstrap(sizes, task_scores, kind: str = "loglinear", n_boot: int = 1000, seed: int = 0,
                       extrapolate=(2, 10), grid_points: int = 50) -> tuple[Fit, dict]:
    """Fit the average-over-tasks score vs size; CIs by resampling tasks with replacement.

    sizes: (P,) data sizes; task_scores: (P, T) score of each point on each task.
    Returns the Fit (point estimates, parameter CIs, predictions at 2x and 10x the largest N) and a band
    {"n": grid, "mean", "lo", "hi"} for plotting.
    """
    sizes = np.asarray(sizes, float)
    scores = np.asarray(task_scores, float)
    if scores.ndim != 2 or scores.shape[0] != sizes.shape[0]:
        raise ValueError("task_scores must be (points, tasks)")
    fitter = FITTERS[kind]
    y = scores.mean(axis=1)
    params = fitter(sizes, y)
    fit = Fit(kind, params, r_squared(y, predict(kind, params, sizes)))
    grid = np.geomspace(sizes.min(), sizes.max() * max(extrapolate), grid_points)
    targets = np.array([sizes.max() * m for m in extrapolate])
    rng = np.random.default_rng(seed)
    boot_params, boot_grid, boot_targets = [], [], []
    T = scores.shape[1]
    for _ in range(n_boot):
        idx = rng.integers(0, T, T)
        try:
            p = fitter(sizes, scores[:, idx].mean(axis=1))
        except ValueError:
            continue
        boot_params.append(p)
        boot_grid.append(predict(kind, p, grid))
        boot_targets.append(predict(kind, p, targets))
    if boot_params:
        for key in params:
            vals = np.array([b[key] for b in boot_params])
            fit.ci[key] = (float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5)))
        bg, bt = np.array(boot_grid), np.array(boot_targets)
        lo, hi = np.percentile(bg, 2.5, axis=0), np.percentile(bg, 97.5, axis=0)
        tlo, thi = np.percentile(bt, 2.5, axis=0), np.percentile(bt, 97.5, axis=0)
    else:
        lo = hi = predict(kind, params, grid)
        tlo = thi = predict(kind, params, targets)
    tmean = predict(kind, params, targets)
    for m, n, mu, a, b in zip(extrapolate, targets, tmean, tlo, thi):
        fit.predictions[f"{m}x"] = {"n": float(n), "mean": float(mu), "lo": float(a), "hi": float(b)}
    band = {"n": grid.tolist(), "mean": predict(kind, params, grid).tolist(), "lo": np.asarray(lo).tolist(),
            "hi": np.asarray(hi).tolist()}
    return fit, band
