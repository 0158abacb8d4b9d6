"""The SPEED stage graph: which stages a run has, what each depends on, and running them with skip/resume."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from speed_ray.config import to_dict
from speed_ray.config_view import ConfigView, Recorder
from speed_ray.monitor import watch
from speed_ray.run_config import VARIANTS, RunConfig, dump_config
from speed_ray.stage import Services, StageContext, StageError
from speed_ray.store import CostLedger, RunStore, StageOutput, library_versions, stable_hash

log = logging.getLogger("speed_ray")

# Bump STAGE_VERSION (all stages) or a StageSpec's version when code changes what is written, so old outputs
# are not reused. Changing a config field's default is such a change: a fingerprint hashes only the settings that
# differ from their defaults (so a field added with a default leaves finished stages reusable), so the stages that
# hash the field would otherwise reuse outputs made with the old default.
STAGE_VERSION = "1"


StageFn = Callable[[StageContext], "dict | None"]
Loader = Callable[[str], StageFn]     # StageSpec.fn ("module:function") -> the stage function


@dataclass(frozen=True)
class StageSpec:
    """One stage of the graph and every fact about it that the driver, the report and the studies need: they read
    these from the plan, never from lists of their own."""

    name: str
    fn: str                                  # "module:function", imported only when the stage runs
    inputs: dict[str, str] = field(default_factory=dict)   # role -> upstream stage name
    config_keys: tuple[str, ...] = ()        # dotted config sections the output depends on
    uses_teacher: bool = False
    doc: str = ""
    version: str = "1"                       # bump when the stage's code changes what it writes
    produces: Literal["data", "model", "evaluation"] = "data"
    shows_as: str = ""                       # what the run's summary calls its output ("senior generator"); "": not shown
    # In the cost model of the scaling sweep (SPEED Sec. 4.4): "fixed" is paid once whatever the data size (aligning
    # the generators), "unit" per synthesized sample (synthesis, revision), "" neither.
    cost_role: Literal["fixed", "unit", ""] = ""
    # "synthesizer": writes the synthetic data (its "generator" input, when it has one, is the model that does);
    # "junior" / "senior" / "revisor": trains that generator; "": neither.
    generator_role: Literal["synthesizer", "junior", "senior", "revisor", ""] = ""
    # What its progress counts, and where progress is read from (speed_ray/progress.py): "rows" its shards,
    # "step_log" a trainer's artifacts/progress/steps.jsonl, "markers" dedup's step markers.
    unit: Literal["rows", "topics", "requests", "prompts", "samples", "steps", "tasks"] = "rows"
    counted_by: Literal["rows", "step_log", "markers"] = "rows"

    def facts(self) -> dict[str, Any]:
        """What the run's plan.json records of this stage, so tools reading a run directory need no code of it."""
        return {"produces": self.produces, "shows_as": self.shows_as, "cost_role": self.cost_role,
                "generator_role": self.generator_role, "uses_teacher": self.uses_teacher, "unit": self.unit,
                "counted_by": self.counted_by}


# What identifies the teacher's answers: the model name, the model actually served when the teacher is the local
# server and the answer length it clips requests to, the constrained-output mode, and whether requests carry a seed.
_TEACHER = ("teacher.model", "teacher.local_server.model", "teacher.local_server.max_new_tokens", "teacher.json_mode",
            "teacher.seed_requests")

# Settings that stages read but that by design do not change what they write: where the run and its outputs live,
# how the teacher is reached and served, how fast, how robustly and within what budget requests go out, and how
# rows are batched into shards. A stage's config_keys need not cover these, nor the fields marked
# {"fingerprint": False} (checks like min_valid_share); every other setting a stage reads must be covered, which
# tests/test_stage_reads.py checks by running the stages with ctx.cfg recording their reads. A budget cap with
# teacher.on_budget_exhausted=finish completes a stage partially on purpose: it is topped up with --force.
NOT_FINGERPRINTED = (
    "run.name", "run.run_dir", "run.ray_address", "run.num_cpus", "run.log_level",
    "teacher.base_url", "teacher.api_key_env", "teacher.concurrency", "teacher.rpm", "teacher.tpm",
    "teacher.timeout_s", "teacher.max_retries", "teacher.backoff_base_s", "teacher.backoff_max_s", "teacher.cache",
    "teacher.max_tokens_param", "teacher.max_calls", "teacher.max_tokens_budget", "teacher.on_budget_exhausted",
    "teacher.max_failed_fraction", "teacher.shard_rows", "teacher.request_batch_size", "teacher.num_actors",
    "teacher.local_server.engine", "teacher.local_server.host", "teacher.local_server.port",
    "teacher.local_server.replicas", "teacher.local_server.num_cpus", "teacher.local_server.num_gpus",
    "teacher.local_server.torch_threads", "teacher.local_server.max_batch_size",
    "teacher.local_server.batch_wait_timeout_s", "teacher.budget_usd", "pricing",
)

# Versions: the teacher and generation stages are at 2 (judge 4) since they share one LLM row contract
# (speed_ray.llm): result columns text/error/cached/attempts on every row, rejects hold `text` (was response_text),
# generation rows `error` (was gen_error).
# Every stage SPEED has. The variant picks a subset and rewires the generator roles (paper Table 1 and 2).
_ALL = {
    "topics": StageSpec("topics", "speed_ray.teacher.stages:topics_stage", {}, ("topics", "run.seed"),
                        doc="sample multi-grained topics from the taxonomy", unit="topics"),
    "brainstorm": StageSpec("brainstorm", "speed_ray.teacher.stages:brainstorm_stage", {"topics": "topics"},
                            ("brainstorm", *_TEACHER, "teacher.sampling", "run.seed"), True,
                            "teacher brainstorms task descriptions", unit="requests",
                            # 3: tasks of fewer than brainstorm.min_task_words words are dropped
                            version="3"),
    "seed_data": StageSpec("seed_data", "speed_ray.teacher.stages:seed_data_stage", {"tasks": "brainstorm"},
                           ("seed_data", "mixture", *_TEACHER, "teacher.sampling", "run.seed"), True,
                           "teacher writes D_seed", cost_role="fixed", unit="requests",
                           version="2"),
    "junior_sft": StageSpec("junior_sft", "speed_ray.align.stages:junior_sft_stage", {"data": "seed_data"},
                            ("junior_sft", "run.seed"), doc="SFT the junior generator on D_seed",
                            produces="model", shows_as="junior generator", cost_role="fixed", generator_role="junior",
                            unit="steps", counted_by="step_log"),
    "root_data": StageSpec("root_data", "speed_ray.generate.stages:root_data_stage",
                           {"generator": "junior_sft", "tasks": "brainstorm"}, ("root_data", "mixture", "run.seed"),
                           doc="junior generator writes k samples per prompt (D_root)", cost_role="fixed", unit="prompts",
                           version="2"),
    "judge": StageSpec("judge", "speed_ray.teacher.stages:judge_stage", {"root": "root_data"},
                       # the judge decodes at teacher.judge_temperature: sampling.temperature is not used
                       ("judge", *_TEACHER, "teacher.judge_temperature", "teacher.sampling.top_p",
                        "teacher.sampling.max_tokens", "run.seed"), True, "teacher picks best/worst: D_DPO",
                       version="4", cost_role="fixed", unit="requests"),
    "revise_signals": StageSpec("revise_signals", "speed_ray.teacher.stages:revise_signals_stage",
                                {"root": "root_data"}, ("revise_signals", *_TEACHER, "teacher.sampling", "run.seed"),
                                True, "teacher revises root samples: D_revise", cost_role="fixed",
                                unit="requests", version="2"),
    "senior_dpo": StageSpec("senior_dpo", "speed_ray.align.stages:senior_dpo_stage",
                            {"pairs": "judge", "reference": "junior_sft"}, ("senior_dpo", "run.seed"),
                            doc="DPO the junior into the senior generator", produces="model",
                            shows_as="senior generator", cost_role="fixed", generator_role="senior",
                            unit="steps", counted_by="step_log"),
    "revisor_sft": StageSpec("revisor_sft", "speed_ray.align.stages:revisor_sft_stage",
                             {"data": "revise_signals"}, ("revisor_sft", "run.seed"), doc="SFT the data revisor",
                             produces="model", shows_as="revisor", cost_role="fixed", generator_role="revisor",
                             unit="steps", counted_by="step_log"),
    "synthesis": StageSpec("synthesis", "speed_ray.generate.stages:synthesis_stage",
                           {"generator": "senior_dpo", "tasks": "brainstorm"}, ("synthesis", "mixture", "run.seed"),
                           doc="generator synthesizes at scale (D_syn)", shows_as="synthetic data",
                           cost_role="unit", generator_role="synthesizer", unit="samples",
                           version="2"),
    "teacher_synthesis": StageSpec("teacher_synthesis", "speed_ray.teacher.stages:teacher_synthesis_stage",
                                   {"tasks": "brainstorm"}, ("synthesis.n_samples", "mixture", *_TEACHER,
                                                             "teacher.sampling", "run.seed"), True,
                                   "the teacher itself synthesizes (direct baseline)", shows_as="synthetic data",
                                   cost_role="unit", generator_role="synthesizer", unit="requests",
                                   version="2"),
    "revision": StageSpec("revision", "speed_ray.generate.stages:revision_stage",
                          {"samples": "synthesis", "revisor": "revisor_sft"}, ("revision", "run.seed"),
                          doc="revisor refines each sample once (D_syn^re)", cost_role="unit", unit="samples",
                          version="2"),
    "dedup": StageSpec("dedup", "speed_ray.dedup.stage:dedup_stage", {"samples": "revision"},
                       ("dedup", "filters"), doc="exact + MinHash-LSH dedup, then quality filters",
                       # 2: degenerate task descriptions are filtered (filters.drop_degenerate_task)
                       # 3: placeholder and too-short texts where a sentence or passage is due (drop_label_like)
                       version="3", shows_as="deduplicated data", unit="steps", counted_by="markers"),
    "screen": StageSpec("screen", "speed_ray.quality.stage:screen_stage", {"samples": "dedup"},
                        ("screen", "embedder.base_model", "evaluate.local_tasks", "evaluate.data_root",
                         "evaluate.tasks", "evaluate.benchmark"),
                        doc="guide-model hard-negative screening, sample scores, decontamination",
                        shows_as="training data", unit="samples"),
    "train_embedder": StageSpec("train_embedder", "speed_ray.embedder.stage:train_embedder_stage",
                                {"data": "screen"}, ("embedder", "run.seed"), doc="contrastive training of the embedder",
                                produces="model", shows_as="embedder", unit="steps", counted_by="step_log",
                                # 2: the streamed feed (n_samples counts usable triples; no text twice in a batch)
                                version="2"),
    "evaluate": StageSpec("evaluate", "speed_ray.evaluate.stage:evaluate_stage", {"model": "train_embedder"},
                          ("evaluate",), doc="MTEB evaluation of the trained embedder", produces="evaluation",
                          unit="tasks"),
}



def _rewire(spec: StageSpec, **inputs: str | None) -> StageSpec:
    new = {k: v for k, v in {**spec.inputs, **inputs}.items() if v is not None}
    return dataclasses.replace(spec, inputs=new)


def stage_spec(name: str, **inputs: str | None) -> StageSpec:
    """One stage's spec, with some of its inputs rewired (e.g. train_embedder reading a user's imported data)."""
    if name not in _ALL:
        raise ValueError(f"unknown stage {name!r}; stages are: {', '.join(_ALL)}")
    return _rewire(_ALL[name], **inputs)


def build_plan(variant: str) -> list[StageSpec]:
    """The ordered stages of one variant (SPEED Table 2 ablations and Table 1 direct baselines)."""
    s = dict(_ALL)
    head = ["topics", "brainstorm"]
    tail = ["dedup", "screen", "train_embedder", "evaluate"]
    if variant == "full":
        names = head + ["seed_data", "junior_sft", "root_data", "judge", "revise_signals", "senior_dpo",
                        "revisor_sft", "synthesis", "revision"] + tail
    elif variant == "sft_only":
        names = head + ["seed_data", "junior_sft", "synthesis"] + tail
        s["synthesis"] = _rewire(s["synthesis"], generator="junior_sft")
        s["dedup"] = _rewire(s["dedup"], samples="synthesis")
    elif variant == "no_dpo":
        names = head + ["seed_data", "junior_sft", "root_data", "revise_signals", "revisor_sft", "synthesis",
                        "revision"] + tail
        s["synthesis"] = _rewire(s["synthesis"], generator="junior_sft")
    elif variant == "no_revisor":
        names = head + ["seed_data", "junior_sft", "root_data", "judge", "senior_dpo", "synthesis"] + tail
        s["dedup"] = _rewire(s["dedup"], samples="synthesis")
    elif variant == "direct_instruct":
        names = head + ["synthesis"] + tail      # synthesis.engine.model is the instruct model, unaligned
        s["synthesis"] = _rewire(s["synthesis"], generator=None)
        s["dedup"] = _rewire(s["dedup"], samples="synthesis")
    elif variant == "direct_teacher":
        names = head + ["teacher_synthesis"] + tail
        s["dedup"] = _rewire(s["dedup"], samples="teacher_synthesis")
    else:
        raise ValueError(f"unknown pipeline.variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return [s[n] for n in names]


_ABSENT = object()


def _select(cfg_dict: dict, dotted: str, missing: Any = None) -> Any:
    node: Any = cfg_dict
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return missing
        node = node[part]
    return node


def _fingerprinted(f: dataclasses.Field) -> bool:
    """False for the fields that only check a stage's output (field metadata {"fingerprint": False}, e.g.
    min_valid_share): changing a check must not orphan the shards it judged."""
    return f.metadata.get("fingerprint", True)


def _inputs_dict(cfg: Any) -> Any:
    """to_dict(cfg) without the fields that are not fingerprinted: what a manifest records as its settings."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: _inputs_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if _fingerprinted(f)}
    return to_dict(cfg)


_SECTION = object()   # the default of a field whose default_factory is a config section class


def _field_default(f: dataclasses.Field) -> Any:
    """A field's default. A section's default is not built (its __post_init__ may depend on the process, e.g.
    run.run_dir resolves against a working directory that a Ray job's driver may no longer have): only its kind."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            return _SECTION
        return f.default_factory()
    return _ABSENT


def _hashed_dict(cfg: Any) -> dict:
    """_inputs_dict(cfg) without the leaves that equal their field's default, so a field added to a config class
    with a default changes no fingerprint. A section that is all defaults drops out, unless its field's default is
    not a section (e.g. None)."""
    out = {}
    for f in dataclasses.fields(cfg):
        if not _fingerprinted(f):
            continue
        value, default = getattr(cfg, f.name), _field_default(f)
        if dataclasses.is_dataclass(value):
            sub = _hashed_dict(value)
            if sub or not (default is _SECTION or dataclasses.is_dataclass(default)):
                out[f.name] = sub
        elif default is _ABSENT or to_dict(value) != to_dict(default):
            out[f.name] = to_dict(value)
    return out


def fingerprint_settings(cfg: RunConfig, spec: StageSpec) -> dict[str, Any]:
    """The settings a stage's fingerprint depends on, as its manifest records them: its config_keys' values."""
    cfg_dict = _inputs_dict(cfg)
    return {k: _select(cfg_dict, k) for k in spec.config_keys}


def _hashed_settings(hashed: dict, spec: StageSpec) -> dict[str, Any]:
    """What the fingerprint hashes of those settings: the ones that differ from their defaults."""
    picked = {k: _select(hashed, k, _ABSENT) for k in spec.config_keys}
    return {k: v for k, v in picked.items() if v is not _ABSENT}


def fingerprints(cfg: RunConfig, plan: list[StageSpec], known: dict[str, str] | None = None) -> dict[str, str]:
    """Each stage's fingerprint: its settings (those that differ from their defaults), its version and its
    inputs' fingerprints. `known` gives the fingerprints of inputs that are not stages of the plan (a user's own
    data imported by `speed-ray train-embedder`)."""
    hashed = _hashed_dict(cfg)
    out: dict[str, str] = dict(known or {})
    for spec in plan:
        settings = _hashed_settings(hashed, spec)
        inputs = {role: out[up] for role, up in sorted(spec.inputs.items())}
        out[spec.name] = stable_hash({"stage": spec.name, "v": f"{STAGE_VERSION}.{spec.version}", "settings": settings,
                                      "inputs": inputs})
    return out


def uncovered_reads(cfg: RunConfig, spec: StageSpec, paths: set[str] | list[str]) -> list[str]:
    """The config paths a stage read that its fingerprint does not cover: not under one of its config_keys, not in
    NOT_FINGERPRINTED, not a field marked {"fingerprint": False}. Changing one of them would reuse its output."""
    def covered(path: str) -> bool:
        if any(path == k or path.startswith(k + ".") for k in (*spec.config_keys, *NOT_FINGERPRINTED)):
            return True
        node: Any = cfg
        for part in path.split("."):
            if not dataclasses.is_dataclass(node):
                return False
            f = next((f for f in dataclasses.fields(node) if f.name == part), None)
            if f is None:
                return False
            if not _fingerprinted(f):
                return True
            node = getattr(node, part)
        return False

    return sorted(p for p in paths if not covered(p))


# A local directory, set by tests: the settings each stage reads, in the driver and in the Ray workers of this
# machine, are written to READS_DIR/<stage>.json (accumulated over runs). Unset, only the driver's reads are seen.
READS_DIR: str | None = None


def load_stage(fn: str) -> StageFn:
    """The stage function named by a StageSpec.fn ("module:function"): the loader every run uses unless its caller
    passes another (tests pass light fakes, e.g. tests/studies_fakes.py)."""
    mod, _, attr = fn.partition(":")
    return getattr(importlib.import_module(mod), attr)


def plan_status(cfg: RunConfig, store: RunStore | None = None) -> list[dict]:
    """Per stage: name, fingerprint, state (done / partial / pending) and the manifest when done."""
    store = store or RunStore(cfg.run.run_dir)
    plan = build_plan(cfg.pipeline.variant)
    fps = fingerprints(cfg, plan)
    rows = []
    for spec in plan:
        out = store.stage(spec.name, fps[spec.name])
        if out.done:
            state, man = "done", out.manifest
        else:
            state, man = ("partial" if out.shard_names() else "pending"), None
        rows.append({"stage": spec.name, "fingerprint": fps[spec.name], "state": state, "manifest": man,
                     "inputs": dict(spec.inputs)})
    return rows


def run_pipeline(cfg: RunConfig, stages: list[str] | None = None, force: list[str] | None = None,
                 loader: Loader = load_stage) -> dict[str, Any]:
    """Run the config's stages in order, skipping those whose manifest matches. Returns the run summary."""
    store = RunStore(cfg.run.run_dir)
    plan = build_plan(cfg.pipeline.variant)
    names = [s.name for s in plan]
    selected = list(stages) if stages else list(cfg.pipeline.stages or names)
    unknown = [s for s in selected if s not in names]
    if unknown:
        raise StageError(f"unknown stage(s) {unknown} for variant {cfg.pipeline.variant!r}; stages are: "
                         f"{', '.join(names)}")
    fps = fingerprints(cfg, plan)
    run_name = cfg.run.name
    store.write_json(store.run_url(run_name, "plan.json"),
                     {"variant": cfg.pipeline.variant, "stages": [{"stage": s.name, "fingerprint": fps[s.name],
                                                                    "inputs": s.inputs, **s.facts()} for s in plan]})
    dump_config(cfg, store.run_url(run_name, "config.yaml"))
    summary: dict[str, Any] = {"run": run_name, "run_dir": cfg.run.run_dir, "stages": {}}
    services = Services()
    # the teacher stages of this plan: a dollar budget counts what all of them already paid
    services.setdefault("teacher_outputs", [(s.name, fps[s.name]) for s in plan if s.uses_teacher])
    todo = []
    # A forced stage writes new data, so every stage downstream of it (in plan order) is forced too; one that is not
    # selected this time is only warned about (its output was made from the data being replaced).
    forced = set(force or [])
    for spec in plan:
        if set(spec.inputs.values()) & forced:
            forced.add(spec.name)
    for spec in plan:
        out = store.stage(spec.name, fps[spec.name])
        if spec.name not in selected:
            if out.done:
                summary["stages"][spec.name] = {"state": "done", **_brief(out.manifest)}
                if spec.name in forced:
                    log.warning("[%s] is downstream of a forced stage but not selected: its output (%s) was made "
                                "from the replaced data; run it with --force to refresh it", spec.name, out.url)
        elif out.done and spec.name not in forced:
            log.info("[%s] skipped: done at %s (%s)", spec.name, fps[spec.name], out.url)
            summary["stages"][spec.name] = {"state": "skipped", **_brief(out.manifest)}
        else:
            todo.append(spec)
    try:
        for group in stage_groups(todo, cfg.pipeline.concurrent_teacher_stages):
            if not any(spec.uses_teacher for spec in group):
                # A local teacher holds CPUs (or a GPU) and memory that training and synthesis need; on a small
                # cluster Ray Data's other operators would wait on them forever. It restarts when needed again.
                services.stop_all()
            run = lambda spec: run_stage(cfg, spec, fps, store=store, services=services, loader=loader,  # noqa: E731
                                         force=spec.name in forced)
            if len(group) == 1:
                summary["stages"][group[0].name] = run(group[0])
                continue
            log.info("running %s concurrently (independent teacher stages share the endpoint)",
                     " + ".join(s.name for s in group))
            with ThreadPoolExecutor(len(group), thread_name_prefix="stage") as pool:
                futures = [(spec, pool.submit(run, spec)) for spec in group]
            errors = []
            for spec, fut in futures:
                try:
                    summary["stages"][spec.name] = fut.result()
                except StageError as e:    # the other stages finished and kept their outputs
                    errors.append(e)
            if errors:
                raise errors[0]
    finally:
        services.stop_all()
    summary["stages"] = {n: summary["stages"][n] for n in names if n in summary["stages"]}
    store.write_json(store.run_url(run_name, "summary.json"), summary)
    return summary


def stage_groups(todo: list[StageSpec], concurrent_teacher: bool = True) -> list[list[StageSpec]]:
    """The stages to run, in plan order, cut into groups that run together: consecutive teacher stages that do
    not feed each other (judge and revise_signals both read root_data) share one group, so their requests
    interleave at the endpoint (one batch on a local server; twice the requests in flight on an API).
    Every other stage runs alone."""
    groups: list[list[StageSpec]] = []
    for spec in todo:
        last = groups[-1] if groups else None
        if (concurrent_teacher and last and spec.uses_teacher and all(s.uses_teacher for s in last)
                and not set(spec.inputs.values()) & {s.name for s in last}):
            last.append(spec)
        else:
            groups.append([spec])
    return groups


def run_stage(cfg: RunConfig, spec: StageSpec, fps: dict[str, str], *, store: RunStore | None = None,
              services: Services | None = None, loader: Loader = load_stage, force: bool = False) -> dict:
    """The one owner of a stage's bookkeeping, for the pipeline, the studies and the commands alike: skip it when
    its output is done (unless forced: then the old output is set aside, never deleted), check that its inputs are
    done, run it into its output dir (resuming from the shards it already wrote), check what it read against its
    fingerprint, and write its manifest with its cost ledger. Returns its summary entry
    ({"state": "skipped" | "ran", "fingerprint", "rows", "duration_s", "cost", "url"}).

    fps holds the fingerprints of the stage and its inputs (fingerprints(cfg, plan)). A failure raises StageError
    and keeps everything written so far."""
    store = store or RunStore(cfg.run.run_dir)
    out = store.stage(spec.name, fps[spec.name])
    if out.done and not force:
        log.info("[%s] skipped: done at %s (%s)", spec.name, fps[spec.name], out.url)
        return {"state": "skipped", **_brief(out.manifest)}
    if force:
        moved = out.set_aside()
        if moved:
            log.info("[%s] forced: its previous output is set aside at %s", spec.name, moved)
    inputs = {}
    for role, up in spec.inputs.items():
        up_out = store.stage(up, fps[up])
        if not up_out.done:
            raise StageError(f"stage {spec.name!r} needs {up!r}, which has not completed; "
                             f"run it first or add it to --stages")
        inputs[role] = up_out
    out.clear_manifest()
    # ctx.cfg records every setting the stage reads: reading one its fingerprint does not cover is a bug (a change
    # to it would reuse this output), warned about below and caught by tests/test_stage_reads.py.
    recorder = Recorder(os.path.join(READS_DIR, "workers", spec.name) if READS_DIR else None)
    run_name = cfg.run.name
    ctx = StageContext(cfg=ConfigView(cfg, recorder), name=spec.name, out=out, inputs=inputs, store=store,
                       run_name=run_name, services=services if services is not None else Services())
    resumed = len(out.shard_names())
    log.info("[%s] running -> %s%s", spec.name, out.url,
             f" (resuming: {resumed} shard(s) already written)" if resumed else "")
    t0 = time.time()
    try:
        with watch(cfg, out, inputs, store, run_name, spec.uses_teacher, spec.unit, spec.counted_by):  # progress lines
            extra = loader(spec.fn)(ctx) or {}
    except Exception as e:  # keep everything written so far; the next run resumes from it
        raise StageError(f"stage {spec.name!r} failed: {type(e).__name__}: {e}\n"
                         f"(its partial output stays at {out.url}; rerun to resume)\n"
                         + traceback.format_exc(limit=6)) from e
    finally:
        if services is None:
            ctx.services.stop_all()
    t1 = time.time()
    _check_reads(cfg, spec, recorder)
    ledger = ctx.ledger.as_dict()
    if not ctx.ledger.cpu_seconds and not ctx.ledger.gpu_seconds:
        ledger["cpu_hours"] = (t1 - t0) / 3600
        ledger["cpu_seconds"] = t1 - t0
    manifest = {
        "stage": spec.name, "fingerprint": fps[spec.name], "variant_inputs": spec.inputs,
        "inputs": {role: {"stage": up, "fingerprint": fps[up]} for role, up in spec.inputs.items()},
        "settings": fingerprint_settings(cfg, spec),
        "rows": out.num_rows(), "shards": len(out.shard_names()), "started_at": t0, "ended_at": t1,
        "duration_s": t1 - t0, "cost": ledger, "versions": library_versions(), "run": run_name, **extra,
    }
    out.write_manifest(manifest)
    log.info("[%s] done in %.1fs: %d rows, %d teacher calls, %d tokens", spec.name, t1 - t0,
             manifest["rows"], ledger["calls"], ledger["total_tokens"])
    return {"state": "ran", **_brief(manifest)}


def _check_reads(cfg: RunConfig, spec: StageSpec, recorder: Recorder) -> None:
    reads = recorder.all_paths()
    uncovered = uncovered_reads(cfg, spec, reads)
    if uncovered:
        log.warning("[%s] read setting(s) its fingerprint does not cover: %s; changing them would reuse its output "
                    "(add them to its StageSpec.config_keys, or to NOT_FINGERPRINTED if they cannot change what it "
                    "writes)", spec.name, ", ".join(uncovered))
    if READS_DIR:
        path = os.path.join(READS_DIR, f"{spec.name}.json")
        before: list[str] = []
        if os.path.exists(path):
            with open(path) as f:
                before = json.load(f)
        with open(path, "w") as f:
            json.dump(sorted(set(before) | reads), f)


def _brief(m: dict) -> dict:
    return {"fingerprint": m.get("fingerprint"), "rows": m.get("rows"), "duration_s": m.get("duration_s"),
            "cost": m.get("cost", {}), "url": None}


