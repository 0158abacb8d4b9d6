"""PNG plots for the studies: the scaling curve with fits and bands, and the influence heatmap."""

from __future__ import annotations

from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # headless: clusters and CI have no display
    import matplotlib.pyplot as plt

    return plt


def scaling_plot(path: str, sizes, means, fits: dict[str, Any], bands: dict[str, dict], title: str = "") -> str:
    """Points (mean over tasks), each fit's curve and its bootstrap band, on a log-x axis."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ax.scatter(sizes, means, color="black", zorder=3, label="runs")
    colors = {"loglinear": "tab:blue", "power": "tab:orange"}
    for kind, fit in fits.items():
        band = bands[kind]
        label = (f"log-linear: {fit.params['a']:.2f} + {fit.params['b']:.2f} ln N" if kind == "loglinear" else
                 f"power: {fit.params['c']:.2f} - {fit.params['k']:.3g} N^-{fit.params['alpha']:.2f}")
        ax.plot(band["n"], band["mean"], color=colors.get(kind), label=label)
        ax.fill_between(band["n"], band["lo"], band["hi"], color=colors.get(kind), alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("synthetic samples (N)")
    ax.set_ylabel("average score")
    ax.set_title(title or "Score vs synthetic data size")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def influence_heatmap(path: str, result, title: str = "") -> str:
    """Normalized influence (category x task); '*' marks cells whose bootstrap interval excludes 0."""
    plt = _plt()
    z = np.nan_to_num(result.normalized)
    w = max(4.0, 0.55 * len(result.tasks) + 2)
    fig, ax = plt.subplots(figsize=(w, 0.6 * len(result.categories) + 2), dpi=120)
    lim = max(float(np.abs(z).max()), 1e-6)
    im = ax.imshow(z, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(result.tasks)), result.tasks, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(result.categories)), result.categories, fontsize=8)
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            mark = "*" if result.significant[i, j] else ""
            ax.text(j, i, f"{z[i, j]:.2f}{mark}", ha="center", va="center", fontsize=7,
                    color="white" if abs(z[i, j]) > 0.6 * lim else "black")   # readable on the dark ends
    fig.colorbar(im, ax=ax, label="normalized influence")
    ax.set_title(title or "Influence of synthetic categories (* significant)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def axis_plot(path: str, labels: list[str], scores: list[float], title: str = "") -> str:
    """A one-setting grid (SPEED Fig. 3, Tables 3-4): the average score at each value of the swept setting."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 2), 3.8), dpi=120)
    x = np.arange(len(labels))
    ax.plot(x, scores, marker="o", color="tab:blue")
    for xi, s in zip(x, scores):
        if np.isfinite(s):
            ax.annotate(f"{s:.2f}", (xi, s), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("average score")
    ax.set_title(title or "Score per setting")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def bar_plot(path: str, labels: list[str], series: dict[str, list[float]], title: str = "", ylabel: str = "") -> str:
    """Grouped bars (the report's per-stage cost and duration)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(labels) + 2), 3.8), dpi=120)
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(series))
    for i, (name, vals) in enumerate(series.items()):
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=name)
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


QUALITY_SCORES = (("guide_pos_score", "query-positive"), ("guide_neg_score", "query-negative"),
                  ("guide_margin", "margin"))


def quality_plot(path: str, by_task_type: dict[str, dict], title: str = "") -> str:
    """Per task type, the guide's score distributions (the screen manifest's quantiles): a thin line from p05 to
    p95, a thick one from p25 to p75 and a tick at the median, one panel per score."""
    plt = _plt()
    types = sorted(by_task_type)
    fig, axes = plt.subplots(1, len(QUALITY_SCORES), figsize=(11, 0.45 * len(types) + 1.6), dpi=120, sharey=True)
    for ax, (key, label) in zip(np.atleast_1d(axes), QUALITY_SCORES):
        for y, t in enumerate(types):
            q = (by_task_type[t] or {}).get(key) or {}
            if q.get("p50") is None:
                continue
            ax.plot([q["p05"], q["p95"]], [y, y], color="#888", lw=1)
            ax.plot([q["p25"], q["p75"]], [y, y], color="#1f77b4", lw=6, solid_capstyle="butt")
            ax.plot([q["p50"]], [y], marker="|", color="k", ms=12)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    ax0 = np.atleast_1d(axes)[0]
    ax0.set_yticks(range(len(types)), [f"{t} ({(by_task_type[t] or {}).get('rows', 0)})" for t in types], fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
