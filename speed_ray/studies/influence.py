"""Influence of each synthetic category on each evaluation task (seed 002, Sec. 3): train on every subset of the
categories, then influence(c, t) = mean score of models trained with c - mean score of models trained without c,
normalized by the spread of task t's scores across all models, with bootstrap significance."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np


def all_subsets(categories: list[str] | tuple[str, ...]) -> list[tuple[str, ...]]:
    """Every subset, the empty one included (2^k training combinations; 16 for seed 002's four categories)."""
    cats = list(categories)
    return [tuple(c for c, keep in zip(cats, mask) if keep) for mask in itertools.product((0, 1), repeat=len(cats))]


@dataclass
class InfluenceResult:
    categories: list[str]
    tasks: list[str]
    influence: np.ndarray          # (C, T) raw mean difference (score points)
    normalized: np.ndarray         # (C, T) influence / std of task t's scores across models
    lo: np.ndarray                 # (C, T) bootstrap 95% interval of `normalized`
    hi: np.ndarray
    significant: np.ndarray        # (C, T) bool: the interval excludes 0

    def table(self) -> list[dict]:
        rows = []
        for i, c in enumerate(self.categories):
            for j, t in enumerate(self.tasks):
                rows.append({"category": c, "task": t, "influence": float(self.influence[i, j]),
                             "normalized": float(self.normalized[i, j]), "lo": float(self.lo[i, j]),
                             "hi": float(self.hi[i, j]), "significant": bool(self.significant[i, j])})
        return rows


def _influence(membership: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """membership (M, C) bool, scores (M, T) -> (C, T) mean(with) - mean(without)."""
    out = np.zeros((membership.shape[1], scores.shape[1]))
    for i in range(membership.shape[1]):
        w, wo = membership[:, i], ~membership[:, i]
        if w.any() and wo.any():
            out[i] = scores[w].mean(axis=0) - scores[wo].mean(axis=0)
        else:
            out[i] = np.nan
    return out


def compute_influence(model_subsets: list[tuple[str, ...]], scores: np.ndarray, categories: list[str],
                      tasks: list[str], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> InfluenceResult:
    """model_subsets[m]: the categories model m was trained on; scores (M, T): its score on each task."""
    scores = np.asarray(scores, float)
    if scores.shape != (len(model_subsets), len(tasks)):
        raise ValueError(f"scores must be (models={len(model_subsets)}, tasks={len(tasks)}), got {scores.shape}")
    unknown = {c for s in model_subsets for c in s} - set(categories)
    if unknown:
        raise ValueError(f"model subsets name unknown categories {sorted(unknown)}")
    membership = np.array([[c in s for c in categories] for s in model_subsets], dtype=bool)
    infl = _influence(membership, scores)
    spread = scores.std(axis=0, ddof=1) if len(model_subsets) > 1 else np.ones(len(tasks))
    spread = np.where(spread > 0, spread, 1.0)
    norm = infl / spread
    rng = np.random.default_rng(seed)
    boots = []
    M = len(model_subsets)
    for _ in range(n_boot):
        idx = rng.integers(0, M, M)  # resample trained models with replacement
        b = _influence(membership[idx], scores[idx])
        s = scores[idx].std(axis=0, ddof=1)
        boots.append(b / np.where(s > 0, s, 1.0))
    boots = np.array(boots)
    lo = np.nanpercentile(boots, 100 * alpha / 2, axis=0)
    hi = np.nanpercentile(boots, 100 * (1 - alpha / 2), axis=0)
    sig = (lo > 0) | (hi < 0)
    return InfluenceResult(list(categories), list(tasks), infl, norm, lo, hi, sig)


def by_task_category(result: InfluenceResult, task_category: dict[str, str], n_boot: int = 1000,
                     alpha: float = 0.05, seed: int = 0) -> InfluenceResult:
    """Average normalized influence over the tasks of each task category; bootstrap over tasks for significance."""
    groups = sorted({task_category.get(t, "Other") for t in result.tasks})
    rng = np.random.default_rng(seed)
    C = len(result.categories)
    mean = np.zeros((C, len(groups)))
    lo, hi = np.zeros_like(mean), np.zeros_like(mean)
    for j, g in enumerate(groups):
        cols = [k for k, t in enumerate(result.tasks) if task_category.get(t, "Other") == g]
        vals = result.normalized[:, cols]
        mean[:, j] = vals.mean(axis=1)
        boots = np.array([vals[:, rng.integers(0, len(cols), len(cols))].mean(axis=1) for _ in range(n_boot)])
        lo[:, j] = np.percentile(boots, 100 * alpha / 2, axis=0)
        hi[:, j] = np.percentile(boots, 100 * (1 - alpha / 2), axis=0)
    raw = np.array([[result.influence[i, [k for k, t in enumerate(result.tasks)
                                          if task_category.get(t, "Other") == g]].mean() for g in groups]
                    for i in range(C)])
    return InfluenceResult(result.categories, groups, raw, mean, lo, hi, (lo > 0) | (hi < 0))
