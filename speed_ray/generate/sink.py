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
from speed_ray.streaming import done_ids, shard_name_for


def rejects_output(out: StageOutput) -> StageOutput:
    """A StageOutput view whose shards live in the stage's artifacts/rejects/ (never read as stage data)."""
    rej = StageOutput(out.run_dir, out.stage, out.fingerprint)
    rej.data_url = rej.artifacts_url + "/rejects"
    return rej


def done_ids_all(out: StageOutput, rejects: StageOutput | None) -> set[str]:
    return done_ids(out) | (done_ids(rejects) if rejects is not None else set())


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
    """Totals over everything the stage holds (this run and resumed ones), read shard by shard, few columns."""
    rows = valid = comp = n_rej = 0
    reasons: Counter = Counter()
    sums: Counter = Counter()
    for stage_out, is_rej in ((out, False), (rejects, True)):
        if stage_out is None:
            continue
        for name in stage_out.shard_names():
            with stage_out.fs.open(stage_out._path(stage_out.shard_url(name)), "rb") as f:
                pf = pq.ParquetFile(f)
                cols = [c for c in ("valid", "reject_reason", "completion_tokens", *_SUMS) if c in pf.schema_arrow.names]
                t = pf.read(columns=cols)
            n = t.num_rows
            comp += sum(int(x) for x in _col(t, "completion_tokens", 0))
            v = _col(t, "valid", True)
            if is_rej:
                n_rej += n
                reasons.update(_col(t, "reject_reason", "invalid"))
            else:
                rows += n
                valid += sum(bool(x) for x in v)
                for c in _SUMS:
                    if c in t.column_names:
                        sums[c] += sum(int(x) for x in t.column(c).to_pylist())
    total = rows + n_rej
    return {"rows": rows, "rejected": n_rej, "generated_total": total, "parse_rate": (valid / total) if total else 0.0,
            "reject_reasons": dict(reasons), "completion_tokens_total": comp, **{f"{k}_total": v for k, v in sums.items()}}


_SUMS = ("n_valid", "revised", "revision_failed")   # per-stage counts summed into the manifest
