"""Config for evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field

from speed_ray.config import check


@dataclass(frozen=True)
class EvalConfig:
    benchmark: str | None = None              # a named mteb benchmark, e.g. "MTEB(eng, v2)" or "MTEB(eng, v1)"
    tasks: tuple[str, ...] = ()               # mteb task names
    local_tasks: tuple[str, ...] = ()         # YAML task descriptions over local files (offline)
    data_root: str | None = None              # base dir for local task YAML paths (overrides the YAML's data_root)
    instructions: bool = True                 # E5-mistral query instructions per task
    batch_size: int = 64                      # texts per encode batch (per actor when distributed)
    max_length: int = 512                     # caps (never raises) the model's own max_seq_length
    limit: int | None = None                  # evaluate on at most this many examples per task (smoke tests)
    cache: bool = True                        # embedding cache per (model, text, instruction)
    cache_dir: str | None = None              # None: ~/.cache/speed-ray/embeddings ($SPEED_RAY_CACHE)
    distributed: bool = False                 # encode large corpora on Ray Data
    distributed_min_texts: int = 10000        # only inputs at least this large go to Ray Data
    num_workers: int = 1                      # encoder actors on Ray Data (at most)
    use_gpu: bool = False                     # one GPU per encoder actor / the local encoder on cuda
    baselines: tuple[str, ...] = field(default_factory=tuple)   # extra models to evaluate side by side

    def __post_init__(self):
        check(self.batch_size > 0, "batch_size", "must be > 0")
        check(self.max_length > 0, "max_length", "must be > 0")
        check(self.limit is None or self.limit > 0, "limit", "must be > 0 (or null for full tasks)")
        check(self.num_workers >= 1, "num_workers", "must be >= 1")
        check(self.distributed_min_texts >= 0, "distributed_min_texts", "must be >= 0")
