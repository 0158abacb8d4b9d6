"""Configs for the studies: scaling sweep, influence study."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from speed_ray.config import check


@dataclass(frozen=True)
class SweepConfig:
    sizes: tuple[int, ...] = (1000, 10000, 100000)   # nested subsets of one synthesized pool
    axes: dict[str, list[Any]] = field(default_factory=dict)   # extra grid axes: dotted key -> values
    seeds: tuple[int, ...] = (0,)
    max_concurrent: int = 1                   # points run in parallel
    num_cpus_per_point: float = 1.0
    num_gpus_per_point: float = 0.0
    n_bootstrap: int = 1000

    def __post_init__(self):
        check(len(self.sizes) > 0 and all(s > 0 for s in self.sizes), "sizes", "need positive sizes")
        check(self.max_concurrent >= 1, "max_concurrent", "must be >= 1")


@dataclass(frozen=True)
class InfluenceConfig:
    categories: tuple[str, ...] = ("matching_short", "retrieval", "classification", "matching_long")
    n_bootstrap: int = 1000
    alpha: float = 0.05
    max_concurrent: int = 1                   # models trained in parallel
    num_cpus_per_point: float = 1.0           # CPUs each model's task reserves (its trainer asks for its own)
    num_gpus_per_point: float = 0.0
    n_samples: int | None = None              # rows per category (None: all); a model on k categories gets k x this

    def __post_init__(self):
        check(len(self.categories) >= 1, "categories", "need at least one category")
        check(0 < self.alpha < 1, "alpha", "must be in (0, 1)")
        check(self.max_concurrent >= 1, "max_concurrent", "must be >= 1")
        check(len(set(self.categories)) == len(self.categories), "categories", "must not repeat")
