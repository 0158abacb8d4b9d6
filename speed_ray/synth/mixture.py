"""Task-type mixtures: SPEED's 7:7:7:2 groups and seed 002's six categories, normalized to task types."""

from __future__ import annotations

from speed_ray.config import ConfigError

# Seed 002's category names and SPEED's groups, mapped to the task types the prompts know.
ALIASES: dict[str, tuple[str, ...]] = {
    "short-long": ("retrieval",),
    "long-short": ("classification",),
    "short-short": ("matching_short",),
    "long-long": ("matching_long",),
    "matching": ("matching_short", "matching_long"),
    "text_matching": ("matching_short", "matching_long"),
}
TASK_TYPES = ("retrieval", "classification", "matching_short", "matching_long", "sts", "bitext")


def normalize_mixture(weights: dict[str, float]) -> dict[str, float]:
    """Map a mixture's keys to task types and normalize to proportions that sum to 1."""
    out: dict[str, float] = {}
    for key, w in weights.items():
        if not isinstance(w, (int, float)) or w < 0:
            raise ConfigError(f"weight must be a number >= 0, got {w!r}", f"mixture.weights.{key}")
        types = ALIASES.get(key, (key,) if key in TASK_TYPES else None)
        if types is None:
            raise ConfigError(f"unknown task type or category {key!r}; known: "
                              f"{sorted(set(TASK_TYPES) | set(ALIASES))}", f"mixture.weights.{key}")
        for t in types:
            out[t] = out.get(t, 0.0) + float(w) / len(types)
    total = sum(out.values())
    if total <= 0:
        raise ConfigError("weights must not all be zero", "mixture.weights")
    return {t: w / total for t, w in out.items() if w > 0}


def allocate(n: int, proportions: dict[str, float]) -> dict[str, int]:
    """Split n items by proportions with largest-remainder rounding (sums exactly to n)."""
    raw = {t: n * p for t, p in proportions.items()}
    base = {t: int(v) for t, v in raw.items()}
    left = n - sum(base.values())
    for t in sorted(raw, key=lambda t: (raw[t] - base[t], t), reverse=True)[:left]:
        base[t] += 1
    return base
