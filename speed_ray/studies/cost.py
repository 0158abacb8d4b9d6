"""The cost ledger across a run's stages, compared with SPEED's Table 5, and cost per score point."""

from __future__ import annotations

from typing import Any

# SPEED Table 5 and Section 4.5 (GPT API calls and tokens).
REFERENCE = {
    "E5-mistral": {"calls": 500_000, "tokens": 180_000_000},
    "SPEED": {"calls": 45_000, "tokens": 32_000_000,
              "by_stage": {"seed_data": (25_000, 10_000_000), "judge": (10_000, 12_000_000),
                           "revise_signals": (10_000, 10_000_000)}},
}


def cost_table(manifests: dict[str, dict]) -> dict[str, Any]:
    """Per stage: teacher calls/tokens and CPU/GPU hours; plus totals and the paper comparison."""
    rows = []
    tot = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cpu_hours": 0.0,
           "gpu_hours": 0.0, "wall_hours": 0.0}
    for stage, m in manifests.items():
        c = m.get("cost", {})
        row = {"stage": stage, "calls": int(c.get("calls", 0)), "prompt_tokens": int(c.get("prompt_tokens", 0)),
               "completion_tokens": int(c.get("completion_tokens", 0)),
               "total_tokens": int(c.get("total_tokens", c.get("prompt_tokens", 0) + c.get("completion_tokens", 0))),
               "cached_calls": int(c.get("cached_calls", 0)), "cpu_hours": float(c.get("cpu_hours", 0.0)),
               "gpu_hours": float(c.get("gpu_hours", 0.0)), "wall_hours": float(m.get("duration_s", 0.0)) / 3600,
               "rows": int(m.get("rows", 0))}
        rows.append(row)
        for k in tot:
            tot[k] += row[k]
    comparison = [{"system": name, "calls": ref["calls"], "tokens": ref["tokens"]} for name, ref in REFERENCE.items()]
    comparison.append({"system": "this run", "calls": tot["calls"], "tokens": tot["total_tokens"]})
    return {"stages": rows, "total": tot, "comparison": comparison}


def cost_per_point(points: list[dict], fixed_cost: float, unit_cost: float) -> list[dict]:
    """Along a scaling curve: cost(N) = fixed (alignment) + unit x N (synthesis), and the marginal cost per score
    point between consecutive sizes. points: [{"n", "score"}] sorted by n. Costs in any unit (e.g. GPU hours)."""
    out = []
    prev = None
    for p in sorted(points, key=lambda p: p["n"]):
        cost = fixed_cost + unit_cost * p["n"]
        row = {"n": p["n"], "score": p["score"], "cost": cost, "marginal_cost_per_point": None}
        if prev is not None and p["score"] != prev["score"]:
            row["marginal_cost_per_point"] = (cost - prev["cost"]) / (p["score"] - prev["score"])
        out.append(row)
        prev = row
    return out


def markdown(table: dict[str, Any]) -> str:
    lines = ["| stage | rows | teacher calls | tokens | cached | CPU h | GPU h | wall h |", "|---|---|---|---|---|---|---|---|"]
    for r in table["stages"]:
        lines.append(f"| {r['stage']} | {r['rows']} | {r['calls']} | {r['total_tokens']} | {r['cached_calls']} | "
                     f"{r['cpu_hours']:.3f} | {r['gpu_hours']:.3f} | {r['wall_hours']:.3f} |")
    t = table["total"]
    lines.append(f"| **total** | | {t['calls']} | {t['total_tokens']} | | {t['cpu_hours']:.3f} | {t['gpu_hours']:.3f} | "
                 f"{t['wall_hours']:.3f} |")
    lines += ["", "| system | teacher calls | teacher tokens |", "|---|---|---|"]
    for r in table["comparison"]:
        lines.append(f"| {r['system']} | {r['calls']:,} | {r['tokens']:,} |")
    return "\n".join(lines)
