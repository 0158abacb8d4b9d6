"""Where an LLM stage's rows live: its data shards and the rejects view beside them, and the resume check over
both."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from speed_ray.store import StageOutput
from speed_ray.streaming import DoneSet, done_set


def rejects_output(out: StageOutput) -> StageOutput:
    """A view of `out` whose shards live in artifacts/rejects/ (same atomic writes, same resume logic); never read
    as stage data."""
    rej = StageOutput(out.run_dir, out.stage, out.fingerprint)
    rej.data_url = f"{out.artifacts_url}/rejects"
    return rej


def done(out: StageOutput, id_col: str = "id", rejects: bool = True) -> DoneSet:
    """The resume check: ids already in the stage's data shards or (rejects=True) its rejects, as 64-bit hashes
    held off the driver (`len()` counts them, `.contains(ids)` and streaming.filter_pending test them)."""
    return done_set(out, rejects_output(out) if rejects else None, id_col=id_col)


def column_or(t: pa.Table, name: str, default: Any) -> list:
    return t.column(name).to_pylist() if name in t.column_names else [default] * t.num_rows


def column_sum(t: pa.Table, name: str) -> int:
    return int(pc.sum(t.column(name)).as_py() or 0) if name in t.column_names and t.num_rows else 0
