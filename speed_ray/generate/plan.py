"""Pure core of the generation stages: which prompt index i gets (type, task, slots), and turning outputs into rows.

Everything is a deterministic function of (seed, stage, index), so a prompt is the same on every rerun and a
resumed stage regenerates exactly the prompts that are missing.
"""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np

from speed_ray.synth.mixture import allocate, normalize_mixture
from speed_ray.synth.prompts import FIXED_TASKS, needs_brainstorm, synthesis_messages
from speed_ray.synth.samples import lineage_extend, stable_id


def type_schedule(n: int, weights: dict[str, float], seed: int) -> tuple[list[str], np.ndarray]:
    """Exact mixture counts (largest remainder), shuffled: (type names, int8 type index per prompt)."""
    counts = allocate(n, normalize_mixture(weights))
    names = sorted(counts)
    sched = np.repeat(np.arange(len(names), dtype=np.int8), [counts[t] for t in names])
    np.random.default_rng(seed).shuffle(sched)
    return names, sched


def task_pools(task_rows: list[dict], types: list[str]) -> dict[str, list[dict]]:
    """Per task type, the brainstormed tasks to draw from; STS/bitext draw a topic from any task row."""
    pools: dict[str, list[dict]] = {}
    for t in types:
        if needs_brainstorm(t):
            pools[t] = [r for r in task_rows if r.get("task_type") == t]
        else:
            pools[t] = [{**r, "task": FIXED_TASKS[t]} for r in task_rows]
    empty = [t for t, p in pools.items() if not p]
    if empty:
        have = sorted({r.get("task_type") for r in task_rows})
        raise ValueError(f"the mixture asks for task type(s) {empty} but the brainstorm stage has no tasks for them "
                         f"(it has {have}); add them to brainstorm.task_types or drop them from mixture.weights")
    return pools


def plan_prompt(i: int, task_type: str, pool: list[dict], seed: int, stage: str) -> dict[str, Any]:
    """Prompt i of a stage: id, task_type, task, prompt (JSON messages), prompt_params (JSON), lineage."""
    pid = stable_id(stage, seed, int(i))
    rng = random.Random(pid)
    row = pool[rng.randrange(len(pool))]
    messages, params = synthesis_messages(task_type, row["task"], rng, topic=row.get("topic"))
    lineage = lineage_extend(row.get("lineage") or "{}", topic=row.get("topic"), task_id=row.get("id"),
                             task=row["task"], task_type=task_type, prompt_params=params)
    return {"id": pid, "task_type": task_type, "task": row["task"], "prompt": json.dumps(messages, ensure_ascii=False),
            "prompt_params": json.dumps(params, ensure_ascii=False), "lineage": lineage}


def request_seed(seed: int, row_id: str) -> int:
    """A per-request sampling seed (31 bits) derived from the run seed and the row id."""
    return int(stable_id(seed, row_id)[:7], 16)


def reject_reason(parse_reason: str, finish_reason: str, error: str) -> str:
    """One reject code per invalid output: generation errors first, then truncation, then the parser's code."""
    if finish_reason == "error":
        return "generation_error"
    if finish_reason == "length" and parse_reason in ("no_json", "invalid_json", "truncated"):
        return "truncated"
    return parse_reason or "invalid"


def root_lists(rows: list[dict], k: int) -> dict[str, Any]:
    """The k generations of one prompt (rows sharing `prompt_id`) -> a root_data row's outputs/samples lists, and
    per output its reject code ("" when it parsed)."""
    from speed_ray.synth.parsing import canonical_json, parse_sample

    rows = sorted(rows, key=lambda r: int(r["sample_index"]))
    outputs = [r.get("text") or "" for r in rows]
    samples, reasons = [], []
    for r, text in zip(rows, outputs):
        p = parse_sample(text, r["task_type"]) if r.get("finish_reason") != "error" else None
        ok = p is not None and p.ok
        samples.append(canonical_json(p.sample) if ok else "")
        reasons.append("" if ok else reject_reason(p.reason if p else "", r.get("finish_reason") or "",
                                                   r.get("error") or ""))
    return {"outputs": outputs, "samples": samples, "reasons": reasons, "n_valid": sum(bool(s) for s in samples),
            "k_ok": len(rows) == k}
