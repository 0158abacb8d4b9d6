"""The generation stages' totals: speed_ray.llm.metrics.written_summary plus what only these stages' rows hold
(revision's and root_data's per-row reject reasons, their per-stage counts)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa

from speed_ray.llm.metrics import written_summary
from speed_ray.store import StageOutput

_SUMS = ("n_valid", "revised", "revision_failed")   # per-stage counts summed into the manifest
# per-row reason columns of data shards -> the manifest key of their counts
_DATA_REASONS = {"revision_reject_reason": "revision_reject_reasons", "output_reject_reasons": "output_reject_reasons"}


def scan_totals(out: StageOutput) -> dict[str, Any]:
    """Totals over everything the stage holds (this run and resumed ones), read shard by shard, few columns.

    Reject reasons are counted by code: rejects' `reject_reason`, and in the data shards revision's
    `revision_reject_reason` (failed revisions) and root_data's `output_reject_reasons` (one per output).
    `gen_error_examples` holds the commonest engine messages behind the generation_error code."""
    sums: Counter = Counter()
    data_reasons: dict[str, Counter] = {c: Counter() for c in _DATA_REASONS}
    examples: Counter = Counter()

    def extra(t: pa.Table, is_rej: bool) -> None:
        if is_rej:
            return
        errs = t.column("error").to_pylist() if "error" in t.column_names else [""] * t.num_rows
        for c in _SUMS:
            if c in t.column_names:
                sums[c] += sum(int(x) for x in t.column(c).to_pylist())
        if "revision_reject_reason" in t.column_names:
            codes = t.column("revision_reject_reason").to_pylist()
            data_reasons["revision_reject_reason"].update(c for c in codes if c)
            examples.update(e for c, e in zip(codes, errs) if c == "generation_error" and e)
        if "output_reject_reasons" in t.column_names:
            for lst, e in zip(t.column("output_reject_reasons").to_pylist(), errs):
                codes = [r for r in (lst or []) if r]
                data_reasons["output_reject_reasons"].update(codes)
                if e and "generation_error" in codes:
                    examples[e] += codes.count("generation_error")

    w = written_summary(out, "id", (*_SUMS, *_DATA_REASONS), extra)
    examples.update(w.get("error_examples", {}))
    total = w["rows"] + w["rejected"]
    totals = {"rows": w["rows"], "rejected": w["rejected"], "generated_total": total,
              "parse_rate": (w["valid_rows"] / total) if total else 0.0, "reject_reasons": w["reject_reasons"],
              "completion_tokens_total": w["completion_tokens"], **{f"{k}_total": v for k, v in sums.items()}}
    for c, counts in data_reasons.items():
        if counts:
            totals[_DATA_REASONS[c]] = dict(counts)
    if examples:
        totals["gen_error_examples"] = dict(examples.most_common(3))
    return totals
