"""Run a stage's teacher requests exactly once: Ray Data -> teacher_map -> parse -> valid shards + reject shards.

Every answered request ends in exactly one place, keyed by `request_id`: its valid row(s) in the stage's data
shards, or its reject row (with `reject_reason`) in `artifacts/rejects/`. Both are written by the Ray workers
(rejects first, then data, each atomically). Requests that got no answer (retries exhausted, budget cap) are
not written anywhere, so a rerun sends exactly those and nothing else. Data shards hold valid rows only, so
downstream stages read them without filtering.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter

from speed_ray.llm.metrics import check_answered, check_valid_share, written_summary
from speed_ray.llm.shards import done
from speed_ray.llm.sink import Finish, write_split
from speed_ray.store import StageOutput
from speed_ray.streaming import DoneSet

log = logging.getLogger("speed_ray")

# Reject reasons that mean "no usable JSON at all" (parse_rate counts the others as parsed).
UNPARSED = ("empty_output", "no_json", "truncated", "invalid_json", "refusal")


class BudgetExhausted(RuntimeError):
    """The run's teacher budget ran out; everything answered so far is written and a rerun resumes."""


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


def written_ids(out: StageOutput) -> DoneSet:
    """The resume check of a teacher stage: request ids in its data or rejects."""
    return done(out, "request_id")


def run_teacher(ctx, requests, finish: Finish, total_requests: int) -> dict:
    """Send the pending requests of Ray Dataset `requests` (speed_ray.llm.rows request columns, request_id, and
    whatever `finish` needs; already filtered of written ids by the caller) through the teacher, write results
    (speed_ray.llm.sink), fill ctx.ledger; return the manifest metrics. Raises BudgetExhausted
    (cfg.teacher.on_budget_exhausted=fail) after writing."""
    from speed_ray.teacher.endpoint import teacher_base_url
    from speed_ray.teacher.requests_ray import teacher_map

    t = ctx.cfg.teacher
    cache_url = f"{ctx.cfg.run.run_dir.rstrip('/')}/cache/teacher" if t.cache else None
    price, spent = _dollars(ctx)
    ds = teacher_map(requests, t, teacher_base_url(ctx), cache_url, budget_name(ctx),
                     batch_size=t.request_batch_size, num_actors=t.num_actors, usd_per_mtok=price,
                     budget_usd=t.budget_usd, spent_usd=spent)
    run = write_split(ds, ctx.out, t.shard_rows, id_col="request_id", finish=finish)
    return finalize(ctx, run, total_requests)


def written_ledger(out: StageOutput) -> dict:
    """The cost of what a (maybe unfinished) teacher stage has written so far."""
    return written_summary(out, "request_id")["ledger"]


_RUN_KEYS = ("sent", "answered", "valid", "valid_rows", "rejected", "failed")


def finalize(ctx, run: dict, total_requests: int) -> dict:
    """Manifest metrics over everything written (this run and the runs it resumed), and the cost ledger. `run` is
    this run's totals (speed_ray.llm.metrics.collect; {} when nothing was sent)."""
    out = ctx.out
    w = written_summary(out, "request_id")
    errors = Counter(run.get("errors", {}))
    ledger = Counter(w["ledger"])
    ledger.update(run.get("failed_ledger", {}))
    ctx.ledger.add(dict(ledger))
    ctx.ledger.extra.update({k: ledger[k] for k in ("budget_exhausted", "http_attempts") if k in ledger})
    n_valid, n_rej, reasons = w["requests"], w["rejected"], Counter(w["reject_reasons"])
    answered = w["answered"]
    unparsed = sum(v for k, v in reasons.items() if k in UNPARSED)
    pending = max(0, total_requests - answered)
    metrics = {
        "requests": total_requests, "answered": answered, "valid": n_valid, "rejected": n_rej, "pending": pending,
        "parse_rate": (answered - unparsed) / answered if answered else 0.0,
        "valid_rate": n_valid / answered if answered else 0.0,
        "reject_reasons": dict(sorted(reasons.items())), "this_run": {k: run[k] for k in _RUN_KEYS if k in run},
        "failed_errors": dict(errors), "budget_exhausted": bool(errors.get("budget_exhausted")),
        "rejects_url": f"{out.artifacts_url}/rejects",
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
    check_answered(ctx.name, run, total=total_requests, max_failed_fraction=ctx.cfg.teacher.max_failed_fraction,
                   written=answered, setting="teacher.max_failed_fraction")
    # mostly rejects (a teacher answering garbage) fails the stage with its shards kept; a rerun re-checks them
    metrics.update(check_valid_share(ctx.name, n_valid, answered, ctx.cfg.teacher.min_valid_share, reasons,
                                     unit="answered requests", verb="valid", setting="teacher.min_valid_share",
                                     where=out.url, planned=total_requests, metrics=metrics))
    if pending and not metrics["budget_exhausted"]:
        log.warning("[%s] %d request(s) got no answer after retries (%s); rerun the stage to retry them "
                    "(use --force %s, since it is marked complete)", ctx.name, pending, dict(errors), ctx.name)
    return metrics
