"""Run an evaluation: resolve the task set (mteb benchmark, mteb tasks, local YAML tasks), evaluate each model
through `mteb.evaluate`, and write results.json + results.md."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from speed_ray.config import ConfigError, to_dict
from speed_ray.evaluate.compare import RESULTS_FORMAT, averages, columns_of, to_markdown
from speed_ray.evaluate.config import EvalConfig
from speed_ray.evaluate.local_tasks import LocalTaskError, load_spec

log = logging.getLogger("speed_ray.evaluate")
REPO = Path(__file__).resolve().parents[2]


def default_cache_dir() -> str:
    return str(Path(os.environ.get("SPEED_RAY_CACHE", Path.home() / ".cache" / "speed-ray")) / "embeddings")


def find_task_yaml(path: str) -> Path:
    """A local task YAML as given (relative to the working directory), else relative to the project root."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    return REPO / p if (REPO / p).exists() else p


def resolve_tasks(cfg: EvalConfig) -> tuple[list[Any], list[dict[str, str]]]:
    """The mteb task objects to run, and the local tasks skipped because their files are missing."""
    tasks: list[Any] = []
    skipped: list[dict[str, str]] = []
    if cfg.benchmark or cfg.tasks:
        import mteb

        if cfg.benchmark:
            try:
                tasks += list(mteb.get_benchmark(cfg.benchmark).tasks)
            except (KeyError, ValueError) as e:
                raise ConfigError(f"unknown mteb benchmark {cfg.benchmark!r}: {e}", "evaluate.benchmark") from None
        if cfg.tasks:
            try:
                tasks += list(mteb.get_tasks(tasks=list(cfg.tasks), languages=["eng"]))
            except (KeyError, ValueError) as e:
                raise ConfigError(f"unknown mteb task in {list(cfg.tasks)}: {e}", "evaluate.tasks") from None
    from speed_ray.evaluate.mteb_tasks import build_task

    for path in cfg.local_tasks:
        spec = load_spec(find_task_yaml(path), cfg.data_root)
        missing = spec.missing_files()
        if missing:
            log.warning("skipping local task %s (%s): data file not found: %s (data_root %s; set "
                        "evaluate.data_root or $SPEED_RAY_EVALDATA)", spec.name, path, missing[0], spec.data_root)
            skipped.append({"task": spec.name, "yaml": str(path), "missing": str(missing[0])})
            continue
        tasks.append(build_task(spec, cfg.limit))
    names = [t.metadata.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"task {dup[0]!r} is listed twice (benchmark, tasks and local_tasks overlap)",
                          "evaluate")
    if not tasks and not skipped:
        raise ConfigError("no tasks: set evaluate.benchmark, evaluate.tasks or evaluate.local_tasks", "evaluate")
    return tasks, skipped


def make_encoder(model: str, cfg: EvalConfig, label: str | None = None, cache_dir: str | None = None):
    from speed_ray.evaluate.encoder import Embedder

    cache = (cfg.cache_dir or cache_dir or default_cache_dir()) if cfg.cache else None
    return Embedder(model, label=label, batch_size=cfg.batch_size, max_length=cfg.max_length,
                    instructions=cfg.instructions, cache_dir=cache, distributed=cfg.distributed,
                    distributed_min_texts=cfg.distributed_min_texts, num_workers=cfg.num_workers,
                    use_gpu=cfg.use_gpu, device="cuda" if cfg.use_gpu else None)


def evaluate_model(encoder: Any, tasks: list[Any], cfg: EvalConfig) -> dict[str, Any]:
    """One model on every task: main score ×100 per task, its mteb category, full scores, and averages."""
    import mteb

    from speed_ray.evaluate.mteb_tasks import limit_loaded_task

    scores: dict[str, float] = {}
    types: dict[str, str] = {}
    details: dict[str, Any] = {}
    t0 = time.time()
    for task in tasks:
        name = task.metadata.name
        if cfg.limit and not hasattr(task, "local_spec"):
            # An aggregate task (CQADupstackRetrieval) is limited through its sub-tasks.
            for sub in getattr(task.metadata, "tasks", None) or [task]:
                if not sub.data_loaded:
                    sub.load_data()
                    limit_loaded_task(sub, cfg.limit)
        log.info("evaluating %s on %s", encoder.label, name)
        res = mteb.evaluate(encoder, [task], cache=None, overwrite_strategy="always", show_progress_bar=False,
                            encode_kwargs={"batch_size": cfg.batch_size})
        if res.exceptions:
            raise RuntimeError(f"mteb failed on {name}: {res.exceptions[0].exception}")
        tr = res.task_results[0]
        score = float(tr.get_score()) * 100
        scores[name] = round(score, 4) if not math.isnan(score) else score
        types[name] = task.metadata.type
        details[name] = {"main_score": task.metadata.main_score, "scores": tr.to_dict().get("scores", {})}
        report = getattr(task, "local_report", None)
        if report and report.get("skipped_lines") is not None:    # a local task: bad lines it left out
            details[name]["skipped_lines"] = report["skipped_lines"]
            if report["skipped_lines"]:
                details[name]["skipped_examples"] = list(report["skipped_examples"])
    return {"scores": scores, "types": types, "averages": averages(scores, types), "details": details,
            "encoded_texts": encoder.encoded_texts, "seconds": round(time.time() - t0, 1)}


def run_evaluation(model: str, cfg: EvalConfig, out_dir: str | None, *, label: str | None = None,
                   cache_dir: str | None = None, baseline_labels: dict[str, str] | None = None) -> dict[str, Any]:
    """Evaluate `model` and cfg.baselines on cfg's tasks; write results.json and results.md to out_dir."""
    tasks, skipped = resolve_tasks(cfg)
    label = label or _label(model)
    results: dict[str, Any] = {"format": RESULTS_FORMAT, "primary": label, "models": {}, "skipped": skipped,
                               "limit": cfg.limit, "instructions": cfg.instructions, "config": to_dict(cfg)}
    for i, m in enumerate([model, *cfg.baselines]):
        name = label if i == 0 else (baseline_labels or {}).get(m) or _label(m)
        if name in results["models"]:
            name = f"{name}#{i}"
        enc = make_encoder(m, cfg, name, cache_dir)
        entry = evaluate_model(enc, tasks, cfg) if tasks else {"scores": {}, "types": {}, "averages": {}}
        results["models"][name] = {"model": m, "path": enc.path, **entry}
    results["skipped_lines"] = skipped_lines(tasks)
    if out_dir:
        write_results(results, out_dir)
    return results


def write_results(results: dict[str, Any], out_dir: str) -> dict[str, str]:
    """results.json and results.md in out_dir (local path or fsspec URL), each written whole."""
    import fsspec

    paths = {"json": f"{out_dir.rstrip('/')}/results.json", "markdown": f"{out_dir.rstrip('/')}/results.md"}
    md = to_markdown(columns_of(results), title="MTEB results")
    if results.get("skipped"):
        md += "\nSkipped (data files not found): " + ", ".join(
            f"{s['task']} ({s['missing']})" for s in results["skipped"]) + "\n"
    if results.get("skipped_lines"):
        md += "\nBad lines skipped (skip_bad_lines): " + ", ".join(
            f"{task} {n}" for task, n in results["skipped_lines"].items()) + "\n"
    if results.get("limit"):
        md += f"\nSmoke test: at most {results['limit']} examples per task (scores are not comparable to MTEB).\n"
    for key, text in (("json", json.dumps(results, indent=2, default=str)), ("markdown", md)):
        with fsspec.open(paths[key], "w", auto_mkdir=True) as f:
            f.write(text)
    return paths


def skipped_lines(tasks: list[Any]) -> dict[str, int]:
    """{task: bad lines left out} for the local tasks whose YAML set skip_bad_lines and that had some."""
    out = {}
    for task in tasks:
        n = (getattr(task, "local_report", None) or {}).get("skipped_lines")
        if n:
            out[task.metadata.name] = n
    return out


def _label(model: str) -> str:
    return model if model.startswith("offline:") else Path(model.rstrip("/")).name or model


__all__ = ["run_evaluation", "resolve_tasks", "evaluate_model", "write_results", "LocalTaskError"]
