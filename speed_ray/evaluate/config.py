"""Config for evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field

from speed_ray.config import check


@dataclass(frozen=True)
class EvalConfig:
    benchmark: str | None = None              # a named mteb benchmark, e.g. "MTEB(eng, v2)" or "MTEB(eng, v1)"
    tasks: tuple[str, ...] = ()               # mteb task names
    local_tasks: tuple[str, ...] = ()         # YAML task descriptions over local files (offline)
    data_root: str | None = None              # base dir for relative paths in local task YAMLs
    instructions: bool = True                 # E5-mistral query instructions per task
    batch_size: int = 64
    max_length: int = 512
    limit: int | None = None                  # evaluate on at most this many examples per task (smoke tests)
    cache: bool = True                        # embedding cache per (model, text, instruction)
    distributed: bool = False                 # encode large corpora on Ray Data
    num_workers: int = 1
    use_gpu: bool = False
    baselines: tuple[str, ...] = field(default_factory=tuple)   # extra models to evaluate side by side

    def __post_init__(self):
        check(self.batch_size > 0, "batch_size", "must be > 0")
