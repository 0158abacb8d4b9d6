"""The run config: one frozen, typed config per stage, composed; loaded from YAML with a.b=c overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from speed_ray.align.config import DPOTrainerConfig, TrainerConfig
from speed_ray.config import ConfigError, apply_overrides, check, from_dict, read_yaml, to_dict
from speed_ray.dedup.config import DedupConfig, FiltersConfig
from speed_ray.embedder.config import EmbedderConfig
from speed_ray.evaluate.config import EvalConfig
from speed_ray.generate.config import RevisionConfig, RootDataConfig, SynthesisConfig
from speed_ray.pricing import PricingConfig
from speed_ray.quality.config import ScreenConfig
from speed_ray.serve.config import ServeConfig
from speed_ray.studies.config import InfluenceConfig, SweepConfig
from speed_ray.teacher.config import (BrainstormConfig, JudgeConfig, MixtureConfig, ReviseSignalsConfig,
                                      SeedDataConfig, TeacherConfig, TopicsConfig)


@dataclass(frozen=True)
class RunSection:
    name: str = "speed"                       # names this run's plan/report inside run_dir
    run_dir: str = "runs/speed"               # local path or fsspec URL (s3://, gs://, abfs://)
    seed: int = 0
    ray_address: str | None = None            # None: $RAY_ADDRESS, else a local Ray started on demand
    num_cpus: int | None = None               # local Ray only
    log_level: str = "INFO"

    def __post_init__(self):
        check(bool(self.name) and "/" not in self.name, "name", "must be a non-empty name without '/'")
        check(bool(self.run_dir), "run_dir", "must not be empty")
        from speed_ray.store import absolute_run_dir

        object.__setattr__(self, "run_dir", absolute_run_dir(self.run_dir))


# The pipeline variants (paper Tables 1 and 2); speed_ray.pipeline.build_plan wires each.
VARIANTS = ("full", "sft_only", "no_dpo", "no_revisor", "direct_instruct", "direct_teacher")


@dataclass(frozen=True)
class PipelineSection:
    variant: str = "full"                     # full | sft_only | no_dpo | no_revisor | direct_instruct | direct_teacher
    stages: tuple[str, ...] = ()              # run only these (empty: all of the variant)
    paper_result: float | None = None         # the paper's MTEB average for this experiment, for the report
    concurrent_teacher_stages: bool = True    # run independent teacher stages (judge, revise_signals) together

    def __post_init__(self):
        check(self.variant in VARIANTS, "variant", f"must be one of {list(VARIANTS)}")


def _sft(**kw) -> TrainerConfig:
    return TrainerConfig(**kw)


@dataclass(frozen=True)
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    topics: TopicsConfig = field(default_factory=TopicsConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    brainstorm: BrainstormConfig = field(default_factory=BrainstormConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    seed_data: SeedDataConfig = field(default_factory=SeedDataConfig)
    junior_sft: TrainerConfig = field(default_factory=lambda: _sft(learning_rate=1e-4, batch_size=16))
    root_data: RootDataConfig = field(default_factory=RootDataConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    revise_signals: ReviseSignalsConfig = field(default_factory=ReviseSignalsConfig)
    senior_dpo: DPOTrainerConfig = field(default_factory=DPOTrainerConfig)
    revisor_sft: TrainerConfig = field(default_factory=lambda: _sft(learning_rate=5e-6, batch_size=24,
                                                                    per_device_batch_size=4))
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    revision: RevisionConfig = field(default_factory=RevisionConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    screen: ScreenConfig = field(default_factory=ScreenConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    pricing: PricingConfig = field(default_factory=PricingConfig)
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)


def build_config(data: dict, source: str = "") -> RunConfig:
    try:
        return from_dict(RunConfig, data)
    except ConfigError as e:
        if source and not e.source:
            raise ConfigError(str(e).split(": ", 1)[-1], e.key, source) from None
        raise


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config (with `_base:` inheritance) and apply a.b=c overrides."""
    data = read_yaml(path)
    try:
        data = apply_overrides(data, overrides or [])
    except ConfigError as e:
        raise ConfigError(str(e).split(": ", 1)[-1], e.key, "command line") from None
    try:
        return build_config(data, str(path))
    except ConfigError as e:
        hit = next((o for o in overrides or [] if e.key and o.split("=", 1)[0].strip() == e.key), None)
        if hit:
            raise ConfigError(str(e).split(": ", 1)[-1], e.key, f"command line override {hit!r}") from None
        raise


def replace(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """A copy of cfg with a.b=c overrides applied (used by sweeps)."""
    return build_config(apply_overrides(to_dict(cfg), overrides), "overrides")


def dump_config(cfg: RunConfig, url: str) -> None:
    import fsspec

    with fsspec.open(url, "w", auto_mkdir=True) as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


__all__ = ["RunConfig", "load_config", "build_config", "replace", "dump_config", "dataclasses"]
