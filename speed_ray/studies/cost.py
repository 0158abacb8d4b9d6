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


def cost_table(manifests: dict[str, dict], teacher_model: str | None = None, pricing=None) -> dict[str, Any]:
    """Per stage: teacher calls/tokens, CPU/GPU hours and dollars (speed_ray.pricing: the teacher's price per
    token, the accelerator's per GPU hour); plus totals and the paper comparison (E5-mistral's and SPEED's teacher
    budgets, priced at this run's teacher prices)."""
    from speed_ray.pricing import PricingConfig, gpu_price, teacher_price, usd

    pricing = pricing or PricingConfig()
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
        row.update(usd(c, teacher_model, pricing))
        rows.append(row)
        for k in tot:
            tot[k] += row[k]
    tot.update(usd(tot, teacher_model, pricing))
    # The references publish total tokens only, not the input/output split: they are priced at this run's own
    # blend (its dollars per token), or at the mean of the model's input and output prices before any call.
    price = teacher_price(teacher_model or "", pricing)
    blended = None
    if tot["total_tokens"] and tot["teacher_usd"] is not None:
        blended = tot["teacher_usd"] / tot["total_tokens"]
    elif price is not None:
        blended = (price[0] + price[1]) / 2 / 1e6
    comparison = [{"system": name, "calls": ref["calls"], "tokens": ref["tokens"],
                   "teacher_usd": ref["tokens"] * blended if blended is not None else None}
                  for name, ref in REFERENCE.items()]
    comparison.append({"system": "this run", "calls": tot["calls"], "tokens": tot["total_tokens"],
                       "teacher_usd": tot["teacher_usd"]})
    prices = {"teacher_model": teacher_model, "teacher_usd_per_mtok": price, "accelerator": pricing.accelerator,
              "gpu_usd_per_hour": gpu_price(pricing), "cpu_usd_per_hour": pricing.cpu_usd_per_hour,
              "reference_usd_per_mtok": blended * 1e6 if blended is not None else None}
    return {"stages": rows, "total": tot, "comparison": comparison, "prices": prices}


def _usd(v) -> str:
    return "n/a" if v is None else f"${v:,.2f}"


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
    lines = ["| stage | rows | teacher calls | tokens | cached | CPU h | GPU h | wall h | cost |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table["stages"]:
        lines.append(f"| {r['stage']} | {r['rows']} | {r['calls']} | {r['total_tokens']} | {r['cached_calls']} | "
                     f"{r['cpu_hours']:.3f} | {r['gpu_hours']:.3f} | {r['wall_hours']:.3f} | {_usd(r.get('total_usd'))} |")
    t = table["total"]
    lines.append(f"| **total** | | {t['calls']} | {t['total_tokens']} | | {t['cpu_hours']:.3f} | {t['gpu_hours']:.3f} | "
                 f"{t['wall_hours']:.3f} | {_usd(t.get('total_usd'))} |")
    p = table.get("prices") or {}
    ref = p.get("reference_usd_per_mtok")
    lines += ["", f"Prices: teacher `{p.get('teacher_model')}` at {p.get('teacher_usd_per_mtok') or 'no known price'} "
              f"USD per 1M (input, output) tokens; GPU hours at ${p.get('gpu_usd_per_hour') or 0:,.2f} "
              f"({p.get('accelerator')}); CPU hours at ${p.get('cpu_usd_per_hour') or 0:,.2f} (config `pricing`)."
              + (f" The published budgets are priced at ${ref:,.2f} per 1M tokens (they give no input/output split)."
                 if ref is not None else "")
              + (f" Unpriced: {', '.join(t['unpriced'])}." if t.get("unpriced") else ""),
              "", "| system | teacher calls | teacher tokens | teacher cost |", "|---|---|---|---|"]
    for r in table["comparison"]:
        lines.append(f"| {r['system']} | {r['calls']:,} | {r['tokens']:,} | {_usd(r.get('teacher_usd'))} |")
    return "\n".join(lines)
