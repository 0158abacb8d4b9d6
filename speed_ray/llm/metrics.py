"""The one metrics summary of LLM stages: what this run sent and got (`collect`, from the sink's summary rows), what
the stage holds (`written_summary`, from its shards: this run and the runs it resumed), what the calls cost
(`ledger_from_table`), and the floor on valid output (`check_valid_share`)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from speed_ray.llm.shards import column_or as _col, column_sum as _sum, rejects_output
from speed_ray.store import StageOutput

_RUN_SUMS = ("sent", "answered", "valid", "valid_rows", "rejected", "failed", "prompt_tokens", "completion_tokens")


def collect(summary_rows: Iterable[dict]) -> dict[str, Any]:
    """This run's totals from the sink's summary rows (one per shard): sent, answered, valid (ids), valid_rows,
    rejected, failed (no answer: retried by a rerun), tokens, shards_written, reject_reasons, errors (of the failed
    rows, by kind) and failed_ledger (the cost of the calls that got no answer)."""
    tot: dict[str, Any] = {k: 0 for k in _RUN_SUMS}
    tot["shards_written"] = 0
    reasons: Counter = Counter()
    errors: Counter = Counter()
    failed_ledger: Counter = Counter()
    for s in summary_rows:
        for k in _RUN_SUMS:
            tot[k] += int(s[k])
        tot["shards_written"] += bool(s["shard"])
        reasons.update(json.loads(s["reasons"]))
        errors.update(json.loads(s["errors"]))
        failed_ledger.update(json.loads(s["failed_ledger"]))
    tot.update(reject_reasons=dict(reasons), errors=dict(errors), failed_ledger=dict(failed_ledger))
    return tot


_WRITTEN_COLS = ("valid", "reject_reason", "prompt_tokens", "completion_tokens", "cached", "attempts", "error")
# per shard: (its table, whether it is a rejects shard)
Extra = Callable[[pa.Table, bool], None]


def written_summary(out: StageOutput, id_col: str = "id", extra_cols: tuple[str, ...] = (),
                    extra: Extra | None = None) -> dict[str, Any]:
    """Totals over everything a stage holds (data and rejects), read shard by shard, few columns:
    rows (data rows), requests (distinct ids in data), valid_rows, rejected, answered (requests + rejected),
    reject_reasons, prompt/completion tokens and the cost `ledger` (one entry per request: a request with several
    rows, as in brainstorm, paid once), error_examples (the commonest messages behind generation_error).
    `extra(table, is_rejects)` sees each shard's table (with `extra_cols` read too) for a stage's own counts."""
    tot = Counter()
    reasons: Counter = Counter()
    examples: Counter = Counter()
    ledger: Counter = Counter()
    for view, is_rej in ((out, False), (rejects_output(out), True)):
        for name in view.shard_names():
            with view.fs.open(view._path(view.shard_url(name)), "rb") as f:
                pf = pq.ParquetFile(f)
                have = pf.schema_arrow.names
                t = pf.read(columns=[c for c in (id_col, *_WRITTEN_COLS, *extra_cols) if c in have])
            first = _first_per_id(t, id_col)
            tot["prompt_tokens"] += _sum(first, "prompt_tokens")
            tot["completion_tokens"] += _sum(first, "completion_tokens")
            if "attempts" in first.column_names and "error" in first.column_names:
                ledger.update(ledger_from_table(first))
            if is_rej:
                tot["rejected"] += t.num_rows
                codes = [r or "invalid" for r in _col(t, "reject_reason", "invalid")]
                reasons.update(codes)
                examples.update(e for c, e in zip(codes, _col(t, "error", "")) if c == "generation_error" and e)
            else:
                tot["rows"] += t.num_rows
                tot["requests"] += first.num_rows
                tot["valid_rows"] += sum(bool(v) for v in _col(t, "valid", True))
            if extra is not None:
                extra(t, is_rej)
    out_tot = {k: tot[k] for k in ("rows", "requests", "valid_rows", "rejected", "prompt_tokens", "completion_tokens")}
    out_tot.update(answered=tot["requests"] + tot["rejected"], reject_reasons=dict(reasons), ledger=dict(ledger))
    if examples:
        out_tot["error_examples"] = dict(examples.most_common(3))
    return out_tot


def _first_per_id(t: pa.Table, id_col: str) -> pa.Table:
    """The first row of each id in one shard (a request's rows are written in one shard)."""
    if id_col not in t.column_names or t.num_rows == 0:
        return t
    seen, keep = set(), []
    for i, rid in enumerate(t.column(id_col).to_pylist()):
        if rid not in seen:
            seen.add(rid)
            keep.append(i)
    return t if len(keep) == t.num_rows else t.take(pa.array(keep, pa.int64()))


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


# ---- rows without an answer -----------------------------------------------------------------------------------
class TooManyFailures(RuntimeError):
    """More requests than allowed got no answer (retries exhausted, an HTTP error): what was answered is written,
    and a rerun sends exactly the missing ones."""


def check_answered(stage: str, run: dict, *, total: int | None = None, max_failed_fraction: float = 0.0,
                   written: int | None = None, setting: str = "", where: str = "") -> None:
    """Raise TooManyFailures when this run's unanswered requests (`collect`'s failed, less those a budget cap never
    sent) exceed max_failed_fraction of `total` (default: sent); the message names the errors by kind."""
    errors = run.get("errors", {})
    failed = run.get("failed", 0) - errors.get("budget_exhausted", 0)   # never sent: not a failure
    total = run.get("sent", 0) if total is None else total
    if failed <= 0 or failed <= max_failed_fraction * max(1, total):
        return
    written = run.get("answered", 0) if written is None else written
    raise TooManyFailures(
        f"{stage}: {failed} of {total} requests got no answer after retries ({dict(errors)}); {written} are "
        f"written{f' at {where}' if where else ''} and kept. Rerun to retry the missing ones"
        + (f", or raise {setting}" if setting else "") + ".")


# ---- the floor on valid output ------------------------------------------------------------------------------
class LowValidShare(RuntimeError):
    """A stage wrote mostly rejects: below its min_valid_share floor, or nothing valid at all. What it wrote stays
    (the stage is not marked done), so a rerun after fixing the cause, or with a lower floor, only re-checks it.
    `metrics` are the totals the stage would have put in its manifest."""

    def __init__(self, message: str, metrics: dict | None = None):
        super().__init__(message)
        self.metrics = metrics or {}


def reason_code(reason: str) -> str:
    """The code of a recorded reject reason: "invalid_json: Expecting value ..." -> "invalid_json" (parse codes
    such as "missing_key:query" have no space after their colon and stay whole)."""
    return (reason or "invalid").split(": ", 1)[0].strip() or "invalid"


def top_reasons(reasons: dict[str, int], examples: dict[str, int] | None = None, n: int = 5) -> str:
    """'schema_error 812, length 150, generation_error 35 (e.g. "engine died")': counts by code, commonest first."""
    by_code: Counter = Counter()
    for r, c in reasons.items():
        by_code[reason_code(r)] += int(c)
    ranked = sorted(by_code.items(), key=lambda kv: (-kv[1], kv[0]))
    parts = []
    for code, c in ranked[:n]:
        hint = ""
        if code == "generation_error" and examples:
            msg = max(examples.items(), key=lambda kv: kv[1])[0]
            hint = f" (e.g. {' '.join(str(msg).split())[:160]!r})"
        parts.append(f"{code} {c}{hint}")
    rest = ranked[n:]
    if rest:
        parts.append(f"{len(rest)} more reason(s) {sum(c for _, c in rest)}")
    return ", ".join(parts) if parts else "none recorded"


def check_valid_share(stage: str, good: int, total: int, floor: float, reasons: dict[str, int], *,
                      unit: str = "rows", verb: str = "valid", setting: str = "", where: str = "",
                      examples: dict[str, int] | None = None, planned: int | None = None,
                      metrics: dict | None = None) -> dict[str, float]:
    """Fail a stage whose output is mostly rejects; returns {"valid_share", "min_valid_share"} for its manifest.

    good of total units passed (rows valid, outputs parsed, revisions parsed, requests answered validly). Raises
    LowValidShare when good/total < floor (floor 0 disables this), and whatever the floor when nothing passed out
    of a nonzero total (or of a nonzero `planned` when nothing was measured): a stage with nothing valid is never
    a success. The message names the stage, the share, the floor and the top reject reasons by code."""
    share = good / total if total else 0.0
    out = {"valid_share": share, "min_valid_share": floor}
    nothing = good == 0 and (total > 0 or bool(planned))
    if not nothing and (total == 0 or floor <= 0 or share >= floor):
        return out
    if total:
        head = f"{stage}: {good} of {total} {unit} {verb} ({100 * share:.1f}%, floor {100 * floor:g}%)"
    else:
        head = f"{stage}: nothing {verb}: 0 of {planned} planned {unit} have an answer"
    msg = f"{head}; top reject reasons: {top_reasons(reasons, examples)}"
    if nothing and floor <= 0:
        msg += ". Nothing valid fails a stage whatever its floor"
    msg += (f". Its shards are kept{f' at {where}' if where else ''}: fix the cause and rerun to resume"
            + (f", or lower {setting} (0 disables the floor)" if setting and not nothing else "") + ".")
    raise LowValidShare(msg, {**(metrics or {}), **out})
