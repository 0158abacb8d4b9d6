"""The one shard sink of LLM stages: answered rows -> valid rows in data/, rejects in artifacts/rejects/.

A Ray Data map_batches fn, run by the workers, writes each batch as at most two shards, named by the hash of the
ids it writes: the rejects shard first, then the data shard, each atomically, so a retried batch overwrites both
and an id is never in data/ and rejects/ at once. Rows the endpoint never answered (`rows.no_answer`) are written
nowhere: the resume check (`done`) counts ids in data/ and rejects/, so a rerun sends exactly those again.
The driver only sees one summary row per shard (`SUMMARY`), summed by `collect`.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from speed_ray.llm.metrics import collect, ledger_from_table
from speed_ray.llm.rows import RESULT_COLUMNS, no_answer
from speed_ray.llm.shards import column_or, column_sum, rejects_output
from speed_ray.store import StageOutput
from speed_ray.streaming import shard_name_for

# finish(row) -> (valid rows, reject rows) for one answered row (a dict); several valid rows per request are fine.
Finish = Callable[[dict], "tuple[list[dict], list[dict]]"]

# Result columns kept on every written row (all but the text, which each stage places itself), so the cost of the
# calls can be rebuilt from the shards.
RESULT_META = tuple(c for c in RESULT_COLUMNS if c != "text")

SUMMARY = pa.schema([("shard", pa.string()), ("sent", pa.int64()), ("answered", pa.int64()),
                     ("valid", pa.int64()), ("valid_rows", pa.int64()), ("rejected", pa.int64()),
                     ("failed", pa.int64()), ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
                     ("reasons", pa.string()), ("errors", pa.string()), ("failed_ledger", pa.string())])


def result_meta(row: dict) -> dict:
    return {k: row.get(k) for k in RESULT_META}


def reject_row(row: dict, reason: str, **extra) -> dict:
    """The reject record of one answered row: its ids, prompt, raw answer, why it was rejected, the call's result."""
    base = {k: row.get(k) for k in ("request_id", "id", "task_type", "lineage") if k in row}
    return {**base, "messages": row.get("messages", ""), "text": row.get("text") or "", "valid": False,
            "reject_reason": reason, **extra, **result_meta(row)}


def error_reason(error: str) -> str:
    """The reject code of a row answered with an error: a refusal, a malformed request row, or an engine failure."""
    if error.startswith("refusal"):
        return "refusal"
    if error.startswith("bad_request"):
        return "bad_request"
    return "generation_error"


class SplitSink:
    """map_batches fn: one batch of answered rows -> its rejects shard and data shard, and one summary row.

    With `finish`, each answered row is turned into valid and reject rows by it (a row answered with an error is
    rejected with `error_reason` without calling it); without, the rows are already final and their `valid`
    column splits them. rejects=False writes every row to data/ (stages whose rows carry their own failures)."""

    def __init__(self, out: StageOutput, id_col: str = "id", finish: Finish | None = None, rejects: bool = True,
                 prefix: str = "part"):
        self.out, self.id_col, self.finish, self.prefix = out, id_col, finish, prefix
        self.rej = rejects_output(out) if rejects else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        errs = column_or(batch, "error", "")
        failed_idx = [i for i, e in enumerate(errs) if no_answer(e)]
        answered = batch if not failed_idx else batch.filter(pa.array([not no_answer(e) for e in errs]))
        valid, rejects = self._split(answered)
        ids = valid.column(self.id_col).to_pylist() + rejects.column(self.id_col).to_pylist()
        name = shard_name_for(sorted(set(map(str, ids))), self.prefix) if ids else ""
        if rejects.num_rows and self.rej is not None:
            self.rej.write_shard(name, rejects)
        if valid.num_rows:
            self.out.write_shard(name, valid)
        failed = batch.take(failed_idx) if failed_idx else None
        written = pa.concat_tables([t.select([c for c in ("prompt_tokens", "completion_tokens") if c in
                                              t.column_names]) for t in (valid, rejects)], promote_options="default")
        good = column_or(valid, "valid", True)
        return pa.Table.from_pylist([{
            "shard": name, "sent": n, "answered": answered.num_rows,
            "valid": len(set(v for v, g in zip(valid.column(self.id_col).to_pylist(), good) if g)),
            "valid_rows": sum(bool(g) for g in good), "rejected": rejects.num_rows, "failed": len(failed_idx),
            "prompt_tokens": column_sum(written, "prompt_tokens"),
            "completion_tokens": column_sum(written, "completion_tokens"),
            "reasons": json.dumps(dict(Counter(column_or(rejects, "reject_reason", "invalid")))),
            "errors": json.dumps(dict(Counter(_error_kind(errs[i]) for i in failed_idx))),
            "failed_ledger": json.dumps(ledger_from_table(failed) if failed is not None else {}),
        }], schema=SUMMARY)

    def _split(self, batch: pa.Table) -> tuple[pa.Table, pa.Table]:
        if self.finish is None:
            mask = batch.column("valid") if "valid" in batch.column_names else pa.array([True] * batch.num_rows)
            if self.rej is None:
                return batch, batch.slice(0, 0)
            return batch.filter(mask), batch.filter(pc.invert(mask))
        valid: list[dict] = []
        rejects: list[dict] = []
        for row in batch.to_pylist():
            err = row.get("error") or ""
            if err:
                rejects.append(reject_row(row, error_reason(err)))
                continue
            v, r = self.finish(row)
            valid += v
            rejects += r
        if self.rej is None:
            valid, rejects = valid + rejects, []
        return _table(valid, self.id_col), _table(rejects, self.id_col)


def _table(rows: list[dict], id_col: str) -> pa.Table:
    """Rows of different shapes (a parse reject beside a refusal) -> one table with the union of their columns
    (pa.Table.from_pylist alone keeps the first row's keys and silently drops the others')."""
    if not rows:
        return pa.table({id_col: pa.array([], pa.string())})
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])


def _error_kind(err: str) -> str:
    return err.split(":", 1)[0].strip() or "error"


def write_split(ds, out: StageOutput, rows_per_shard: int, id_col: str = "id", finish: Finish | None = None,
                rejects: bool = True) -> dict[str, Any]:
    """Stream answered rows into the stage's shards from the workers (`SplitSink`); returns this call's totals
    (`collect`)."""
    summary = ds.map_batches(SplitSink(out, id_col, finish, rejects), batch_size=rows_per_shard,
                             batch_format="pyarrow", zero_copy_batch=True, num_cpus=0.1)
    return collect(summary.iter_rows())
