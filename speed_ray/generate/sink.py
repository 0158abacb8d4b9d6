"""Worker-side shard writing for generation stages: valid rows to data/, invalid rows to artifacts/rejects/.

Both shards of a batch are named by the hash of all the batch's ids and the rejects shard (possibly empty) is
written first, so a retried batch overwrites both and an id is never in data/ and rejects/ at once. Ids in
either place count as done on a rerun.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from speed_ray.store import StageOutput
from speed_ray.streaming import DoneSet, done_set, shard_name_for


def rejects_output(out: StageOutput) -> StageOutput:
    """A StageOutput view whose shards live in the stage's artifacts/rejects/ (never read as stage data)."""
    rej = StageOutput(out.run_dir, out.stage, out.fingerprint)
    rej.data_url = rej.artifacts_url + "/rejects"
    return rej


def done_ids_all(out: StageOutput, rejects: StageOutput | None) -> DoneSet:
    """Ids in data/ or rejects/, as hashes held off the driver (len() counts them; filter_pending takes it)."""
    return done_set(out, rejects)


class _SplitWriter:
    def __init__(self, out: StageOutput, rejects: StageOutput | None):
        self.out, self.rejects = out, rejects

    def __call__(self, batch: pa.Table) -> pa.Table:
        if batch.num_rows == 0:
            return pa.Table.from_pylist([], schema=_SUMMARY)
        name = shard_name_for(batch.column("id").to_pylist())
        valid = batch.column("valid") if "valid" in batch.column_names else pa.array([True] * batch.num_rows)
        good = batch.filter(valid) if self.rejects is not None else batch
        if self.rejects is not None:
            self.rejects.write_shard(name, batch.filter(pc.invert(valid)))
        if good.num_rows:
            self.out.write_shard(name, good)
        reasons = Counter(r for r, v in zip(_col(batch, "reject_reason", ""), valid.to_pylist()) if not v)
        return pa.Table.from_pylist([{
            "generated": batch.num_rows, "written": good.num_rows, "valid": sum(valid.to_pylist()),
            "prompt_tokens": sum(int(x) for x in _col(batch, "prompt_tokens", 0)),
            "completion_tokens": sum(int(x) for x in _col(batch, "completion_tokens", 0)),
            "reasons": json.dumps(dict(reasons)),
        }], schema=_SUMMARY)


_SUMMARY = pa.schema([("generated", pa.int64()), ("written", pa.int64()), ("valid", pa.int64()),
                      ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()), ("reasons", pa.string())])


def _col(batch: pa.Table, name: str, default: Any) -> list:
    return batch.column(name).to_pylist() if name in batch.column_names else [default] * batch.num_rows


def write_split(ds, out: StageOutput, rejects: StageOutput | None, rows_per_shard: int) -> dict[str, Any]:
    """Stream ds into shards from the workers; returns this call's totals (generated, valid, tokens, reasons)."""
    summary = ds.map_batches(_SplitWriter(out, rejects), batch_size=rows_per_shard, batch_format="pyarrow",
                             zero_copy_batch=True, num_cpus=0.1)
    tot: dict[str, Any] = {"generated": 0, "written": 0, "valid": 0, "prompt_tokens": 0, "completion_tokens": 0,
                           "shards_written": 0}
    reasons: Counter = Counter()
    for row in summary.iter_rows():  # one small row per shard
        for k in ("generated", "written", "valid", "prompt_tokens", "completion_tokens"):
            tot[k] += int(row[k])
        tot["shards_written"] += 1
        reasons.update(json.loads(row["reasons"]))
    tot["reject_reasons"] = dict(reasons)
    return tot


def scan_totals(out: StageOutput, rejects: StageOutput | None) -> dict[str, Any]:
    """Totals over everything the stage holds (this run and resumed ones), read shard by shard, few columns.

    Reject reasons are counted by code: rejects' `reject_reason`, and in the data shards revision's
    `revision_reject_reason` (failed revisions) and root_data's `output_reject_reasons` (one per output).
    `gen_error_examples` holds the commonest engine messages behind the generation_error code."""
    rows = valid = comp = n_rej = 0
    reasons: Counter = Counter()
    data_reasons: dict[str, Counter] = {c: Counter() for c in _DATA_REASONS}
    gen_errors: Counter = Counter()
    sums: Counter = Counter()
    for stage_out, is_rej in ((out, False), (rejects, True)):
        if stage_out is None:
            continue
        for name in stage_out.shard_names():
            with stage_out.fs.open(stage_out._path(stage_out.shard_url(name)), "rb") as f:
                pf = pq.ParquetFile(f)
                cols = [c for c in ("valid", "reject_reason", "completion_tokens", "gen_error", *_SUMS,
                                    *_DATA_REASONS) if c in pf.schema_arrow.names]
                t = pf.read(columns=cols)
            n = t.num_rows
            comp += sum(int(x) for x in _col(t, "completion_tokens", 0))
            v = _col(t, "valid", True)
            errs = _col(t, "gen_error", "")
            if is_rej:
                n_rej += n
                codes = [r or "invalid" for r in _col(t, "reject_reason", "invalid")]
                reasons.update(codes)
                gen_errors.update(e for c, e in zip(codes, errs) if c == "generation_error" and e)
            else:
                rows += n
                valid += sum(bool(x) for x in v)
                for c in _SUMS:
                    if c in t.column_names:
                        sums[c] += sum(int(x) for x in t.column(c).to_pylist())
                if "revision_reject_reason" in t.column_names:
                    codes = [r for r in t.column("revision_reject_reason").to_pylist() if r]
                    data_reasons["revision_reject_reason"].update(codes)
                    gen_errors.update(e for r, e in zip(t.column("revision_reject_reason").to_pylist(), errs)
                                      if r == "generation_error" and e)
                if "output_reject_reasons" in t.column_names:
                    for lst, e in zip(t.column("output_reject_reasons").to_pylist(), errs):
                        codes = [r for r in (lst or []) if r]
                        data_reasons["output_reject_reasons"].update(codes)
                        if e and "generation_error" in codes:
                            gen_errors[e] += codes.count("generation_error")
    total = rows + n_rej
    out_totals = {"rows": rows, "rejected": n_rej, "generated_total": total,
                  "parse_rate": (valid / total) if total else 0.0, "reject_reasons": dict(reasons),
                  "completion_tokens_total": comp, **{f"{k}_total": v for k, v in sums.items()}}
    for c, counts in data_reasons.items():
        if counts:
            out_totals[_DATA_REASONS[c]] = dict(counts)
    if gen_errors:
        out_totals["gen_error_examples"] = dict(gen_errors.most_common(3))
    return out_totals


_SUMS = ("n_valid", "revised", "revision_failed")   # per-stage counts summed into the manifest
# per-row reason columns of data shards -> the manifest key of their counts
_DATA_REASONS = {"revision_reject_reason": "revision_reject_reasons", "output_reject_reasons": "output_reject_reasons"}


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
