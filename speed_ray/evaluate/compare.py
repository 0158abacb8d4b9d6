"""Result tables: per task, per category and the paper's averages, for one or several models side by side.

Pure functions over results dicts (the `results.json` that `speed_ray.evaluate.run` writes), plus finding
those files in run directories.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# The 7 MTEB categories SPEED reports (paper Table 1), in its column order.
CATEGORIES = ("Classification", "Clustering", "PairClassification", "Reranking", "Retrieval", "STS",
              "Summarization")
RESULTS_FORMAT = "speed-ray-eval/1"


def averages(scores: dict[str, float], types: dict[str, str]) -> dict[str, Any]:
    """The average over tasks (the paper's "Avg.") and one average per category that has tasks."""
    vals = [v for v in scores.values() if _ok(v)]
    out: dict[str, Any] = {"average": _mean(vals), "n_tasks": len(vals)}
    for cat in CATEGORIES + tuple(sorted(set(types.values()) - set(CATEGORIES))):
        cv = [v for t, v in scores.items() if types.get(t) == cat and _ok(v)]
        if cv:
            out[cat] = _mean(cv)
    return out


def _ok(v: Any) -> bool:
    return isinstance(v, (int, float)) and not math.isnan(v)


def _mean(vals: list[float]) -> float | None:
    return round(sum(vals) / len(vals), 4) if vals else None


def _fmt(v: Any) -> str:
    return f"{v:.2f}" if _ok(v) else "–"


def columns_of(results: dict) -> list[tuple[str, dict]]:
    """(label, model entry) for each model in a results dict, the primary model first."""
    models = results.get("models", {})
    primary = results.get("primary")
    order = ([primary] if primary in models else []) + [m for m in models if m != primary]
    return [(m, models[m]) for m in order]


def table(columns: list[tuple[str, dict]]) -> dict[str, Any]:
    """Side-by-side data: tasks (with category), per-task scores, per-category and overall averages per column."""
    types: dict[str, str] = {}
    for _, entry in columns:
        types.update(entry.get("types", {}))
    tasks = sorted(types, key=lambda t: (_cat_order(types[t]), t))
    out: dict[str, Any] = {"columns": [label for label, _ in columns], "tasks": {}, "categories": {},
                           "average": {}}
    for t in tasks:
        out["tasks"][t] = {"category": types[t], **{label: e.get("scores", {}).get(t) for label, e in columns}}
    for label, e in columns:
        av = averages(e.get("scores", {}), e.get("types", {}))
        out["average"][label] = av["average"]
        for cat in sorted({types[t] for t in tasks}, key=_cat_order):
            out["categories"].setdefault(cat, {})[label] = av.get(cat)
    return out


def _cat_order(cat: str) -> int:
    return CATEGORIES.index(cat) if cat in CATEGORIES else len(CATEGORIES)


def to_markdown(columns: list[tuple[str, dict]], title: str = "MTEB results") -> str:
    """Markdown: per-task rows grouped by category, then category averages and the overall average.
    With two or more columns, a Δ column shows the first minus the second (e.g. trained minus base)."""
    data = table(columns)
    labels = data["columns"]
    delta = len(labels) >= 2
    head = ["task", "category", *labels] + ([f"Δ ({labels[0]} − {labels[1]})"] if delta else [])
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name: str, cat: str, vals: list[Any]) -> str:
        cells = [name, cat, *[_fmt(v) for v in vals]]
        if delta:
            a, b = vals[0], vals[1]
            cells.append(f"{a - b:+.2f}" if _ok(a) and _ok(b) else "–")
        return "| " + " | ".join(cells) + " |"

    for t, r in data["tasks"].items():
        lines.append(row(t, r["category"], [r[label] for label in labels]))
    lines += ["", "| average | tasks | " + " | ".join(labels) + (" | Δ |" if delta else " |"),
              "|" + "---|" * (len(labels) + 2 + (1 if delta else 0))]
    counts = {}
    for r in data["tasks"].values():
        counts[r["category"]] = counts.get(r["category"], 0) + 1
    for cat, vals in data["categories"].items():
        lines.append(row(cat, str(counts.get(cat, 0)), [vals[label] for label in labels]))
    lines.append(row("**Average**", str(len(data["tasks"])), [data["average"][label] for label in labels]))
    return "\n".join(lines) + "\n"


def main_scores(results: dict) -> dict[str, float]:
    """{task: score} of the primary model: the CLI's final JSON line."""
    cols = columns_of(results)
    return dict(cols[0][1].get("scores", {})) if cols else {}


# ---- finding results ---------------------------------------------------------------------------------

def find_results(path: str) -> list[tuple[str, Path]]:
    """(label, results.json) for a results file, a directory holding one, or a run directory (one per run)."""
    p = Path(path)
    if p.is_file():
        return [(p.parent.name if p.name == "results.json" else p.stem, p)]
    if (p / "results.json").exists():
        return [(p.name, p / "results.json")]
    found: list[tuple[str, Path]] = []
    runs = sorted((p / "runs").glob("*/plan.json")) if (p / "runs").exists() else []
    for plan in runs:
        try:
            stages = json.loads(plan.read_text()).get("stages", [])
        except (OSError, json.JSONDecodeError):
            continue
        fp = next((s["fingerprint"] for s in stages if s.get("stage") == "evaluate"), None)
        res = p / "stages" / "evaluate" / str(fp) / "artifacts" / "results.json"
        if fp and res.exists():
            found.append((plan.parent.name, res))
    if not found:   # no plans: every finished evaluation in the directory
        for res in sorted((p / "stages" / "evaluate").glob("*/artifacts/results.json")):
            found.append((f"{p.name}@{res.parent.parent.name}", res))
    if not found:
        raise FileNotFoundError(f"no results.json in {path} (expected a results file, a directory with "
                                f"results.json, or a run directory with a finished evaluate stage)")
    return found


def gather(paths: list[str]) -> list[tuple[str, dict]]:
    """Columns for `compare`: every model of every results file; labels are made unique."""
    cols: list[tuple[str, dict]] = []
    seen: set[str] = set()
    for path in paths:
        for label, res_path in find_results(path):
            results = json.loads(res_path.read_text())
            inner = columns_of(results)
            for i, (model_label, entry) in enumerate(inner):
                name = label if i == 0 else f"{label}:{model_label}"
                base, k = name, 2
                while name in seen:
                    name, k = f"{base}#{k}", k + 1
                seen.add(name)
                cols.append((name, entry))
    return cols
