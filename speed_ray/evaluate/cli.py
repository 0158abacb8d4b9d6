"""`speed-ray evaluate` and `speed-ray compare`: the same code paths as the pipeline's evaluate stage."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from speed_ray.config import ConfigError


def _eval_config(args: argparse.Namespace):
    from speed_ray.run_config import build_config, load_config
    from speed_ray.config import apply_overrides

    overrides = list(getattr(args, "overrides", None) or [])
    if args.config:
        cfg = load_config(args.config, overrides).evaluate
    else:
        try:
            data = apply_overrides({}, overrides)
        except ConfigError as e:
            raise ConfigError(str(e).split(": ", 1)[-1], e.key, "command line") from None
        cfg = build_config(data, "command line").evaluate
    changes = {}
    csv = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
    if args.tasks:
        changes["tasks"] = csv(args.tasks)
    if args.local_tasks:
        changes["local_tasks"] = csv(args.local_tasks)
    if args.benchmark:
        changes["benchmark"] = args.benchmark
    if args.limit is not None:
        changes["limit"] = args.limit
    return dataclasses.replace(cfg, **changes) if changes else cfg


def resolve_model_arg(model: str) -> tuple[str, str | None]:
    """A model reference, or a run directory -> its newest finished train_embedder model. Returns (model, label)."""
    from speed_ray.store import find_run_model

    if model.startswith("offline:") or ("://" not in model and not Path(model).is_dir()):
        return model, None
    path = find_run_model(model)
    return (model, None) if path is None else (path, Path(model.rstrip("/")).name)


def evaluate_main(args: argparse.Namespace) -> int:
    from speed_ray.evaluate.compare import columns_of, main_scores, to_markdown
    from speed_ray.evaluate.run import run_evaluation

    cfg = _eval_config(args)
    model, label = resolve_model_arg(args.model)
    label = label or (model if model.startswith("offline:") else Path(model.rstrip("/")).name)
    out = args.out or str(Path("eval-results") / label.replace(":", "_").replace("/", "_"))
    results = run_evaluation(model, cfg, out, label=label)
    print(to_markdown(columns_of(results)))
    for s in results["skipped"]:
        print(f"skipped {s['task']}: data file not found: {s['missing']}")
    for task, n in (results.get("skipped_lines") or {}).items():
        print(f"{task}: skipped {n} bad line{'' if n == 1 else 's'} (skip_bad_lines)")
    print(f"results: {out}/results.json, {out}/results.md")
    print(json.dumps(main_scores(results)))
    return 0


def compare_main(args: argparse.Namespace) -> int:
    from speed_ray.evaluate.compare import gather, table, to_markdown

    cols = gather(list(args.paths))
    md = to_markdown(cols, title="MTEB comparison")
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(md)
        (out / "compare.json").write_text(json.dumps(table(cols), indent=2))
    print(json.dumps({label: entry.get("scores", {}) for label, entry in cols}))
    return 0
