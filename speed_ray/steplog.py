"""A training loop's per-step log: `artifacts/progress/steps.jsonl` of the stage, one JSON object per logged step
(step, total_steps, loss, lr, ...), which the progress monitor and the HTML report's loss curves read.

Written by the main rank only, rewritten whole and atomically (tmp + rename, so it works on object stores too),
at most every `min_interval_s` seconds and always on `close`.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import fsspec

from speed_ray.progress import STEPS_LOG
from speed_ray.store import _atomic_write_bytes


def steps_url(artifacts_url: str) -> str:
    """Where a training stage's step log lives, given its artifacts/ URL."""
    return f"{artifacts_url.rstrip('/')}/{STEPS_LOG}"


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)


class StepLog:
    def __init__(self, url: str, min_interval_s: float = 2.0, keep_existing: bool = True):
        self.url = url
        self.fs, self.path = fsspec.core.url_to_fs(url)
        self.min_interval_s = min_interval_s
        self.lines: list[str] = []
        if keep_existing and self.fs.exists(self.path):     # a resumed run continues the log it had
            with self.fs.open(self.path, "r") as f:
                self.lines = [ln for ln in f.read().splitlines() if ln.strip()]
        self._last = 0.0

    def log(self, step: int, total_steps: int | None = None, **values: Any) -> None:
        rec = {"step": int(step), "total_steps": total_steps, "time": round(time.time(), 3),
               **{k: _clean(v) for k, v in values.items()}}
        self.lines.append(json.dumps(rec, sort_keys=True))
        if time.time() - self._last >= self.min_interval_s:
            self.flush()

    def flush(self) -> None:
        _atomic_write_bytes(self.fs, self.path, ("\n".join(self.lines) + "\n").encode())
        self._last = time.time()

    close = flush
