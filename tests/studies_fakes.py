"""Light fake stage functions for the studies' orchestration tests: they write realistic shards and manifests
(pool rows, training-set sizes, evaluation scores that follow a planted log-linear law and planted category effects)
and log each call to <run_dir>/calls.log, so tests see what ran even when a stage ran in a Ray worker."""

from __future__ import annotations

import json
import math
import os

TASKS = {"STSBenchmark": "STS", "SICK-R": "STS", "SciFact": "Retrieval", "Banking77Classification": "Classification"}
BASE = {"STSBenchmark": 70.0, "SICK-R": 65.0, "SciFact": 40.0, "Banking77Classification": 60.0}
SLOPE = {"STSBenchmark": 2.0, "SICK-R": 1.5, "SciFact": 3.0, "Banking77Classification": 1.0}
# Planted influence: training on retrieval data lifts SciFact, on classification data lifts Banking77.
EFFECT = {("retrieval", "SciFact"): 6.0, ("classification", "Banking77Classification"): 4.0}
TYPES = ["retrieval", "classification", "matching_short", "matching_long", "sts"]


def calls(run_dir: str) -> list[str]:
    path = os.path.join(run_dir, "calls.log")
    return open(path).read().split() if os.path.exists(path) else []


def _noise(*key) -> float:
    # Deterministic across processes (str hash() is salted per process): a Ray worker must agree with the driver.
    h = sum(ord(c) * (i + 1) for i, c in enumerate(json.dumps(key))) % 1000
    return (h / 1000 - 0.5) * 0.4


def _scores(n: int | None, task_types) -> dict[str, float]:
    out = {}
    for t in TASKS:
        s = BASE[t]
        if n:
            s += SLOPE[t] * math.log(n) / 3
            for c in task_types or TYPES:
                s += EFFECT.get((c, t), 0.0)
        out[t] = round(s + _noise(n, sorted(task_types or []), t), 4)
    return out


def fake_stage(ctx) -> dict:
    with open(os.path.join(ctx.cfg.run.run_dir, "calls.log"), "a") as f:
        f.write(f"{ctx.name}\n")
    name, cfg = ctx.name, ctx.cfg
    extra: dict = {}
    if name in ("seed_data", "judge", "revise_signals", "brainstorm", "teacher_synthesis"):
        ctx.ledger.calls += 10
        ctx.ledger.prompt_tokens += 1000
        ctx.ledger.completion_tokens += 500
    if name in ("junior_sft", "senior_dpo", "revisor_sft", "train_embedder"):
        ctx.ledger.gpu_seconds += 360.0
        extra["model_path"] = ctx.out.artifact("model")
    if name in ("synthesis", "teacher_synthesis"):
        n = cfg.synthesis.n_samples
        ctx.ledger.gpu_seconds += 3.6 * n
        rows = [{"id": f"s{i}", "task_type": TYPES[i % len(TYPES)], "valid": True} for i in range(n)]
        ctx.out.write_shard("part-0", rows)
        extra["parse_rate"] = 0.95
    elif name in ("revision", "dedup", "screen"):
        src = ctx.inputs["samples"].read_rows()
        if name == "revision":
            ctx.ledger.gpu_seconds += 1.8 * len(src)
        ctx.out.write_shard("part-0", src)
    elif name == "train_embedder":
        rows = ctx.inputs["data"].read_rows()
        keep = [r for r in rows if not cfg.embedder.task_types or r["task_type"] in cfg.embedder.task_types]
        keep = keep[: cfg.embedder.n_samples] if cfg.embedder.n_samples else keep
        extra["metrics"] = {"loss": {"first": 2.0, "last": 1.0}, "data": {"rows_selected": len(keep)}}
    elif name in ("evaluate", "evaluate_base"):
        n = None if name == "evaluate_base" else ctx.inputs["model"].manifest["metrics"]["data"]["rows_selected"]
        scores = _scores(n, cfg.embedder.task_types if name == "evaluate" else ())
        results = {"primary": "m", "models": {"m": {"scores": scores, "types": TASKS}}}
        path = ctx.out.artifact("results.json")
        with open(path, "w") as f:
            json.dump(results, f)
        extra.update(scores=scores, averages={"average": sum(scores.values()) / len(scores), "n_tasks": len(scores)},
                     results_path=path)
    else:
        ctx.out.write_shard("part-0", [{"id": f"{name}-0"}])
    return extra


def fake_load(fn: str):
    return fake_stage
