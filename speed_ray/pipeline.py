"""The SPEED stage graph: which stages a run has, what each depends on, and running them with skip/resume."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from speed_ray.config import to_dict
from speed_ray.run_config import RunConfig, dump_config
from speed_ray.store import CostLedger, RunStore, StageOutput, library_versions, stable_hash

log = logging.getLogger("speed_ray")

# Bump STAGE_VERSION (all stages) or a StageSpec's version when code changes what is written, so old outputs
# are not reused.
STAGE_VERSION = "1"


@dataclass(frozen=True)
class StageSpec:
    name: str
    fn: str                                  # "module:function", imported only when the stage runs
    inputs: dict[str, str] = field(default_factory=dict)   # role -> upstream stage name
    config_keys: tuple[str, ...] = ()        # dotted config sections the output depends on
    uses_teacher: bool = False
    doc: str = ""
    version: str = "1"                       # bump when the stage's code changes what it writes


# What identifies the teacher's answers: the model name, the model actually served when the teacher is the local
# server, and the constrained-output mode.
_TEACHER = ("teacher.model", "teacher.local_server.model", "teacher.json_mode")

# Every stage SPEED has. The variant picks a subset and rewires the generator roles (paper Table 1 and 2).
_ALL = {
    "topics": StageSpec("topics", "speed_ray.teacher.stages:topics_stage", {}, ("topics", "run.seed"),
                        doc="sample multi-grained topics from the taxonomy"),
    "brainstorm": StageSpec("brainstorm", "speed_ray.teacher.stages:brainstorm_stage", {"topics": "topics"},
                            ("brainstorm", *_TEACHER, "run.seed"), True, "teacher brainstorms task descriptions"),
    "seed_data": StageSpec("seed_data", "speed_ray.teacher.stages:seed_data_stage", {"tasks": "brainstorm"},
                           ("seed_data", "mixture", *_TEACHER, "teacher.sampling", "run.seed"), True,
                           "teacher writes D_seed"),
    "junior_sft": StageSpec("junior_sft", "speed_ray.align.stages:junior_sft_stage", {"data": "seed_data"},
                            ("junior_sft", "run.seed"), doc="SFT the junior generator on D_seed"),
    "root_data": StageSpec("root_data", "speed_ray.generate.stages:root_data_stage",
                           {"generator": "junior_sft", "tasks": "brainstorm"}, ("root_data", "mixture", "run.seed"),
                           doc="junior generator writes k samples per prompt (D_root)"),
    "judge": StageSpec("judge", "speed_ray.teacher.stages:judge_stage", {"root": "root_data"},
                       ("judge", *_TEACHER), True, "teacher picks best/worst: D_DPO",
                       version="3"),
    "revise_signals": StageSpec("revise_signals", "speed_ray.teacher.stages:revise_signals_stage",
                                {"root": "root_data"}, ("revise_signals", *_TEACHER, "teacher.sampling"), True,
                                "teacher revises root samples: D_revise"),
    "senior_dpo": StageSpec("senior_dpo", "speed_ray.align.stages:senior_dpo_stage",
                            {"pairs": "judge", "reference": "junior_sft"}, ("senior_dpo", "run.seed"),
                            doc="DPO the junior into the senior generator"),
    "revisor_sft": StageSpec("revisor_sft", "speed_ray.align.stages:revisor_sft_stage",
                             {"data": "revise_signals"}, ("revisor_sft", "run.seed"), doc="SFT the data revisor"),
    "synthesis": StageSpec("synthesis", "speed_ray.generate.stages:synthesis_stage",
                           {"generator": "senior_dpo", "tasks": "brainstorm"}, ("synthesis", "mixture", "run.seed"),
                           doc="generator synthesizes at scale (D_syn)"),
    "teacher_synthesis": StageSpec("teacher_synthesis", "speed_ray.teacher.stages:teacher_synthesis_stage",
                                   {"tasks": "brainstorm"}, ("synthesis.n_samples", "mixture", *_TEACHER,
                                                             "teacher.sampling", "run.seed"), True,
                                   "the teacher itself synthesizes (direct baseline)"),
    "revision": StageSpec("revision", "speed_ray.generate.stages:revision_stage",
                          {"samples": "synthesis", "revisor": "revisor_sft"}, ("revision", "run.seed"),
                          doc="revisor refines each sample once (D_syn^re)"),
    "dedup": StageSpec("dedup", "speed_ray.dedup.stage:dedup_stage", {"samples": "revision"},
                       ("dedup", "filters"), doc="exact + MinHash-LSH dedup, then quality filters"),
    "train_embedder": StageSpec("train_embedder", "speed_ray.embedder.stage:train_embedder_stage",
                                {"data": "dedup"}, ("embedder", "run.seed"), doc="contrastive training of the embedder"),
    "evaluate": StageSpec("evaluate", "speed_ray.evaluate.stage:evaluate_stage", {"model": "train_embedder"},
                          ("evaluate",), doc="MTEB evaluation of the trained embedder"),
}

VARIANTS = ("full", "sft_only", "no_dpo", "no_revisor", "direct_instruct", "direct_teacher")


def _rewire(spec: StageSpec, **inputs: str | None) -> StageSpec:
    new = {k: v for k, v in {**spec.inputs, **inputs}.items() if v is not None}
    return StageSpec(spec.name, spec.fn, new, spec.config_keys, spec.uses_teacher, spec.doc, spec.version)


def build_plan(variant: str) -> list[StageSpec]:
    """The ordered stages of one variant (SPEED Table 2 ablations and Table 1 direct baselines)."""
    s = dict(_ALL)
    head = ["topics", "brainstorm"]
    tail = ["dedup", "train_embedder", "evaluate"]
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


def _select(cfg_dict: dict, dotted: str) -> Any:
    node: Any = cfg_dict
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _inputs_dict(cfg: Any) -> Any:
    """to_dict(cfg) without the fields that only check a stage's output (field metadata {"fingerprint": False},
    e.g. min_valid_share): changing a check must not orphan the shards it judged."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: _inputs_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                if f.metadata.get("fingerprint", True)}
    return to_dict(cfg)


def fingerprint_settings(cfg: RunConfig, spec: StageSpec) -> dict[str, Any]:
    """The settings a stage's fingerprint hashes (also recorded in its manifest): its config_keys' values."""
    cfg_dict = _inputs_dict(cfg)
    return {k: _select(cfg_dict, k) for k in spec.config_keys}


def fingerprints(cfg: RunConfig, plan: list[StageSpec]) -> dict[str, str]:
    """Each stage's fingerprint: its settings, its version and its inputs' fingerprints."""
    out: dict[str, str] = {}
    for spec in plan:
        settings = fingerprint_settings(cfg, spec)
        inputs = {role: out[up] for role, up in sorted(spec.inputs.items())}
        out[spec.name] = stable_hash({"stage": spec.name, "v": f"{STAGE_VERSION}.{spec.version}", "settings": settings,
                                      "inputs": inputs})
    return out


class StageError(RuntimeError):
    """A stage failed; what it already wrote stays in the store for the next run to resume from."""


@dataclass
class StageContext:
    """What a stage function gets: its config, its output dir, its inputs by role, and a cost ledger."""

    cfg: RunConfig
    name: str
    out: StageOutput
    inputs: dict[str, StageOutput]
    store: RunStore
    run_name: str
    ledger: CostLedger = field(default_factory=CostLedger)
    _services: dict = field(default_factory=dict)

    def log(self, msg: str, *args: Any) -> None:
        log.info(f"[{self.name}] " + msg, *args)

    def teacher_base_url(self) -> str:
        """The teacher endpoint; starts the local OpenAI-compatible server when the config asks for one."""
        if self.cfg.teacher.base_url:
            return self.cfg.teacher.base_url
        with self._services.setdefault("lock", threading.Lock()):   # concurrent teacher stages start it once
            if "teacher_url" not in self._services:
                from speed_ray.generate.server import start_local_server

                self._services["teacher_url"] = start_local_server(self.cfg.teacher.local_server, self.cfg.run,
                                                                     (self.cfg.teacher.model,))
            return self._services["teacher_url"]


def _load(fn: str) -> Callable[[StageContext], dict | None]:
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


def run_pipeline(cfg: RunConfig, stages: list[str] | None = None, force: list[str] | None = None) -> dict[str, Any]:
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
                                                                    "inputs": s.inputs} for s in plan]})
    dump_config(cfg, store.run_url(run_name, "config.yaml"))
    summary: dict[str, Any] = {"run": run_name, "run_dir": cfg.run.run_dir, "stages": {}}
    services: dict = {}
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
            if spec.name in forced:
                moved = out.set_aside()
                if moved:
                    log.info("[%s] forced: its previous output is set aside at %s", spec.name, moved)
            todo.append(spec)
    try:
        for group in stage_groups(todo, cfg.pipeline.concurrent_teacher_stages):
            if not any(spec.uses_teacher for spec in group):
                # A local teacher holds CPUs (or a GPU) and memory that training and synthesis need; on a small
                # cluster Ray Data's other operators would wait on them forever. It restarts when needed again.
                _stop_services(services)
            run = lambda spec: _run_stage(cfg, spec, store, fps, run_name, services)  # noqa: E731
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
        _stop_services(services)
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


def _run_stage(cfg: RunConfig, spec: StageSpec, store: RunStore, fps: dict[str, str], run_name: str,
               services: dict) -> dict:
    """Run one stage into its output dir and write its manifest; returns its summary entry."""
    out = store.stage(spec.name, fps[spec.name])
    inputs = {}
    for role, up in spec.inputs.items():
        up_out = store.stage(up, fps[up])
        if not up_out.done:
            raise StageError(f"stage {spec.name!r} needs {up!r}, which has not completed; "
                             f"run it first or add it to --stages")
        inputs[role] = up_out
    out.clear_manifest()
    ctx = StageContext(cfg=cfg, name=spec.name, out=out, inputs=inputs, store=store, run_name=run_name,
                       _services=services)
    resumed = len(out.shard_names())
    log.info("[%s] running -> %s%s", spec.name, out.url,
             f" (resuming: {resumed} shard(s) already written)" if resumed else "")
    t0 = time.time()
    try:
        extra = _load(spec.fn)(ctx) or {}
    except Exception as e:  # keep everything written so far; the next run resumes from it
        raise StageError(f"stage {spec.name!r} failed: {type(e).__name__}: {e}\n"
                         f"(its partial output stays at {out.url}; rerun to resume)\n"
                         + traceback.format_exc(limit=6)) from e
    t1 = time.time()
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


def _brief(m: dict) -> dict:
    return {"fingerprint": m.get("fingerprint"), "rows": m.get("rows"), "duration_s": m.get("duration_s"),
            "cost": m.get("cost", {}), "url": None}


def _stop_services(services: dict) -> None:
    if "teacher_url" in services:
        try:
            from speed_ray.generate.server import stop_local_server

            stop_local_server()
            log.info("stopped the local teacher server")
        except Exception as e:  # never mask the run's own outcome
            log.warning("could not stop the local teacher server: %s", e)
        services.pop("teacher_url", None)
