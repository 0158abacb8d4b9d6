"""Run a stage's teacher requests exactly once: Ray Data -> teacher_map -> parse -> valid shards + reject shards.

Every answered request ends in exactly one place, keyed by `request_id`: its valid row(s) in the stage's data
shards, or its reject row (with `reject_reason`) in `artifacts/rejects/`. Both are written by the Ray workers
(rejects first, then data, each atomically). Requests that got no answer (retries exhausted, budget cap) are
not written anywhere, so a rerun sends exactly those and nothing else. Data shards hold valid rows only, so
downstream stages read them without filtering.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import Counter
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from speed_ray.generate.sink import check_valid_share
from speed_ray.store import StageOutput
from speed_ray.streaming import done_ids, shard_name_for

log = logging.getLogger("speed_ray")

# teacher_map columns kept on every written row, so the cost ledger can be rebuilt from the shards.
TEACHER_COLS = ("prompt_tokens", "completion_tokens", "cached", "error", "attempts", "finish_reason")
REQUEST_COLS = ("request_id", "messages", "temperature", "top_p", "max_tokens", "response_format")
# Reject reasons that mean "no usable JSON at all" (parse_rate counts the others as parsed).
UNPARSED = ("empty_output", "no_json", "truncated", "invalid_json", "refusal")

# finish(row) -> (valid rows, reject rows); row is one teacher_map output row as a dict.
Finish = Callable[[dict], "tuple[list[dict], list[dict]]"]


class BudgetExhausted(RuntimeError):
    """The run's teacher budget ran out; everything answered so far is written and a rerun resumes."""


class TooManyFailures(RuntimeError):
    """More requests than teacher.max_failed_fraction got no answer after retries; a rerun retries them."""


def rejects_output(out: StageOutput) -> StageOutput:
    """A view of `out` whose shards live in artifacts/rejects/ (same atomic writes, same resume logic)."""
    rej = StageOutput(out.run_dir, out.stage, out.fingerprint)
    rej.data_url = f"{out.artifacts_url}/rejects"
    return rej


def reject_row(row: dict, reason: str, **extra) -> dict:
    """The reject record of one answered request: its id, prompt, raw answer and why it was rejected."""
    base = {k: row.get(k) for k in ("request_id", "id", "task_type", "lineage") if k in row}
    return {**base, "messages": row.get("messages", ""), "response_text": row.get("response_text", ""),
            "valid": False, "reject_reason": reason, **extra, **{k: row.get(k) for k in TEACHER_COLS}}


def teacher_cols(row: dict) -> dict:
    return {k: row.get(k) for k in TEACHER_COLS}


class _SplitWriter:
    """map_batches fn: parse a batch of answers, write its rejects then its valid rows, return one summary row."""

    def __init__(self, out: StageOutput, finish: Finish):
        self.out, self.rej, self.finish = out, rejects_output(out), finish

    def __call__(self, batch: pa.Table) -> pa.Table:
        from speed_ray.teacher.requests_ray import ledger_from_table

        valid, rejects, failed_idx, answered = [], [], [], 0
        rows = batch.to_pylist()
        for i, row in enumerate(rows):
            err = row.get("error") or ""
            if err.startswith("refusal"):   # a structured-output refusal is an answer: reject, don't retry
                answered += 1
                rejects.append(reject_row(row, "refusal"))
                continue
            if err:
                failed_idx.append(i)
                continue
            answered += 1
            v, r = self.finish(row)
            valid += v
            rejects += r
        written = [r["request_id"] for r in valid] + [r["request_id"] for r in rejects]
        name = shard_name_for(sorted(set(written))) if written else ""
        if rejects:
            self.rej.write_shard(name, pa.Table.from_pylist(rejects))
        if valid:
            self.out.write_shard(name, pa.Table.from_pylist(valid))
        failed = batch.take(failed_idx) if failed_idx else None
        errors = Counter(_error_kind(rows[i]["error"]) for i in failed_idx)
        return pa.table({"shard": [name], "sent": [len(rows)], "answered": [answered],
                         "valid_requests": [len({r["request_id"] for r in valid})], "valid_rows": [len(valid)],
                         "rejected": [len(rejects)], "failed": [len(failed_idx)],
                         "errors": [json.dumps(dict(errors))],
                         "failed_ledger": [json.dumps(ledger_from_table(failed) if failed is not None else {})]})


def _error_kind(err: str) -> str:
    return err.split(":", 1)[0].strip() or "error"


def budget_name(ctx) -> str | None:
    """One budget actor per run_pipeline call (shared by its teacher stages), when a cap is configured."""
    t = ctx.cfg.teacher
    if t.max_calls is None and t.max_tokens_budget is None and t.budget_usd is None:
        return None
    return ctx.services.setdefault("teacher_budget", f"teacher-budget-{ctx.run_name}-{uuid.uuid4().hex[:8]}")


def _dollars(ctx) -> tuple[tuple[float, float] | None, float]:
    """(the teacher's USD per 1M input/output tokens, what the run's teacher stages already paid) for a dollar
    budget; (price or None, 0.0) without one. Computed once per pipeline run, when its first teacher stage starts:
    after that the budget actor keeps count."""
    from speed_ray.config import ConfigError
    from speed_ray.pricing import teacher_price

    t = ctx.cfg.teacher
    price = teacher_price(t.model, ctx.cfg.pricing)
    if t.budget_usd is None:
        return price, 0.0
    if price is None:
        raise ConfigError(f"teacher.budget_usd needs the price of teacher model {t.model!r}: set "
                          f"pricing.teacher_usd_per_mtok.{t.model}=[input, output] (USD per 1M tokens)")

    def spent() -> float:
        total = 0.0
        for name, fp in ctx.services.setdefault("teacher_outputs", [(ctx.name, ctx.out.fingerprint)]):
            out = ctx.store.stage(name, fp)
            c = out.manifest.get("cost", {}) if out.done else written_ledger(out)
            total += (c.get("prompt_tokens", 0) * price[0] + c.get("completion_tokens", 0) * price[1]) / 1e6
        log.info("teacher budget: $%.2f of $%.2f already spent by this run's teacher stages", total, t.budget_usd)
        return total

    return price, ctx.services.get("teacher_spent_usd", spent)


def written_ids(out: StageOutput) -> set[str]:
    return done_ids(out, "request_id") | done_ids(rejects_output(out), "request_id")


def run_teacher(ctx, requests, finish: Finish, total_requests: int) -> dict:
    """Send the pending requests of Ray Dataset `requests` (REQUEST_COLS + whatever `finish` needs; already
    filtered of written ids by the caller) through the teacher, write results, fill ctx.ledger; return the
    manifest metrics. Raises BudgetExhausted (cfg.teacher.on_budget_exhausted=fail) after writing."""
    from speed_ray.teacher.endpoint import teacher_base_url
    from speed_ray.teacher.requests_ray import teacher_map

    t = ctx.cfg.teacher
    cache_url = f"{ctx.cfg.run.run_dir.rstrip('/')}/cache/teacher" if t.cache else None
    price, spent = _dollars(ctx)
    ds = teacher_map(requests, t, teacher_base_url(ctx), cache_url, budget_name(ctx),
                     batch_size=t.request_batch_size, num_actors=t.num_actors, usd_per_mtok=price,
                     budget_usd=t.budget_usd, spent_usd=spent)
    summary = ds.map_batches(_SplitWriter(ctx.out, finish), batch_size=t.shard_rows, batch_format="pyarrow",
                             num_cpus=0.1)
    run = Counter()
    errors: Counter = Counter()
    failed_ledger: Counter = Counter()
    for s in summary.iter_rows():   # one small row per shard: counts only
        for k in ("sent", "answered", "valid_requests", "valid_rows", "rejected", "failed"):
            run[k] += int(s[k])
        errors.update(json.loads(s["errors"]))
        failed_ledger.update(json.loads(s["failed_ledger"]))
    return finalize(ctx, dict(run), errors, dict(failed_ledger), total_requests)


def _written(out: StageOutput) -> tuple[pa.Table | None, pa.Table | None, Counter]:
    """A teacher stage's written rows (valid, rejected) and the cost of the calls that made them: one ledger entry
    per request (a request with several valid rows, as in brainstorm, paid once)."""
    from speed_ray.teacher.requests_ray import ledger_from_table

    rej = rejects_output(out)
    cols = ["request_id", *TEACHER_COLS]
    data = out.read_table(columns=cols) if out.shard_names() else None
    rejects = rej.read_table(columns=cols + ["reject_reason"]) if rej.shard_names() else None
    parts = []
    if data is not None and data.num_rows:
        parts.append(_first_per_request(data))
    if rejects is not None and rejects.num_rows:
        parts.append(rejects.select(cols))
    ledger = Counter()
    for p in parts:
        ledger.update(ledger_from_table(p))
    return data, rejects, ledger


def written_ledger(out: StageOutput) -> dict:
    """The cost of what a (maybe unfinished) teacher stage has written so far."""
    return dict(_written(out)[2])


def finalize(ctx, run: dict, errors: Counter, failed_ledger: dict, total_requests: int) -> dict:
    """Manifest metrics over everything written (this run and the runs it resumed), and the cost ledger."""
    out, rej = ctx.out, rejects_output(ctx.out)
    data, rejects, ledger = _written(out)
    ledger.update(failed_ledger)
    ctx.ledger.add(dict(ledger))
    ctx.ledger.extra.update({k: ledger[k] for k in ("budget_exhausted", "http_attempts") if k in ledger})
    n_valid = len(set(data.column("request_id").to_pylist())) if data is not None else 0
    reasons = Counter(rejects.column("reject_reason").to_pylist()) if rejects is not None else Counter()
    n_rej = sum(reasons.values())
    answered = n_valid + n_rej
    unparsed = sum(v for k, v in reasons.items() if k in UNPARSED)
    pending = max(0, total_requests - answered)
    metrics = {
        "requests": total_requests, "answered": answered, "valid": n_valid, "rejected": n_rej, "pending": pending,
        "parse_rate": (answered - unparsed) / answered if answered else 0.0,
        "valid_rate": n_valid / answered if answered else 0.0,
        "reject_reasons": dict(sorted(reasons.items())), "this_run": run, "failed_errors": dict(errors),
        "budget_exhausted": bool(errors.get("budget_exhausted")), "rejects_url": rej.data_url,
    }
    log.info("[%s] %d/%d answered: %d valid, %d rejected, %d pending (parse %.1f%%, valid %.1f%%)", ctx.name,
             answered, total_requests, n_valid, n_rej, pending, 100 * metrics["parse_rate"],
             100 * metrics["valid_rate"])
    if metrics["budget_exhausted"] and ctx.cfg.teacher.on_budget_exhausted == "fail":
        raise BudgetExhausted(
            f"teacher budget exhausted (teacher.max_calls={ctx.cfg.teacher.max_calls}, "
            f"teacher.max_tokens_budget={ctx.cfg.teacher.max_tokens_budget}, "
            f"teacher.budget_usd={ctx.cfg.teacher.budget_usd}): {answered} of {total_requests} "
            f"requests are written, {pending} pending. Raise the cap and rerun to complete them, or set "
            f"teacher.on_budget_exhausted=finish to accept a partial stage.")
    failed = run.get("failed", 0) - errors.get("budget_exhausted", 0)   # never sent: not a failure
    if failed > 0 and failed > ctx.cfg.teacher.max_failed_fraction * max(1, total_requests):
        raise TooManyFailures(
            f"{failed} of {total_requests} teacher requests got no answer after retries ({dict(errors)}); "
            f"{answered} are written. Rerun to retry the missing ones, or raise teacher.max_failed_fraction.")
    # mostly rejects (a teacher answering garbage) fails the stage with its shards kept; a rerun re-checks them
    metrics.update(check_valid_share(ctx.name, n_valid, answered, ctx.cfg.teacher.min_valid_share, reasons,
                                     unit="answered requests", verb="valid", setting="teacher.min_valid_share",
                                     where=out.url, planned=total_requests, metrics=metrics))
    if pending and not metrics["budget_exhausted"]:
        log.warning("[%s] %d request(s) got no answer after retries (%s); rerun the stage to retry them "
                    "(use --force %s, since it is marked complete)", ctx.name, pending, dict(errors), ctx.name)
    return metrics


def _first_per_request(t: pa.Table) -> pa.Table:
    ids = t.column("request_id").to_pylist()
    seen, keep = set(), []
    for i, rid in enumerate(ids):
        if rid not in seen:
            seen.add(rid)
            keep.append(i)
    return t.take(pa.array(keep, pa.int64())).select([c for c in t.column_names if c != "request_id"] + ["request_id"])


def pending_mask(ids: pa.Array, done: set[str]) -> pa.Array:
    if not done:
        return pa.array([True] * len(ids))
    return pc.invert(pc.is_in(ids, value_set=pa.array(sorted(done), pa.string())))
