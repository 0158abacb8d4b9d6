"""The teacher stages: topics, brainstorm, D_seed, judge (D_DPO), revise signals (D_revise), direct synthesis.

SPEED (https://arxiv.org/abs/2410.18634) Sec. 3.2 and App. C. Each teacher stage plans its requests with
stable ids, drops the ids already written, sends the rest through `teacher_map`, and writes valid rows to its
data shards and rejects to artifacts/rejects/ (speed_ray/teacher/runner.py)."""

from __future__ import annotations

import json
import random
from collections import defaultdict

import pyarrow as pa

from speed_ray.synth import prompts, schemas
from speed_ray.synth.mixture import allocate, normalize_mixture
from speed_ray.synth.parsing import (ParseError, canonical_json, parse_judge, parse_revision, parse_sample,
                                       parse_task_list)
from speed_ray.llm.shards import rejects_output
from speed_ray.llm.sink import reject_row, result_meta
from speed_ray.teacher.runner import finalize, run_teacher, written_ids
from speed_ray.generate.plan import request_seed
from speed_ray.synth.samples import lineage_extend, stable_id


def _seed_int(*parts) -> int:
    return int(stable_id(*parts)[:12], 16)


def _generator(cfg) -> str:
    return f"teacher:{cfg.teacher.model}"


def _request(cfg, rid: str, messages: list[dict], schema_name: str, schema: dict | None,
             temperature: float | None = None) -> dict:
    s = cfg.teacher.sampling
    rf = schemas.response_format(cfg.teacher.json_mode, schema_name, schema)
    row = {"request_id": rid, "messages": json.dumps(messages, ensure_ascii=False),
           "temperature": float(s.temperature if temperature is None else temperature), "top_p": float(s.top_p),
           "max_tokens": int(s.max_tokens), "response_format": json.dumps(rf) if rf else ""}
    if cfg.teacher.seed_requests:
        # the seed is part of the response cache's key: without it every repeat of a prompt got the first answer
        # (at paper scale 39% of brainstorm's calls: 20K topics drawn from the taxonomy repeat)
        row["seed"] = request_seed(cfg.run.seed, rid)
    return row


def _from_rows(rows: list[dict]):
    import ray.data

    from speed_ray.raylocal import ensure_ray

    ensure_ray()
    return ray.data.from_arrow(pa.Table.from_pylist(rows)) if rows else None


# ---- topics -------------------------------------------------------------------------------------------------
def topics_stage(ctx) -> dict:
    """Sample multi-grained topics, balanced across top-level categories (no teacher)."""
    from speed_ray.teacher.taxonomy import load_taxonomy
    from speed_ray.teacher.topics import sample_topics

    t = ctx.cfg.topics
    nodes = load_taxonomy(t.source, t.path)
    rows = sample_topics(nodes, t.n_topics, ctx.cfg.run.seed, t.max_depth, t.truncate)
    ctx.out.write_shard("topics", rows)
    tops = {r["top_level"] for r in rows}
    return {"taxonomy": t.source, "taxonomy_nodes": len(nodes), "topics": len(rows), "top_levels": len(tops)}


# ---- brainstorm ---------------------------------------------------------------------------------------------
def _finish_brainstorm(tasks_per_topic: int, generator: str, min_words: int = 0):
    def finish(row: dict):
        try:
            tasks = parse_task_list(row["text"], min_words)
        except ParseError as e:
            return [], [reject_row(row, e.reason, topic=row["topic"])]
        out = []
        for i, task in enumerate(tasks[:tasks_per_topic]):
            tid = stable_id("task", row["request_id"], i)
            out.append({"id": tid, "request_id": row["request_id"], "topic": row["topic"],
                        "task_type": row["task_type"], "task": task,
                        "lineage": lineage_extend(row["lineage"], task_id=tid, task=task, task_type=row["task_type"],
                                                  task_generator=generator),
                        "valid": True, "reject_reason": "", **result_meta(row)})
        return out, []
    return finish


def brainstorm_stage(ctx) -> dict:
    """Per topic and task type the teacher brainstorms tasks (E5 prompts + "for the topic"); keep
    brainstorm.tasks_per_topic after normalizing and deduplicating. STS/bitext get E5's fixed task per topic."""
    cfg = ctx.cfg
    topics = ctx.inputs["topics"].read_rows(columns=["id", "topic", "lineage"])
    done = written_ids(ctx.out)
    gen = _generator(cfg)
    n_ask = max(5, cfg.brainstorm.tasks_per_topic)   # E5 asks for "about 5"; dupes and junk are dropped after
    schema = schemas.BRAINSTORM_SCHEMA if cfg.teacher.json_mode == "json_schema" else None
    fixed, reqs = [], []
    pairs = [(tp, tt) for tp in topics for tt in cfg.brainstorm.task_types]
    rids = [stable_id("brainstorm", tp["id"], tt) for tp, tt in pairs]
    for (tp, tt), rid, is_done in zip(pairs, rids, done.contains(rids).tolist()):
        if is_done:
            continue
        if not prompts.needs_brainstorm(tt):
            tid = stable_id("task", rid, 0)
            task = prompts.FIXED_TASKS[tt]
            fixed.append({"id": tid, "request_id": rid, "topic": tp["topic"], "task_type": tt, "task": task,
                          "lineage": lineage_extend(tp["lineage"], task_id=tid, task=task, task_type=tt,
                                                    task_generator="fixed:e5"),
                          "valid": True, "reject_reason": "", "prompt_tokens": 0, "completion_tokens": 0,
                          "cached": False, "error": "", "attempts": 0, "finish_reason": ""})
            continue
        msgs = prompts.brainstorm_messages(tt, tp["topic"], n_ask, random.Random(_seed_int(rid)))
        reqs.append({**_request(cfg, rid, msgs, "brainstorm", schema), "topic": tp["topic"], "task_type": tt,
                     "lineage": tp["lineage"]})
    if fixed:
        from speed_ray.streaming import shard_name_for

        ctx.out.write_shard(shard_name_for([r["request_id"] for r in fixed], "fixed"), fixed)
    total = len(topics) * len(cfg.brainstorm.task_types)
    finish = _finish_brainstorm(cfg.brainstorm.tasks_per_topic, gen, cfg.brainstorm.min_task_words)
    ds = _from_rows(reqs)
    if ds is None:
        return finalize(ctx, {}, total)
    return run_teacher(ctx, ds, finish, total)


# ---- D_seed and direct teacher synthesis --------------------------------------------------------------------
def plan_samples(tasks: list[dict], n: int, weights: dict[str, float], seed: int, prefix: str) -> list[dict]:
    """n (id, task index) assignments: task types by the mixture (largest remainder), and within a type the
    tasks in a seeded order, cycled, so every task is used about equally often."""
    by_type: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(tasks):
        by_type[t["task_type"]].append(i)
    props = normalize_mixture(weights)
    missing = [t for t in props if not by_type.get(t)]
    if missing:
        raise ValueError(f"the mixture asks for task type(s) {missing} but the brainstorm stage produced no such "
                         f"tasks; add them to brainstorm.task_types or drop them from mixture.weights")
    plan = []
    for tt, count in sorted(allocate(n, props).items()):
        order = sorted(by_type[tt], key=lambda i: tasks[i]["id"])
        random.Random(_seed_int(seed, prefix, tt)).shuffle(order)
        for k in range(count):
            plan.append({"id": stable_id(prefix, seed, tt, k), "task_index": order[k % len(order)]})
    return plan


def _sample_requests(cfg, tasks: list[dict]):
    gen = _generator(cfg)
    schema_on = cfg.teacher.json_mode != "none"   # json_object mode too: response_format() maps the schema to it

    def build(batch: pa.Table) -> pa.Table:
        rows = []
        for r in batch.to_pylist():
            t = tasks[r["task_index"]]
            tt = t["task_type"]
            msgs, params = prompts.synthesis_messages(tt, t["task"], random.Random(_seed_int(r["id"])), t["topic"])
            schema = schemas.sample_schema(tt) if schema_on else None
            rows.append({**_request(cfg, r["id"], msgs, f"{tt}_sample", schema), "id": r["id"], "task_type": tt,
                         "task": t["task"], "prompt_params": json.dumps(params, ensure_ascii=False),
                         "lineage": lineage_extend(t["lineage"], prompt_params=params, generator=gen)})
        return pa.Table.from_pylist(rows)
    return build


def _finish_sample(generator: str, min_chars: int, max_chars: int):
    def finish(row: dict):
        p = parse_sample(row["text"], row["task_type"], min_chars, max_chars)
        out = {"id": row["id"], "request_id": row["request_id"], "task_type": row["task_type"], "task": row["task"],
               "prompt": row["messages"], "prompt_params": row["prompt_params"], "text": row["text"],
               "sample": canonical_json(p.sample) if p.ok else "", "query": p.query, "positive": p.positive,
               "negative": p.negative, "valid": p.ok, "reject_reason": p.reason, "generator": generator,
               "lineage": row["lineage"], **result_meta(row)}
        return ([out], []) if p.ok else ([], [{**out, "messages": row["messages"]}])
    return finish


def _synthesize(ctx, n: int, prefix: str) -> dict:
    import ray.data

    from speed_ray.raylocal import ensure_ray

    cfg = ctx.cfg
    tasks = ctx.inputs["tasks"].read_rows(columns=["id", "topic", "task_type", "task", "lineage"])
    plan = plan_samples(tasks, n, cfg.mixture.weights, cfg.run.seed, prefix)
    table = pa.Table.from_pylist(plan)
    table = table.filter(pa.array(~written_ids(ctx.out).contains(table.column("id"))))
    if table.num_rows == 0:
        return finalize(ctx, {}, n)
    ensure_ray()
    ds = ray.data.from_arrow(table).map_batches(
        _sample_requests(cfg, tasks), batch_format="pyarrow",
        batch_size=cfg.teacher.shard_rows, num_cpus=0.1)
    return run_teacher(ctx, ds, _finish_sample(_generator(cfg), 1, 20000), n)


def seed_data_stage(ctx) -> dict:
    """D_seed: the teacher writes seed_data.n_samples samples by the task mixture (SPEED Sec. 3.2.2)."""
    return _synthesize(ctx, ctx.cfg.seed_data.n_samples, "seed")


def teacher_synthesis_stage(ctx) -> dict:
    """The direct-synthesis baseline: the teacher itself writes synthesis.n_samples samples (paper Table 1)."""
    return _synthesize(ctx, ctx.cfg.synthesis.n_samples, "teacher_syn")


# ---- judge: D_DPO -------------------------------------------------------------------------------------------
def _root_ids(ctx) -> list[str]:
    return sorted(ctx.inputs["root"].read_table(columns=["id"]).column("id").to_pylist())


def _root_requests(ctx, build, wanted: set[str]):
    """Map root rows (read by the workers) to request rows; only lists in `wanted` are kept."""
    import pyarrow.compute as pc

    from speed_ray.raylocal import ensure_ray

    ensure_ray()
    ref = pa.array(sorted(wanted), pa.string())

    def fn(batch: pa.Table) -> pa.Table:
        batch = batch.filter(pc.is_in(batch.column("id"), value_set=ref))
        rows = [r for row in batch.to_pylist() for r in build(row)]
        return pa.Table.from_pylist(rows) if rows else pa.table({"request_id": pa.array([], pa.string())})

    return ctx.inputs["root"].ray_dataset(num_cpus=0.1).map_batches(fn, batch_format="pyarrow", num_cpus=0.1)


def _finish_judge(row: dict):
    outputs, samples = json.loads(row["outputs_json"]), json.loads(row["samples_json"])
    try:
        best, worst, reason = parse_judge(row["text"], len(outputs))
        if not samples[best]:
            raise ParseError("best_invalid")   # chosen must be a valid sample; rejected may be anything
        if " ".join(outputs[best].split()) == " ".join(outputs[worst].split()):
            raise ParseError("chosen_equals_rejected")
    except ParseError as e:
        return [], [reject_row(row, e.reason)]
    return [{"id": row["id"], "request_id": row["request_id"], "task_type": row["task_type"],
             "prompt": row["data_prompt"], "chosen": outputs[best], "rejected": outputs[worst], "best": best,
             "worst": worst, "n_outputs": len(outputs), "reason": reason, "judge_text": row["text"],
             "lineage": lineage_extend(row["lineage"], judge=_judge_lineage(best, worst)),
             "valid": True, "reject_reason": "", **result_meta(row)}], []


def _judge_lineage(best: int, worst: int) -> dict:
    return {"best": best, "worst": worst}


def judge_stage(ctx) -> dict:
    """D_DPO: the teacher picks the best and worst of each root list (App. C.2, temperature 0).

    Lists with fewer than 2 outputs, or with no valid sample, are rejected without a call (no chosen possible);
    all outputs of a list, valid or not, are shown to the judge as in the paper, and the chosen one must be a
    valid sample ("best_invalid" otherwise), while the rejected one may be invalid: that teaches the format."""
    cfg = ctx.cfg
    ids = _root_ids(ctx)
    ids = ids[: cfg.judge.n_lists] if cfg.judge.n_lists is not None else ids
    rids = {stable_id("judge", i): i for i in ids}
    done = written_ids(ctx.out)
    wanted = {i for (r, i), d in zip(rids.items(), done.contains(list(rids)).tolist()) if not d}
    def build(row: dict) -> list[dict]:
        rid = stable_id("judge", row["id"])
        outputs, samples = list(row["outputs"]), list(row["samples"])
        schema = schemas.judge_schema(len(outputs))
        base = {"id": rid, "request_id": rid, "task_type": row["task_type"], "data_prompt": row["prompt"],
                "outputs_json": json.dumps(outputs, ensure_ascii=False),
                "samples_json": json.dumps(samples, ensure_ascii=False),
                "lineage": lineage_extend(row["lineage"], root_id=row["id"])}
        msgs = prompts.judge_messages(row["prompt"], outputs)
        req = {**_request(cfg, rid, msgs, "judgement", schema, cfg.teacher.judge_temperature), **base}
        if len(outputs) < 2 or not any(samples):
            # never sent: written as a reject by _run_with_skips
            req["skip_reason"] = "too_few_outputs" if len(outputs) < 2 else "no_valid_output"
        else:
            req["skip_reason"] = ""
        return [req]

    return _run_root(ctx, build, wanted, _finish_judge, len(ids))


def _run_root(ctx, build, wanted: set[str], finish, total: int) -> dict:
    """Root-based stages: rows flagged with skip_reason become rejects without a teacher call."""
    if not wanted:
        return finalize(ctx, {}, total)
    return _run_with_skips(ctx, _root_requests(ctx, build, wanted), finish, total)


def _run_with_skips(ctx, ds, finish, total: int) -> dict:
    import pyarrow.compute as pc

    rej = rejects_output(ctx.out)

    def write_skips(batch: pa.Table) -> pa.Table:
        # requests that need no call are written as rejects right here, before the teacher stage
        if batch.num_rows == 0 or "skip_reason" not in batch.column_names:
            return batch
        mask = pc.not_equal(batch.column("skip_reason"), "")
        skipped = batch.filter(mask).to_pylist()
        if skipped:
            from speed_ray.streaming import shard_name_for

            rows = [reject_row({**r, "text": "", "prompt_tokens": 0, "completion_tokens": 0, "cached": False,
                                "error": "", "attempts": 0, "finish_reason": ""}, r["skip_reason"]) for r in skipped]
            rej.write_shard(shard_name_for([r["request_id"] for r in rows], "skip"), pa.Table.from_pylist(rows))
        return batch.filter(pc.invert(mask))

    ds = ds.map_batches(write_skips, batch_format="pyarrow", num_cpus=0.1)
    return run_teacher(ctx, ds, finish, total)


# ---- revise signals: D_revise -------------------------------------------------------------------------------
def pick_revise_targets(lists: dict[str, int], n: int | None, seed: int) -> dict[str, list[int]]:
    """Which outputs to revise: one random output per list first (lists in a seeded order), then second ones,
    and so on, until n (None: one per list)."""
    order = sorted(lists)
    random.Random(_seed_int(seed, "revise")).shuffle(order)
    perms = {}
    for lid in order:
        idx = list(range(lists[lid]))
        random.Random(_seed_int(seed, "revise", lid)).shuffle(idx)
        perms[lid] = idx
    n = len(order) if n is None else n
    picked: dict[str, list[int]] = defaultdict(list)
    depth, left = 0, n
    while left > 0 and any(depth < len(p) for p in perms.values()):
        for lid in order:
            if left and depth < len(perms[lid]):
                picked[lid].append(perms[lid][depth])
                left -= 1
        depth += 1
    return dict(picked)


def _finish_revise(row: dict):
    p = parse_revision(row["text"], row["task_type"])
    if not p.ok:
        return [], [reject_row(row, p.reason)]
    revised = canonical_json(p.sample)
    return [{"id": row["id"], "request_id": row["request_id"], "task_type": row["task_type"],
             "prompt": row["data_prompt"], "root_text": row["root_text"], "revised_text": revised,
             "reason": p.explanation, "root_valid": bool(row["root_sample"]),
             "changed": revised != row["root_sample"], "revise_text": row["text"],
             "lineage": row["lineage"], "valid": True, "reject_reason": "", **result_meta(row)}], []


def revise_signals_stage(ctx) -> dict:
    """D_revise: the teacher evaluates root samples (relevance, completeness, accuracy) and revises them
    (App. C.2). revised_text is the canonical JSON of the revised sample: the revisor's SFT target."""
    cfg = ctx.cfg
    root = ctx.inputs["root"].read_table(columns=["id", "outputs"])
    import pyarrow.compute as pc

    lens = dict(zip(root.column("id").to_pylist(), pc.list_value_length(root.column("outputs")).to_pylist()))
    targets = pick_revise_targets({k: v or 0 for k, v in lens.items()}, cfg.revise_signals.n_samples, cfg.run.seed)
    total = sum(len(v) for v in targets.values())
    done = written_ids(ctx.out)
    pairs = [(lid, j) for lid, js in targets.items() for j in js]
    todo: dict[str, list[int]] = defaultdict(list)
    for (lid, j), d in zip(pairs, done.contains([stable_id("revise", lid, j) for lid, j in pairs]).tolist()):
        if not d:
            todo[lid].append(j)
    todo = {k: v for k, v in todo.items() if v}
    json_schema = cfg.teacher.json_mode == "json_schema"

    def build(row: dict) -> list[dict]:
        outs, samples = list(row["outputs"]), list(row["samples"])
        reqs = []
        for j in todo.get(row["id"], []):
            rid = stable_id("revise", row["id"], j)
            schema = schemas.revise_schema(row["task_type"]) if json_schema else schemas.REVISE_SCHEMA
            msgs = prompts.revise_messages(row["prompt"], outs[j])
            reqs.append({**_request(cfg, rid, msgs, "revision", schema), "id": rid, "task_type": row["task_type"],
                         "data_prompt": row["prompt"], "root_text": outs[j],
                         "root_sample": samples[j] if j < len(samples) else "",
                         "lineage": lineage_extend(row["lineage"], root_id=row["id"], root_index=j),
                         "skip_reason": ""})
        return reqs

    if not todo:
        return finalize(ctx, {}, total)
    return _run_with_skips(ctx, _root_requests(ctx, build, set(todo)), _finish_revise, total)
