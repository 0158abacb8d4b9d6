"""Teacher calls on Ray Data: an async map_batches UDF in an actor pool, a shared budget actor, a cost ledger."""

from __future__ import annotations

import json
import math
import os
import uuid
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from speed_ray import config_view
from speed_ray.teacher.client import ChatRequest, ChatResult, Secret, TeacherClient
from speed_ray.teacher.ratelimit import Budget

if TYPE_CHECKING:
    from speed_ray.teacher.config import TeacherConfig

BUDGET_NAMESPACE = "speed_ray_teacher"

# Columns teacher_map adds to each row.
RESULT_SCHEMA = pa.schema([("response_text", pa.string()), ("prompt_tokens", pa.int64()),
                           ("completion_tokens", pa.int64()), ("cached", pa.bool_()), ("error", pa.string()),
                           ("attempts", pa.int64()), ("finish_reason", pa.string())])


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


REQUIRED_COLUMNS = ("request_id", "messages")


def rows_to_requests(batch: pa.Table) -> tuple[list[ChatRequest | None], list[str]]:
    """Parse a batch's request columns; a malformed row becomes None plus an error naming the problem."""
    missing = [c for c in REQUIRED_COLUMNS if c not in batch.column_names]
    if missing:
        raise ValueError(f"teacher_map input lacks column(s) {missing}; it has {batch.column_names}")
    cols = batch.to_pydict()
    n = batch.num_rows
    reqs: list[ChatRequest | None] = []
    errors: list[str] = []
    for i in range(n):
        rid = str(cols["request_id"][i])
        try:
            messages = json.loads(cols["messages"][i])
            if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
                raise ValueError("messages must be a JSON list of {role, content} objects")
            rf_raw = cols.get("response_format", [""] * n)[i] or ""
            response_format = json.loads(rf_raw) if rf_raw else None
            if response_format is not None and not isinstance(response_format, dict):
                raise ValueError("response_format must be a JSON object or empty")
            seed = cols["seed"][i] if "seed" in cols else None
            reqs.append(ChatRequest(
                rid, messages,
                temperature=float(cols["temperature"][i]) if "temperature" in cols else 1.0,
                top_p=float(cols["top_p"][i]) if "top_p" in cols else 1.0,
                max_tokens=int(cols["max_tokens"][i]) if "max_tokens" in cols else 1024,
                response_format=response_format, seed=None if seed is None else int(seed)))
            errors.append("")
        except (ValueError, TypeError) as e:
            reqs.append(None)
            errors.append(f"bad_request: {e}"[:300])
    return reqs, errors


def results_to_columns(results: list[ChatResult | None], bad: list[str]) -> dict[str, pa.Array]:
    def get(r, name, default):
        return default if r is None else getattr(r, name)

    return {
        "response_text": pa.array([get(r, "text", None) or "" for r in results], pa.string()),
        "prompt_tokens": pa.array([get(r, "prompt_tokens", 0) for r in results], pa.int64()),
        "completion_tokens": pa.array([get(r, "completion_tokens", 0) for r in results], pa.int64()),
        "cached": pa.array([get(r, "cached", False) for r in results], pa.bool_()),
        "error": pa.array([b or (get(r, "error", None) or "") for r, b in zip(results, bad)], pa.string()),
        "attempts": pa.array([get(r, "attempts", 0) for r in results], pa.int64()),
        "finish_reason": pa.array([get(r, "finish_reason", None) or "" for r in results], pa.string()),
    }


class TeacherUDF:
    """Async map_batches UDF: one TeacherClient per actor; Ray Data runs several batches concurrently on the
    actor's event loop and the client's semaphore bounds the requests in flight across them."""

    def __init__(self, cfg: "TeacherConfig", base_url: str, cache_url: str | None, budget: Any,
                 api_key: Secret | None, usd_per_mtok: tuple[float, float] | None = None):
        budget = _ActorBudget(budget) if budget is not None else None
        # caps live in the shared actor; the client must not build a private per-actor Budget from cfg
        cfg = config_view.replace(cfg, max_calls=None, max_tokens_budget=None)
        self.client = TeacherClient.from_config(cfg, base_url, cache_url, budget=budget, api_key=api_key,
                                                usd_per_mtok=usd_per_mtok)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        reqs, bad = rows_to_requests(batch)
        todo = [r for r in reqs if r is not None]
        done = iter(await self.client.complete_many(todo))
        results = [next(done) if r is not None else None for r in reqs]
        out = batch
        for name, arr in results_to_columns(results, bad).items():
            if name in out.column_names:  # re-running teacher_map over its own output replaces the old answers
                out = out.drop_columns([name])
            out = out.append_column(name, arr)
        return out


def teacher_map(ds, cfg: "TeacherConfig", base_url: str, cache_url: str | None, budget_name: str | None = None,
                batch_size: int = 64, num_actors: int = 1, num_cpus: float = 0.25,
                usd_per_mtok: tuple[float, float] | None = None, budget_usd: float | None = None,
                spent_usd: float = 0.0):
    """Ray Data: rows with request_id, messages (JSON string), temperature, top_p, max_tokens, response_format
    (JSON string or ""), optionally seed; returns ds plus response_text ("" if failed), prompt_tokens,
    completion_tokens, cached, error ("" if ok), attempts, finish_reason. Lazy and streaming: nothing is
    collected in the driver.

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
    batch_size = max(batch_size, math.ceil(per.concurrency / 4))
    # The driver's key travels to the actors wrapped in Secret (never printed); an actor on a node without the
    # env var still authenticates, and nothing is put in a runtime_env, which the dashboard shows.
    key = os.environ.get(cfg.api_key_env)
    return ds.map_batches(
        TeacherUDF, fn_constructor_kwargs={"cfg": config_view.for_workers(per), "base_url": base_url,
                                           "cache_url": cache_url, "budget": budget,
                                           "api_key": Secret(key) if key else None, "usd_per_mtok": usd_per_mtok},
        batch_size=batch_size, batch_format="pyarrow", num_cpus=num_cpus,
        compute=ray.data.ActorPoolStrategy(min_size=num_actors, max_size=num_actors))


def ledger_from_table(table: pa.Table | pa.RecordBatch | dict) -> dict:
    """Cost of the rows' teacher calls, for the stage manifest (comparable with SPEED Table 5).

    calls: requests actually sent (not cached; successful or failed); tokens only for those (a cached answer
    was paid for by an earlier run); failed_calls: sent but no answer; budget_exhausted: never sent."""
    if isinstance(table, dict):
        table = pa.table(table)
    cached = table.column("cached") if "cached" in table.column_names else pa.array([False] * table.num_rows)
    attempts = table.column("attempts")
    sent = pc.and_(pc.greater(attempts, 0), pc.invert(cached))
    failed = pc.and_(sent, pc.not_equal(table.column("error"), ""))

    def count(mask) -> int:
        return int(pc.sum(pc.cast(mask, pa.int64())).as_py() or 0)

    def total(col: str) -> int:
        return int(pc.sum(pc.if_else(sent, table.column(col), 0)).as_py() or 0)

    return {"calls": count(sent), "prompt_tokens": total("prompt_tokens"),
            "completion_tokens": total("completion_tokens"), "cached_calls": count(cached),
            "failed_calls": count(failed),
            "budget_exhausted": count(pc.equal(table.column("error"), "budget_exhausted")),
            "http_attempts": int(pc.sum(attempts).as_py() or 0)}
