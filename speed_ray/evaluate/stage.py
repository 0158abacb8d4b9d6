"""The pipeline's last stage: MTEB evaluation of the trained embedder (and baselines side by side)."""

from __future__ import annotations

import os
import time

from speed_ray.stage import StageContext


def evaluate_stage(ctx: StageContext) -> dict:
    """inputs["model"]: the train_embedder stage (manifest "model_path"). Writes results.json/.md as artifacts."""
    from speed_ray.evaluate.run import run_evaluation

    cfg = ctx.cfg.evaluate
    model_path = ctx.inputs["model"].manifest.get("model_path")
    if not model_path:
        raise ValueError(f"the {ctx.inputs['model'].stage} stage's manifest has no model_path")
    run_dir = ctx.cfg.run.run_dir
    # A local run directory keeps its own embedding cache, so reruns and sibling runs reuse embeddings.
    cache_dir = None if "://" in run_dir else os.path.join(run_dir, "cache", "embeddings")
    t0, cpu0 = time.time(), time.process_time()
    options = eval_task_options(cfg)
    if options is None:
        results = run_evaluation(model_path, cfg, ctx.out.artifact(), label=ctx.run_name, cache_dir=cache_dir)
    else:
        # The driver (often a CPU head node) never loads the model: the evaluation runs in a Ray task that asks
        # for the GPU it encodes with, and fans large corpora out to encoder actors (evaluate.distributed).
        from speed_ray.raylocal import ensure_ray

        ensure_ray(ctx.cfg.run.ray_address, ctx.cfg.run.num_cpus)
        import ray

        ctx.log("evaluating in a Ray task with %s", options)
        task = ray.remote(run_evaluation).options(**options)
        results = ray.get(task.remote(model_path, cfg, ctx.out.artifact(), label=ctx.run_name,
                                      cache_dir=cache_dir))
    if cfg.use_gpu:
        ctx.ledger.gpu_seconds += time.time() - t0
    else:
        ctx.ledger.cpu_seconds += time.process_time() - cpu0
    primary = results["models"][results["primary"]]
    for s in results["skipped"]:
        ctx.log("skipped %s: data file not found: %s", s["task"], s["missing"])
    for task, n in (results.get("skipped_lines") or {}).items():
        ctx.log("%s: skipped %d bad lines (skip_bad_lines)", task, n)
    ctx.log("average %s over %d tasks", primary["averages"].get("average"), primary["averages"].get("n_tasks", 0))
    return {
        "scores": primary["scores"],
        "averages": primary["averages"],
        "results_path": ctx.out.artifact("results.json"),
        "results_md": ctx.out.artifact("results.md"),
        "skipped": results["skipped"],
        "skipped_lines": results.get("skipped_lines") or {},
        "baselines": {k: {"model": v["model"], "scores": v["scores"], "averages": v["averages"]}
                      for k, v in results["models"].items() if k != results["primary"]},
        "encoded_texts": {k: v.get("encoded_texts", 0) for k, v in results["models"].items()},
    }


def eval_task_options(cfg) -> dict | None:
    """Ray resources of the evaluation process, or None to evaluate in this process (CPU, not distributed).

    use_gpu: the task holds one GPU for the inputs it encodes itself (below distributed_min_texts); the encoder
    actors of a distributed evaluation ask for their own."""
    if not (cfg.use_gpu or cfg.distributed):
        return None
    return {"num_cpus": 1, "num_gpus": 1 if cfg.use_gpu else 0}
