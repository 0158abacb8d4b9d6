"""The synthetic-data influence study (seed 002, Sec. 3): one embedder per subset of the synthetic categories, all
evaluated on the same tasks, then each category's influence per task and per task category with bootstrap
significance. The empty subset is the base embedder, evaluated as is."""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

import numpy as np

from speed_ray.pipeline import Loader, StageSpec, fingerprints, load_stage, plan_status, run_stage
from speed_ray.run_config import RunConfig, load_config, replace
from speed_ray.stage import StageContext
from speed_ray.store import RunStore
from speed_ray.studies.influence import all_subsets, by_task_category, compute_influence

log = logging.getLogger("speed_ray")

# The untrained base embedder's evaluation: a stage of its own so it is stored, fingerprinted and reused.
BASE_SPEC = StageSpec("evaluate_base", "speed_ray.studies.influence_job:evaluate_base_stage", {},
                      ("embedder.base_model", "evaluate"), doc="evaluate the base embedder as is")


def evaluate_base_stage(ctx: StageContext) -> dict:
    """Evaluate embedder.base_model untrained, with the run's evaluate settings (the influence study's empty set)."""
    import os

    from speed_ray.evaluate.run import run_evaluation

    cfg = ctx.cfg.evaluate
    run_dir = ctx.cfg.run.run_dir
    cache_dir = None if "://" in run_dir else os.path.join(run_dir, "cache", "embeddings")
    cpu0 = time.process_time()
    results = run_evaluation(ctx.cfg.embedder.base_model, cfg, ctx.out.artifact(), label="base",
                             cache_dir=cache_dir)
    ctx.ledger.cpu_seconds += time.process_time() - cpu0
    primary = results["models"][results["primary"]]
    return {"scores": primary["scores"], "averages": primary["averages"], "types": primary.get("types", {}),
            "results_path": ctx.out.artifact("results.json"), "model_path": ctx.cfg.embedder.base_model}


def _run_base(cfg: RunConfig, loader: Loader | None = None) -> dict:
    """Run (or skip, when done) the base-model evaluation; returns its manifest with its state."""
    store = RunStore(cfg.run.run_dir)
    fps = fingerprints(cfg, [BASE_SPEC])
    entry = run_stage(cfg, BASE_SPEC, fps, store=store, loader=loader or load_stage)
    return {**store.stage(BASE_SPEC.name, fps[BASE_SPEC.name]).manifest, "state": entry["state"]}


def subset_name(run_name: str, subset: tuple[str, ...]) -> str:
    return f"{run_name}-infl-{'+'.join(subset) if subset else 'base'}"


def subset_config(cfg: RunConfig, subset: tuple[str, ...]) -> RunConfig:
    """The config that trains on exactly these categories (n_samples: rows per category x categories)."""
    over = [f"run.name={subset_name(cfg.run.name, subset)}", f"embedder.task_types={json.dumps(list(subset))}"]
    per = cfg.influence.n_samples
    over.append(f"embedder.n_samples={per * len(subset) if per else 'null'}")
    return replace(cfg, over)


def task_categories(cfg: RunConfig, manifests: list[dict]) -> dict[str, str]:
    """Task -> mteb task type: from the evaluations' results.json, local tasks' YAML, then mteb's metadata."""
    import fsspec

    types: dict[str, str] = {}
    for m in manifests:
        types.update(m.get("types") or {})
        path = m.get("results_path")
        if path and not types:
            try:
                with fsspec.open(path, "r") as f:
                    res = json.load(f)
                types.update(res["models"][res["primary"]].get("types", {}))
            except (OSError, KeyError, ValueError):
                pass
    if cfg.evaluate.local_tasks:
        try:
            from speed_ray.evaluate.local_tasks import MTEB_TYPES, load_spec
            from speed_ray.evaluate.run import find_task_yaml

            for p in cfg.evaluate.local_tasks:
                spec = load_spec(find_task_yaml(p), cfg.evaluate.data_root)
                types.setdefault(spec.name, MTEB_TYPES.get(spec.type, spec.type))
        except Exception as e:  # a missing data root must not sink the study; tasks fall back to "Other"
            log.debug("local task types unavailable: %s", e)
    missing = {t for m in manifests for t in (m.get("scores") or {})} - set(types)
    if missing:
        try:
            import mteb

            for t in missing:
                types[t] = mteb.get_task(t).metadata.type
        except Exception as e:
            log.debug("mteb task types unavailable for %s: %s", sorted(missing), e)
    return types


def run_influence(cfg: RunConfig, loader: Loader | None = None) -> dict[str, Any]:
    """Train and evaluate 2^k - 1 embedders (+ the base one), compute influence, write tables and heatmaps.
    `loader`: the stage functions (default: the real ones)."""
    from speed_ray.studies.sweep import run_points

    inf = cfg.influence
    subsets = all_subsets(inf.categories)
    trained = [s for s in subsets if s]
    cfgs = [subset_config(cfg, s) for s in trained]
    log.info("influence %s: %d categories -> %d models (+ base)", cfg.run.name, len(inf.categories), len(trained))
    summaries = run_points(cfgs, inf.max_concurrent, inf.num_cpus_per_point, inf.num_gpus_per_point,
                           loader=loader)
    base = _run_base(cfg, loader)
    manifests = [base]
    states = {"": base["state"]}
    for s, c, summ in zip(trained, cfgs, summaries):
        rows = {r["stage"]: r for r in plan_status(c)}
        manifests.append(rows["evaluate"]["manifest"] or {})
        states["+".join(s)] = {k: v["state"] for k, v in summ["stages"].items() if k in ("train_embedder", "evaluate")}
    order = [()] + trained
    tasks = sorted(set.intersection(*[set(m.get("scores") or {}) for m in manifests]))
    if not tasks:
        raise ValueError("the influence models share no evaluated task; check evaluate.tasks / local_tasks")
    scores = np.array([[m["scores"][t] for t in tasks] for m in manifests], float)
    res = compute_influence(order, scores, list(inf.categories), tasks, inf.n_bootstrap, inf.alpha, cfg.run.seed)
    types = task_categories(cfg, manifests)
    by_cat = by_task_category(res, types, inf.n_bootstrap, inf.alpha, cfg.run.seed)
    paths = write_outputs(RunStore(cfg.run.run_dir), cfg.run.name, order, manifests, res, by_cat, types)
    return {"models": [{"subset": list(s), "scores": m.get("scores", {})} for s, m in zip(order, manifests)],
            "result": res, "by_category": by_cat, "states": states, "paths": paths}


def _md_table(result, title: str) -> list[str]:
    lines = [f"## {title}", "", "| category | " + " | ".join(result.tasks) + " |", "|---|" + "---|" * len(result.tasks)]
    for i, c in enumerate(result.categories):
        cells = [f"{result.normalized[i, j]:+.2f}{'*' if result.significant[i, j] else ''}"
                 for j in range(len(result.tasks))]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines + ["", "Normalized influence: mean score with the category minus without it, over the task's "
                        "standard deviation across models; * = the bootstrap 95% interval excludes 0.", ""]


def write_outputs(store: RunStore, run_name: str, order, manifests, res, by_cat, types) -> dict[str, str]:
    """runs/<name>/influence/{models.json, influence.json, influence.md, heatmap.png, heatmap_by_category.png}."""
    from speed_ray.studies.plots import influence_heatmap
    from speed_ray.studies.sweep import _local_png, _write_text

    base = store.run_url(run_name, "influence")
    paths = {"models": f"{base}/models.json", "json": f"{base}/influence.json", "markdown": f"{base}/influence.md",
             "heatmap": f"{base}/heatmap.png", "heatmap_by_category": f"{base}/heatmap_by_category.png"}
    store.write_json(paths["models"], [{"subset": list(s), "run": subset_name(run_name, s),
                                        "scores": m.get("scores", {}),
                                        "average": (m.get("averages") or {}).get("average")}
                                       for s, m in zip(order, manifests)])
    store.write_json(paths["json"], {"per_task": res.table(), "per_task_category": by_cat.table(),
                                     "task_types": types})
    _local_png(store, paths["heatmap"], lambda p: influence_heatmap(p, res, "Influence per task (* significant)"))
    _local_png(store, paths["heatmap_by_category"],
               lambda p: influence_heatmap(p, by_cat, "Influence per task category (* significant)"))
    md = [f"# Influence study: {run_name}", "", f"{len(order)} models (every subset of {len(res.categories)} "
          "categories; the empty subset is the base embedder).", "", "| trained on | average |", "|---|---|"]
    for s, m in zip(order, manifests):
        avg = (m.get("averages") or {}).get("average")
        md.append(f"| {'+'.join(s) or '(base)'} | {avg:.2f} |" if isinstance(avg, (int, float)) else
                  f"| {'+'.join(s) or '(base)'} | – |")
    md += ["", "![per task](heatmap.png)", ""] + _md_table(res, "Per task")
    md += ["![per task category](heatmap_by_category.png)", ""] + _md_table(by_cat, "Per task category")
    _write_text(store, paths["markdown"], "\n".join(md))
    return paths


def influence_main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, list(getattr(args, "overrides", None) or []))
    logging.getLogger("speed_ray").setLevel(cfg.run.log_level)
    out = run_influence(cfg)
    res = out["result"]
    print(f"influence {cfg.run.name}: {len(out['models'])} models, {len(res.tasks)} tasks")
    for row in res.table():
        if row["significant"]:
            print(f"  {row['category']} -> {row['task']}: {row['normalized']:+.2f} [{row['lo']:+.2f}, {row['hi']:+.2f}]")
    print(f"outputs: {out['paths']['markdown']}")
    return 0
