"""Teacher calls on Ray Data: an async map_batches UDF in an actor pool and a shared budget actor, on the row
contract of speed_ray.llm.rows."""

from __future__ import annotations

import math
import os
import uuid
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from speed_ray import config_view
from speed_ray.llm.cache import ResponseCache
from speed_ray.llm.client import ChatClient, Secret
from speed_ray.llm.ratelimit import Budget
from speed_ray.llm.rows import LLMRequest, merge_results, requests_from_batch, with_results

if TYPE_CHECKING:
    from speed_ray.teacher.config import TeacherConfig

BUDGET_NAMESPACE = "speed_ray_teacher"

class _BudgetActor(Budget):
    """The run's Budget as a Ray actor: one sequential owner, so admission is exact across all UDF actors."""


def make_budget(name: str, max_calls: int | None, max_tokens: int | None, detached: bool = False,
                max_usd: float | None = None, spent_usd: float = 0.0):
    """The named budget actor (created, or the existing one when `name` is taken: get_if_exists).

    Job-scoped by default: it dies with the driver, so a resumed run starts a fresh budget for its new calls
    (cached answers cost nothing). detached=True keeps one budget across jobs until `ray.kill`ed."""
    import ray

    cls = ray.remote(num_cpus=0, max_restarts=0)(_BudgetActor)
    return cls.options(name=name, namespace=BUDGET_NAMESPACE, get_if_exists=True,
                       lifetime="detached" if detached else None).remote(max_calls, max_tokens, max_usd, spent_usd)


class _ActorBudget:
    """Budget interface over the actor handle; the client awaits the returned ObjectRefs."""

    def __init__(self, handle):
        self.handle = handle

    def try_acquire(self, est_tokens: int, est_usd: float = 0.0):
        return self.handle.try_acquire.remote(est_tokens, est_usd)

    def settle(self, est_tokens: int, actual_tokens: int, est_usd: float = 0.0, actual_usd: float = 0.0):
        return self.handle.settle.remote(est_tokens, actual_tokens, est_usd, actual_usd)


def client_from_config(cfg: "TeacherConfig", base_url: str | None, cache_url: str | None, budget: Any = None,
                       api_key: Secret | str | None = None,
                       usd_per_mtok: tuple[float, float] | None = None) -> ChatClient:
    """The teacher's ChatClient; `base_url` overrides cfg.base_url (e.g. the URL of a local server the stage
    started)."""
    url = base_url or cfg.base_url
    if not url:
        raise ValueError("teacher.base_url is not set and no local server URL was given")
    if budget is None and (cfg.max_calls is not None or cfg.max_tokens_budget is not None):
        budget = Budget(cfg.max_calls, cfg.max_tokens_budget)
    return ChatClient(url, cfg.model, cfg.api_key_env, concurrency=cfg.concurrency, rpm=cfg.rpm, tpm=cfg.tpm,
                      timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, backoff_base_s=cfg.backoff_base_s,
                      backoff_max_s=cfg.backoff_max_s,
                      cache=ResponseCache(cache_url) if (cfg.cache and cache_url) else None, budget=budget,
                      api_key=api_key, max_tokens_param=cfg.max_tokens_param, usd_per_mtok=usd_per_mtok)


class TeacherUDF:
    """Async map_batches UDF: one TeacherClient per actor; Ray Data runs several batches concurrently on the
    actor's event loop and the client's semaphore bounds the requests in flight across them."""

    def __init__(self, cfg: "TeacherConfig", base_url: str, cache_url: str | None, budget: Any,
                 api_key: Secret | None, usd_per_mtok: tuple[float, float] | None = None):
        budget = _ActorBudget(budget) if budget is not None else None
        # caps live in the shared actor; the client must not build a private per-actor Budget from cfg
        cfg = config_view.replace(cfg, max_calls=None, max_tokens_budget=None)
        self.client = client_from_config(cfg, base_url, cache_url, budget=budget, api_key=api_key,
                                         usd_per_mtok=usd_per_mtok)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        parsed = requests_from_batch(batch, "request_id")
        answers = await self.client.complete_many([r for r in parsed if isinstance(r, LLMRequest)])
        return with_results(batch, merge_results(parsed, answers))


ASYNC_BATCHES_PER_TASK = 4   # Ray Data's RAY_DATA_DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY
# Map tasks one actor runs at once. A task ends with its slowest request (a 429's Retry-After, a 5xx backoff), and an
# actor runs one task at a time by default (max_concurrency=1), so one straggler left the client's other slots idle
# until it came back: at paper scale 128 slots at 300 ms served 172 requests/s, not ~400. Several tasks share the
# actor's event loop, so the client's semaphore still bounds the requests in flight.
TASKS_PER_ACTOR = 4


def teacher_map(ds, cfg: "TeacherConfig", base_url: str, cache_url: str | None, budget_name: str | None = None,
                batch_size: int = 64, num_actors: int = 1, num_cpus: float = 0.25,
                usd_per_mtok: tuple[float, float] | None = None, budget_usd: float | None = None,
                spent_usd: float = 0.0):
    """Ray Data: request rows (speed_ray.llm.rows request columns and request_id) -> the same rows with the result
    columns (text "" and error set when unanswered). Lazy and streaming: nothing is collected in the driver.

    cfg.concurrency, rpm and tpm are totals, split evenly across `num_actors`. With a budget cap in cfg
    (max_calls / max_tokens_budget, or budget_usd: dollars at usd_per_mtok, of which spent_usd are already paid)
    all actors share one budget actor, `budget_name` or a fresh one."""
    import ray

    capped = cfg.max_calls is not None or cfg.max_tokens_budget is not None or budget_usd is not None
    if budget_name is None and capped:
        budget_name = f"teacher-budget-{uuid.uuid4().hex[:12]}"
    if budget_usd is not None and usd_per_mtok is None:
        raise ValueError("a dollar budget needs the teacher's price (usd_per_mtok)")
    # The handle rides in the UDF's constructor args, so the (non-detached) actor lives as long as the dataset.
    budget = make_budget(budget_name, cfg.max_calls, cfg.max_tokens_budget, max_usd=budget_usd,
                         spent_usd=spent_usd) if budget_name else None
    # config_view.replace: a stage's recorded reads stay the fields the client reads, not every field copied here
    per = config_view.replace(
        cfg, concurrency=max(1, math.ceil(cfg.concurrency / num_actors)),
        rpm=None if cfg.rpm is None else max(1, cfg.rpm // num_actors),
        tpm=None if cfg.tpm is None else max(1, cfg.tpm // num_actors))
    # Ray Data runs 4 batches of an async UDF at once per task (RAY_DATA_DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY),
    # so smaller batches could not fill the client's concurrency.
    batch_size = max(batch_size, math.ceil(per.concurrency / ASYNC_BATCHES_PER_TASK))
    # A map task's answers leave its actor only when the task ends (Ray Data shapes a task's outputs into blocks of
    # up to target_max_block_size): a task over one block of a whole input file (SPEED's 20K topics x 4 calls come
    # in a few files) held minutes of answers back from the shard writer, and a crash lost them. Blocks of the
    # batches one task runs at once instead, as generate_dataset does for the engines.
    ds = ds.repartition(target_num_rows_per_block=ASYNC_BATCHES_PER_TASK * batch_size)
    # The driver's key travels to the actors wrapped in Secret (never printed); an actor on a node without the
    # env var still authenticates, and nothing is put in a runtime_env, which the dashboard shows.
    key = os.environ.get(cfg.api_key_env)
    return ds.map_batches(
        TeacherUDF, fn_constructor_kwargs={"cfg": config_view.for_workers(per), "base_url": base_url,
                                           "cache_url": cache_url, "budget": budget,
                                           "api_key": Secret(key) if key else None, "usd_per_mtok": usd_per_mtok},
        batch_size=batch_size, batch_format="pyarrow", num_cpus=num_cpus,
        compute=ray.data.ActorPoolStrategy(min_size=num_actors, max_size=num_actors,
                                           max_concurrent_calls_per_actor=TASKS_PER_ACTOR))
