"""A running stage's progress in the user's units, from what it has written to the store so far (pure core).

`expectation` says what a stage counts and how many it will make (requests, samples, prompts, training steps)
from the run's config and its inputs' row counts; `shard_stats` reads one Parquet shard into counts (rows, valid,
reject reasons, teacher tokens); `progress_record` turns a snapshot of those into one `Progress`, and
`format_line` into the line the terminal and `runs/<name>/progress.log` show. No threads, no clocks: the
driver-side poller (speed_ray/monitor.py) and `speed-ray status --watch` share these functions.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

# What a stage counts (its unit) and how its progress is read (counted_by) are facts of its StageSpec
# (speed_ray/pipeline.py), recorded in the run's plan.json: "rows" = its data and rejects shards (teacher stages
# count requests, generation stages samples or prompts), "step_log" = artifacts/progress/steps.jsonl (training),
# "markers" = artifacts/steps/<step>.json (dedup's steps).
VALIDATED_UNITS = ("requests", "samples", "prompts")   # what a parser accepts or rejects
DEDUP_STEPS = ("signatures", "buckets", "clusters", "removed")    # speed_ray/dedup/stage.py's step markers
STEPS_LOG = "progress/steps.jsonl"                                   # under a training stage's artifacts/


@dataclass(frozen=True)
class Expectation:
    unit: str
    total: int | None           # None: not known before the stage runs (training: its log says)
    counted_by: str = "rows"    # rows | step_log | markers


def _get(cfg: dict, dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def expectation(stage: str, cfg: dict, input_rows: dict[str, int], unit: str = "rows",
                counted_by: str = "rows") -> Expectation:
    """How many `unit`s `stage` will make, from the run's config (as a dict) and its inputs' row counts by role
    (unit and counted_by: the stage's StageSpec facts)."""
    first = next(iter(input_rows.values()), None)
    total: int | None
    if stage == "topics":
        total = _get(cfg, "topics.n_topics")
    elif stage == "brainstorm":
        types = _get(cfg, "brainstorm.task_types") or []
        total = input_rows.get("topics", 0) * len(types) if types else None
    elif stage == "seed_data":
        total = _get(cfg, "seed_data.n_samples")
    elif stage in ("synthesis", "teacher_synthesis"):
        total = _get(cfg, "synthesis.n_samples")
    elif stage == "root_data":
        total = _get(cfg, "root_data.n_prompts")
    elif stage == "judge":
        n = _get(cfg, "judge.n_lists")
        total = min(n, first) if n is not None and first is not None else (n if first is None else first)
    elif stage == "revise_signals":
        n = _get(cfg, "revise_signals.n_samples")
        total = n if n is not None else first
    elif stage in ("revision", "screen"):
        total = first
    elif counted_by == "markers":
        total = len(DEDUP_STEPS)
    else:
        total = None
    return Expectation(unit, int(total) if total is not None else None, counted_by)


@dataclass(frozen=True)
class ShardStats:
    """One shard's counts. `units` is what progress counts: rows, or distinct requests where rows carry a
    request_id (a brainstorm request writes several rows); tokens are counted once per request."""

    units: int
    valid: int
    reasons: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0


STAT_COLUMNS = ("request_id", "valid", "reject_reason", "prompt_tokens", "completion_tokens")


def shard_stats(table: pa.Table, rejects: bool = False) -> ShardStats:
    """Counts of one shard (only STAT_COLUMNS are read). Rejects shards are all invalid."""
    cols = {c: table.column(c).to_pylist() for c in STAT_COLUMNS if c in table.column_names}
    n = table.num_rows
    keep = range(n)
    if "request_id" in cols:
        seen: set = set()
        keep = [i for i, r in enumerate(cols["request_id"]) if not (r in seen or seen.add(r))]
    valid_col = cols.get("valid")
    is_valid = [(not rejects) and (valid_col is None or bool(valid_col[i])) for i in keep]
    reasons = Counter((cols.get("reject_reason") or [None] * n)[i] or "invalid"
                      for i, ok in zip(keep, is_valid) if not ok)

    def total(c: str) -> int:
        vals = cols.get(c)
        return int(sum(int(vals[i] or 0) for i in keep)) if vals is not None else 0

    return ShardStats(len(keep), sum(is_valid), dict(reasons), total("prompt_tokens"), total("completion_tokens"))


@dataclass(frozen=True)
class Progress:
    stage: str
    unit: str
    done: int
    total: int | None
    elapsed_s: float
    valid: int | None = None            # of the answered/written units (None: the stage has no validity)
    answered: int = 0
    reasons: tuple[tuple[str, int], ...] = ()   # top reject reasons, most frequent first
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd: float | None = None
    rate: float | None = None           # units per second, this run's share
    eta_s: float | None = None
    loss: float | None = None
    state: str = "running"

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["reasons"] = dict(self.reasons)
        d["tokens"] = self.tokens
        return d


def read_steps(text: str) -> list[dict]:
    """A training stage's steps.jsonl (one JSON object a line; a torn last line is ignored)."""
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def progress_record(stage: str, exp: Expectation, elapsed_s: float, data: list[ShardStats] = (),
                    rejects: list[ShardStats] = (), steps: list[dict] = (), markers: int = 0, done_at_start: int = 0,
                    usd_per_mtok: tuple[float, float] | None = None, top: int = 3) -> Progress:
    """The progress of `stage` from a snapshot of what it wrote: its data and rejects shards' stats, its training
    log, its step markers. done_at_start: units already written when this run of the stage began (a resume), so
    the rate and ETA are this run's."""
    total = exp.total
    valid = answered = 0
    reasons: Counter = Counter()
    pt = ct = 0
    loss = None
    if exp.counted_by == "step_log" or steps:
        done = int(steps[-1].get("step", len(steps))) if steps else 0
        total = next((int(s[k]) for s in reversed(steps) for k in ("total_steps", "max_steps")
                      if isinstance(s.get(k), (int, float)) and s[k] > 0), total)
        loss = next((float(s["loss"]) for s in reversed(steps) if isinstance(s.get("loss"), (int, float))), None)
        has_valid = False
    elif exp.counted_by == "markers":
        done, has_valid = markers, False
    else:
        for s in (*data, *rejects):
            answered += s.units
            valid += s.valid
            reasons.update(s.reasons)
            pt += s.prompt_tokens
            ct += s.completion_tokens
        done = answered
        has_valid = exp.unit in VALIDATED_UNITS or bool(rejects) or any(s.valid != s.units for s in data)
    rate = (done - done_at_start) / elapsed_s if elapsed_s > 0 and done > done_at_start else None
    eta = (total - done) / rate if rate and total is not None and total >= done else None
    usd = (pt * usd_per_mtok[0] + ct * usd_per_mtok[1]) / 1e6 if usd_per_mtok else None
    return Progress(stage, exp.unit, done, total, elapsed_s, valid if has_valid else None, answered,
                    tuple(reasons.most_common(top)), pt, ct, usd, rate, eta, loss)


def _dur(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def _num(n: float) -> str:
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suf}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.2f}"


def details(p: Progress) -> str:
    """Everything after the count: valid share, top reject reasons, tokens and cost, loss, rate, ETA."""
    parts = []
    if p.valid is not None and p.answered:
        parts.append(f"valid {100 * p.valid / p.answered:.1f}%")
        if p.reasons:
            parts.append("rejects " + ", ".join(f"{r} {n}" for r, n in p.reasons))
    if p.tokens:
        parts.append(f"tokens {_num(p.tokens)}")
    if p.usd is not None:
        parts.append(f"${p.usd:,.2f}" if p.usd >= 1 or p.usd == 0 else f"${p.usd:.4f}")
    if p.loss is not None:
        parts.append(f"loss {p.loss:.4f}")
    if p.rate is not None:
        parts.append(f"{_num(p.rate)} {p.unit}/s")
    if p.state == "running":
        parts.append(f"elapsed {_dur(p.elapsed_s)}")
        if p.eta_s is not None:
            parts.append(f"ETA {_dur(p.eta_s)}")
    else:
        parts.append(f"took {_dur(p.elapsed_s)}")
    return "  ".join(parts)


def format_line(p: Progress) -> str:
    """`synthesis  1,200/5,000 samples (24%)  valid 95.0%  rejects no_json 40  ...`: one line, no newline."""
    if p.total:
        count = f"{p.done:,}/{p.total:,} {p.unit} ({100 * p.done / p.total:.0f}%)"
    else:
        count = f"{p.done:,} {p.unit}"
    tail = details(p)
    state = "" if p.state == "running" else f" [{p.state}]"
    return f"{p.stage}{state}  {count}" + (f"  {tail}" if tail else "")
