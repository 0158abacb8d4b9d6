"""Costs in dollars: teacher tokens at the model's price, GPU and CPU hours at the accelerator's (pure).

The defaults are list prices (USD) that users commonly pay, kept here in one table so that a report says which
prices it used; every one can be overridden in the config's `pricing` section, and a model or accelerator with no
known price is reported as unpriced rather than free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from speed_ray.config import check

# USD per million (input, output) tokens: OpenAI's list prices for the models SPEED-like pipelines use as teachers.
# Matched by the longest prefix of the model name, so dated snapshots (gpt-4o-2024-05-13) take their family's price.
TEACHER_USD_PER_MTOK: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-2024-05-13": (5.00, 15.00),     # SPEED's teacher snapshot: its own, higher price
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-4": (30.00, 60.00),
    "gpt-3.5-turbo": (0.50, 1.50),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
    "o3": (2.00, 8.00),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5": (1.25, 10.00),
    "offline:": (0.0, 0.0),                  # the project's own local server: no per-token price
}

# USD per GPU hour, on-demand cloud list prices by accelerator type (Ray's accelerator_type names).
GPU_USD_PER_HOUR: dict[str, float] = {
    "H200": 3.80, "H100": 3.00, "A100-80G": 2.00, "A100-40G": 1.50, "L40S": 1.20, "A10G": 1.00, "L4": 0.80,
    "T4": 0.40, "V100": 1.20,
}


@dataclass(frozen=True)
class PricingConfig:
    """Prices for the cost table, the report and `speed-ray status` (not in any fingerprint: prices change what a
    run is said to cost, never what it computes)."""

    teacher_usd_per_mtok: dict[str, tuple[float, float]] = field(default_factory=dict)  # model prefix ->
    #                                          (input, output) USD per 1M tokens; added to and overriding the defaults
    gpu_usd_per_hour: dict[str, float] = field(default_factory=dict)   # accelerator -> USD/h; overrides the defaults
    accelerator: str = "H100"                # the GPU type this run's GPU hours are priced at
    cpu_usd_per_hour: float = 0.0            # CPU-only worker hours (0: a laptop, or CPUs priced into the GPU hour)

    def __post_init__(self):
        for model, price in self.teacher_usd_per_mtok.items():
            check(len(price) == 2 and min(price) >= 0, f"teacher_usd_per_mtok.{model}",
                  "must be [input, output] USD per million tokens, each >= 0")
        for acc, price in self.gpu_usd_per_hour.items():
            check(price >= 0, f"gpu_usd_per_hour.{acc}", "must be >= 0")
        check(self.cpu_usd_per_hour >= 0, "cpu_usd_per_hour", "must be >= 0")


def teacher_price(model: str, pricing: PricingConfig | None = None) -> tuple[float, float] | None:
    """(input, output) USD per million tokens of this model (the longest matching prefix), or None if unknown."""
    table = {**TEACHER_USD_PER_MTOK, **(pricing.teacher_usd_per_mtok if pricing else {})}
    hits = [k for k in table if model == k or model.startswith(k)]
    return tuple(table[max(hits, key=len)]) if hits else None   # type: ignore[return-value]


def gpu_price(pricing: PricingConfig | None = None) -> float | None:
    p = pricing or PricingConfig()
    return {**GPU_USD_PER_HOUR, **p.gpu_usd_per_hour}.get(p.accelerator)


def usd(cost: dict[str, Any], teacher_model: str | None, pricing: PricingConfig | None = None) -> dict[str, Any]:
    """A stage's (or a run's) cost ledger -> dollars: teacher, GPU, CPU and total; a part whose price is unknown
    is None and named in "unpriced" (the total then covers the priced parts only)."""
    p = pricing or PricingConfig()
    out: dict[str, Any] = {"teacher_usd": 0.0, "gpu_usd": 0.0, "cpu_usd": 0.0, "unpriced": []}
    pt, ct = float(cost.get("prompt_tokens", 0) or 0), float(cost.get("completion_tokens", 0) or 0)
    if pt or ct:
        price = teacher_price(teacher_model or "", p)
        if price is None:
            out["teacher_usd"] = None
            out["unpriced"].append(f"teacher model {teacher_model!r}")
        else:
            out["teacher_usd"] = (pt * price[0] + ct * price[1]) / 1e6
    gpu_h = float(cost.get("gpu_hours", 0.0) or 0.0)
    if gpu_h:
        g = gpu_price(p)
        if g is None:
            out["gpu_usd"] = None
            out["unpriced"].append(f"accelerator {p.accelerator!r}")
        else:
            out["gpu_usd"] = gpu_h * g
    out["cpu_usd"] = float(cost.get("cpu_hours", 0.0) or 0.0) * p.cpu_usd_per_hour
    out["total_usd"] = sum(v for k, v in out.items() if k.endswith("_usd") and v is not None)
    return out


def reference_usd(prompt_tokens: float, completion_tokens: float, model: str,
                  pricing: PricingConfig | None = None) -> float | None:
    """What a published token budget costs at this run's teacher prices (for E5-mistral's and SPEED's budgets)."""
    price = teacher_price(model, pricing)
    return None if price is None else (prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6
