"""The generator-side stages on Ray Data: root_data (k samples per prompt), synthesis (D_syn) and revision.

Rows stream prompt -> engine -> parse -> Parquet shards written by the workers (speed_ray.streaming); the driver
only sees one small summary row per shard. A rerun filters out ids already written (data shards and rejects),
so a stage killed mid-way completes with every prompt generated exactly once.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from speed_ray.generate.config import EngineConfig
from speed_ray.generate.plan import (plan_prompt, reject_reason, request_seed, root_lists, task_pools,
                                     type_schedule)
from speed_ray.generate.ray_engines import generate_dataset, replicas_resources
from speed_ray.generate.sink import scan_totals
from speed_ray.llm.metrics import check_answered, check_valid_share
from speed_ray.llm.rows import RESULT_COLUMNS, REQUEST_COLUMNS, no_answer
from speed_ray.llm.shards import done
from speed_ray.llm.sink import write_split

log = logging.getLogger("speed_ray")


# ---- shared helpers --------------------------------------------------------------------------------------
def _model_for(ctx, role: str, eng: EngineConfig) -> tuple[str, str | None, str]:
    """(model to load, LoRA adapter dir or None, generator name for lineage) from the upstream stage or config."""
    up = ctx.inputs.get(role)
    if eng.kind == "openai":   # the endpoint serves its own model, by the name it knows it by
        if up is not None:
            ctx.log("%s.engine.kind=openai: %s at %s answers; the upstream %s checkpoint is not loaded here",
                    ctx.name, eng.model, eng.base_url, up.stage)
        return eng.model, None, f"openai:{eng.model}"
    if up is not None:
        man = up.manifest
        path = man.get("model_path")
        if not path:
            raise ValueError(f"stage {ctx.name!r}: upstream {up.stage!r} manifest has no model_path "
                             f"(at {up.manifest_url})")
        if eng.model:
            ctx.log("engine.model=%s is ignored: the upstream %s checkpoint is used", eng.model, up.stage)
        adapter = man.get("adapter_path") if eng.use_adapter else None
        if adapter:
            # The adapter goes on its base, never on the merged checkpoint (that would apply the LoRA twice).
            path = _adapter_base(adapter) or man.get("base_model")
            if not path:
                raise ValueError(f"stage {ctx.name!r}: {ctx.name}.engine.use_adapter is set but the base model of "
                                 f"{adapter} is unknown (no readable adapter_config.json, no base_model in "
                                 f"{up.manifest_url}); set use_adapter: false to load the merged checkpoint")
        return path, adapter, f"{up.stage}@{up.fingerprint}"
    if not eng.model:
        raise ValueError(f"stage {ctx.name!r} has no upstream generator; set {ctx.name}.engine.model "
                         f"(e.g. an instruct model for the direct_instruct variant)")
    if eng.kind in ("stub", "custom"):   # the model string is the engine's own business
        return eng.model, None, eng.model
    from speed_ray.models.offline import resolve_model

    return resolve_model(eng.model), None, eng.model


def _adapter_base(adapter: str) -> str | None:
    import fsspec

    try:
        with fsspec.open(adapter.rstrip("/") + "/adapter_config.json", "r") as f:
            return json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


def _ray():
    import ray

    if not ray.is_initialized():
        from speed_ray.raylocal import ensure_ray

        ensure_ray()
    return ray


def _tasks(ctx) -> list[dict]:
    return ctx.inputs["tasks"].read_rows(columns=["id", "topic", "task_type", "task", "lineage"])


def _prompt_rows(n: int, weights: dict, seed: int, stage: str, task_rows: list[dict]):
    """ray.data.range(n) -> planned prompt rows; the schedule and task pools sit in the object store."""
    ray = _ray()
    names, sched = type_schedule(n, weights, seed)
    pools = task_pools(task_rows, names)
    sched_ref, pools_ref = ray.put(sched), ray.put(pools)

    def plan(batch: dict) -> pa.Table:
        sch, pls = ray.get(sched_ref), ray.get(pools_ref)
        rows = []
        for i in batch["id"]:
            t = names[int(sch[int(i)])]
            try:
                rows.append(plan_prompt(int(i), t, pls[t], seed, stage))
            except Exception as e:  # one unplannable prompt becomes a reject, not a failed stage
                rows.append({"id": f"{stage}-{seed}-{int(i)}", "task_type": t, "task": "", "prompt": "",
                             "prompt_params": json.dumps({"error": f"{type(e).__name__}: {e}"}), "lineage": "{}"})
        return pa.Table.from_pylist(rows)

    return ray.data.range(n).map_batches(plan, batch_format="numpy", batch_size=1024, num_cpus=0.1)


def _requests(ds, temperature: float, top_p: float, max_tokens: int, structured: bool, seed: int,
              messages_fn=None, messages_columns: tuple[str, ...] = ()):
    """Add the request columns (speed_ray.llm.rows: messages, sampling, the task type's sample schema as
    response_format, a seed per row) to prompt rows. messages_fn(row) builds a row's messages from the columns
    named in messages_columns (the only ones converted to Python); without it the prompt is the messages."""
    from speed_ray.synth.schemas import response_format, sample_schema

    formats: dict[str, str] = {}

    def fmt(task_type: str) -> str:
        if task_type not in formats:
            formats[task_type] = json.dumps(response_format("json_schema", f"{task_type}_sample",
                                                            sample_schema(task_type)))
        return formats[task_type]

    def add(batch: pa.Table) -> pa.Table:
        # Column by column: the rows are wide (revision's carry the whole sample), and a Python round trip of
        # every column cost more than building the requests.
        n = batch.num_rows
        if messages_fn:
            have = [c for c in messages_columns if c in batch.column_names]
            msgs = pa.array([messages_fn(r) for r in batch.select(have).to_pylist()], pa.string())
        else:
            msgs = batch.column("prompt")
        types = batch.column("task_type").to_pylist()
        return put_columns(batch, {
            "messages": msgs,
            "temperature": pa.array([float(temperature)] * n, pa.float64()),
            "top_p": pa.array([float(top_p)] * n, pa.float64()),
            "max_tokens": pa.array([int(max_tokens)] * n, pa.int64()),
            "response_format": pa.array([fmt(t) if structured else "" for t in types], pa.string()),
            "seed": pa.array([request_seed(seed, i) for i in batch.column("id").to_pylist()], pa.int64()),
        })

    return ds.map_batches(add, batch_format="pyarrow", num_cpus=0.1)


def put_columns(table: pa.Table, columns: dict[str, Any]) -> pa.Table:
    """The table with each named column replaced in place, or appended (in the dict's order) when it is new."""
    for name, values in columns.items():
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, values) if i >= 0 else table.append_column(name, values)
    return table


def _check_floor(ctx, man: dict, good: int, total: int, floor: float, reasons: dict, unit: str, verb: str) -> dict:
    """The stage's manifest with valid_share added, or LowValidShare (shards kept) below the stage's floor."""
    m = man["metrics"]
    m.update(check_valid_share(ctx.name, good, total, floor, reasons, unit=unit, verb=verb,
                               setting=f"{ctx.name}.min_valid_share", where=ctx.out.url,
                               examples=m.get("gen_error_examples"), metrics=m))
    return man


def _all_written(ctx, done: set[str], n: int) -> bool:
    """Every planned id already written (a rerun after a failed check): no engine to start, nothing to generate."""
    if done and len(done) >= n:
        ctx.log("all %d already written: re-checking the output without starting an engine", n)
        return True
    return False


def _finish_metrics(ctx, eng: EngineConfig, t0: float, run: dict, totals: dict, **extra) -> dict[str, Any]:
    check_answered(ctx.name, run, where=ctx.out.url)
    wall = max(time.time() - t0, 1e-9)
    res = replicas_resources(eng)
    ctx.ledger.cpu_seconds += wall * eng.replicas_max * res["cpus"]
    ctx.ledger.gpu_seconds += wall * eng.replicas_max * res["gpus"]
    generated = run.get("sent", 0)
    return {
        "engine": {"kind": eng.kind, "structured_output": eng.structured_output, "replicas": [eng.replicas_min,
                                                                                             eng.replicas_max]},
        "metrics": {"wall_s": wall, "generated_this_run": generated, "samples_per_s": generated / wall,
                    "output_tokens_per_s": run.get("completion_tokens", 0) / wall, **totals, **extra},
    }


# ---- synthesis -------------------------------------------------------------------------------------------
def synthesis_stage(ctx) -> dict:
    """D_syn: the generator writes cfg.synthesis.n_samples samples by the mixture; invalid ones go to rejects."""
    cfg, sc = ctx.cfg, ctx.cfg.synthesis
    eng = sc.engine
    model, adapter, generator = _model_for(ctx, "generator", eng)
    written = done(ctx.out)
    ctx.log("synthesis: %d samples with %s (%s engine); %d already written", sc.n_samples, generator, eng.kind,
            len(written))
    t0 = time.time()
    run: dict = {}
    if not _all_written(ctx, written, sc.n_samples):
        ds = _prompt_rows(sc.n_samples, dict(cfg.mixture.weights), cfg.run.seed, "synthesis", _tasks(ctx))
        ds = _filter(ds, written)
        ds = _requests(ds, sc.temperature, sc.top_p, eng.max_new_tokens, eng.structured_output, cfg.run.seed)
        ds = generate_dataset(ds, eng, model, adapter)
        ds = ds.map_batches(_SampleRows(generator), batch_format="pyarrow", num_cpus=0.1)
        run = write_split(ds, ctx.out, sc.shard_size)
    totals = scan_totals(ctx.out)
    man = _finish_metrics(ctx, eng, t0, run, totals, model=str(model))
    return _check_floor(ctx, man, totals["rows"], totals["generated_total"], sc.min_valid_share,
                        totals["reject_reasons"], "rows", "valid")


def _filter(ds, done: set[str]):
    from speed_ray.streaming import filter_pending

    return filter_pending(ds, done)


class _SampleRows:
    """Engine output -> `samples` rows (speed_ray.synth.samples.sample_row) plus token/engine metadata."""

    def __init__(self, generator: str):
        self.generator = generator

    def __call__(self, batch: pa.Table) -> pa.Table:
        from speed_ray.synth.samples import sample_row

        out = []
        # the request columns (messages, the response_format schema) are not needed here: not converted
        keep = [c for c in batch.column_names if c not in REQUEST_COLUMNS]
        for r in batch.select(keep).to_pylist():
            row = sample_row(r, r.get("text") or "", r["task_type"], self.generator)
            if not row["valid"]:
                row["reject_reason"] = reject_reason(row["reject_reason"], r["finish_reason"], r["error"])
            out.append({**row, **_meta(r)})
        return pa.Table.from_pylist(out)


def _meta(r: dict) -> dict:
    return {**{k: r[k] for k in RESULT_COLUMNS if k != "text"}, "engine": r["engine"]}


# ---- root data -------------------------------------------------------------------------------------------
def root_data_stage(ctx) -> dict:
    """D_root: the junior generator writes samples_per_prompt outputs for each of n_prompts prompts."""
    cfg, rc = ctx.cfg, ctx.cfg.root_data
    eng = rc.engine
    model, adapter, generator = _model_for(ctx, "generator", eng)
    written = done(ctx.out)
    k = rc.samples_per_prompt
    t0 = time.time()
    if _all_written(ctx, written, rc.n_prompts):
        return _root_finish(ctx, rc, eng, t0, {}, model)
    ds = _filter(_prompt_rows(rc.n_prompts, dict(cfg.mixture.weights), cfg.run.seed, "root_data", _tasks(ctx)),
                 written)

    def expand(batch: pa.Table) -> pa.Table:  # k generation requests per prompt, each with its own seed
        rows = []
        for r in batch.to_pylist():
            for j in range(k):
                rows.append({**r, "prompt_id": r["id"], "sample_index": j, "id": f"{r['id']}#{j}"})
        return pa.Table.from_pylist(rows)

    ds = ds.map_batches(expand, batch_format="pyarrow", num_cpus=0.1)
    ds = _requests(ds, rc.temperature, rc.top_p, eng.max_new_tokens, eng.structured_output, cfg.run.seed)
    ds = generate_dataset(ds, eng, model, adapter)
    ds = ds.select_columns(["prompt_id", "sample_index", "task_type", "task", "prompt", "prompt_params", "lineage",
                            *RESULT_COLUMNS])
    to_row = _RootRows(generator, k)
    ds = ds.groupby("prompt_id").map_groups(lambda g: to_row(g), batch_format="pyarrow", num_cpus=0.1)
    run = write_split(ds, ctx.out, max(1, 1000 // k), rejects=False)
    return _root_finish(ctx, rc, eng, t0, run, model)


def _root_finish(ctx, rc, eng: EngineConfig, t0: float, run: dict, model: str) -> dict:
    k = rc.samples_per_prompt
    totals = scan_totals(ctx.out)
    # per output, not per list: the share of the k samples that parse (the judge needs valid pairs)
    n_outputs = totals["rows"] * k
    totals["parse_rate"] = totals.get("n_valid_total", 0) / max(1, n_outputs)
    man = _finish_metrics(ctx, eng, t0, run, totals, model=str(model), samples_per_prompt=k)
    return _check_floor(ctx, man, totals.get("n_valid_total", 0), n_outputs, rc.min_valid_share,
                        totals.get("output_reject_reasons", {}), "outputs", "parsed")


class _RootRows:
    def __init__(self, generator: str, k: int):
        self.generator, self.k = generator, k

    def __call__(self, group: pa.Table) -> pa.Table:
        from speed_ray.synth.samples import lineage_extend

        rows = group.to_pylist()
        r0 = rows[0]
        lists = root_lists(rows, self.k)
        return pa.Table.from_pylist([{
            "id": r0["prompt_id"], "task_type": r0["task_type"], "task": r0["task"], "prompt": r0["prompt"],
            "prompt_params": r0["prompt_params"], "outputs": lists["outputs"], "samples": lists["samples"],
            "output_reject_reasons": lists["reasons"],
            # a list with an unanswered output is not written (the sink counts it failed; a rerun resends it)
            "error": next((r["error"] for r in rows if no_answer(r["error"])),
                          next((r["error"] for r in rows if r["error"]), "")),
            "generator": self.generator, "lineage": lineage_extend(r0["lineage"], generator=self.generator),
            "valid": lists["n_valid"] > 0, "n_valid": lists["n_valid"],
            "prompt_tokens": sum(int(r["prompt_tokens"]) for r in rows),
            "completion_tokens": sum(int(r["completion_tokens"]) for r in rows),
            "finish_reason": ",".join(r["finish_reason"] for r in rows), "reject_reason": "",
        }], schema=_ROOT_SCHEMA)


_ROOT_SCHEMA = pa.schema([("id", pa.string()), ("task_type", pa.string()), ("task", pa.string()),
                          ("prompt", pa.string()), ("prompt_params", pa.string()),
                          ("outputs", pa.list_(pa.string())), ("samples", pa.list_(pa.string())),
                          ("output_reject_reasons", pa.list_(pa.string())), ("error", pa.string()),
                          ("generator", pa.string()), ("lineage", pa.string()), ("valid", pa.bool_()),
                          ("n_valid", pa.int64()), ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
                          ("finish_reason", pa.string()), ("reject_reason", pa.string())])


# ---- revision --------------------------------------------------------------------------------------------
def revision_stage(ctx) -> dict:
    """D_syn^re: the revisor refines each sample once; a revision that fails to parse keeps the original."""
    cfg, rc = ctx.cfg, ctx.cfg.revision
    eng = rc.engine
    model, adapter, revisor = _model_for(ctx, "revisor", eng)
    written = done(ctx.out)
    t0 = time.time()
    if _all_written(ctx, written, ctx.inputs["samples"].num_rows()):
        return _revision_finish(ctx, rc, eng, t0, {}, model)
    ds = _filter(ctx.inputs["samples"].ray_dataset(num_cpus=0.1), written)   # 0.1 as the maps after it: they fuse

    def messages(r: dict) -> str:
        from speed_ray.synth.prompts import revisor_messages

        return json.dumps(revisor_messages(r["prompt"], r.get("sample") or r["source_text"]), ensure_ascii=False)

    # the engine's columns would overwrite the sample's own token counts: keep those under original_*
    ds = ds.map_batches(_rename({"text": "source_text", **{c: f"original_{c}" for c in (*RESULT_COLUMNS, "engine")
                                                           if c != "text"}}), batch_format="pyarrow", num_cpus=0.1)
    ds = _requests(ds, rc.temperature, rc.top_p, eng.max_new_tokens, eng.structured_output, cfg.run.seed,
                   messages_fn=messages, messages_columns=("prompt", "sample", "source_text"))
    ds = generate_dataset(ds, eng, model, adapter)
    ds = ds.map_batches(_RevisedRows(revisor), batch_format="pyarrow", num_cpus=0.1)
    run = write_split(ds, ctx.out, rc.shard_size, rejects=False)
    return _revision_finish(ctx, rc, eng, t0, run, model)


def _revision_finish(ctx, rc, eng: EngineConfig, t0: float, run: dict, model: str) -> dict:
    totals = scan_totals(ctx.out)
    totals["parse_rate"] = totals.get("revised_total", 0) / max(1, totals["rows"])   # revisions that parsed
    man = _finish_metrics(ctx, eng, t0, run, totals, model=str(model))
    return _check_floor(ctx, man, totals.get("revised_total", 0), totals["rows"], rc.min_valid_share,
                        totals.get("revision_reject_reasons", {}), "revisions", "parsed")


def _rename(mapping: dict[str, str]):
    def fn(batch: pa.Table) -> pa.Table:
        return batch.rename_columns([mapping.get(c, c) for c in batch.column_names])
    return fn


class _RevisedRows:
    """map_batches fn: revisor answers -> sample rows. A revision that parses replaces the sample's text and
    fields (the original kept under original_*); one that does not keeps the original with its reason. Built
    column by column: only the answers, the replaced fields and the lineage go through Python."""

    def __init__(self, revisor: str):
        self.revisor = revisor

    def __call__(self, batch: pa.Table) -> pa.Table:
        from speed_ray.synth.parsing import canonical_json, parse_sample
        from speed_ray.synth.samples import lineage_extend

        n = batch.num_rows
        finish = batch.column("finish_reason").to_pylist()
        errors = batch.column("error").to_pylist()
        parsed = [parse_sample(t, tt) if f != "error" else None for t, tt, f in
                  zip(batch.column("text").to_pylist(), batch.column("task_type").to_pylist(), finish)]
        ok = [p is not None and p.ok for p in parsed]
        mask = pa.array(ok, pa.bool_())
        source = batch.column("source_text")
        sample = (batch.column("sample") if "sample" in batch.column_names
                  else pa.nulls(n, pa.string()))
        out = batch.drop_columns([c for c in (*REQUEST_COLUMNS, "text", "source_text") if c in batch.column_names])

        def revised_or_kept(name: str, new) -> list:
            old = batch.column(name).to_pylist() if name in batch.column_names else [None] * n
            return [new(p) if k else o for p, k, o in zip(parsed, ok, old)]

        return put_columns(out, {
            "original_text": source,
            "original_sample": pc.fill_null(sample, ""),
            "revised": mask,
            "revision_failed": pc.invert(mask),
            "text": pc.if_else(mask, batch.column("text"), source),
            "sample": pa.array(revised_or_kept("sample", lambda p: canonical_json(p.sample)), pa.string()),
            "query": pa.array(revised_or_kept("query", lambda p: p.query), pa.string()),
            "positive": pa.array(revised_or_kept("positive", lambda p: p.positive), pa.string()),
            "negative": pa.array(revised_or_kept("negative", lambda p: p.negative), pa.string()),
            "valid": pa.array(revised_or_kept("valid", lambda p: True), pa.bool_()),
            "reject_reason": pa.array(revised_or_kept("reject_reason", lambda p: ""), pa.string()),
            "revision_reject_reason": pa.array(
                ["" if k else reject_reason(p.reason if p else "", f, e)
                 for p, k, f, e in zip(parsed, ok, finish, errors)], pa.string()),
            "lineage": pa.array([lineage_extend(lin, revision=self.revisor if k else "failed")
                                 for lin, k in zip(batch.column("lineage").to_pylist(), ok)], pa.string()),
        })
