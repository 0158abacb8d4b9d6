"""`speed-ray train-embedder DATA --base-model M`: the embedder stage on a user's own pairs or triples.

The same Ray Train loop, feed, config section and outputs as the pipeline's train_embedder stage. The output
directory is a run directory (stages/own_data/<fp>/ holds the imported rows, stages/train_embedder/<fp>/ the
trained SentenceTransformer and its manifest), so `speed-ray evaluate OUT` and `speed-ray serve OUT` take it
as they take any run; a rerun with the same data and settings is skipped, a killed one resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time

log = logging.getLogger("speed_ray.embedder")


def _data_signature(path: str) -> list:
    """What identifies the input: every file's path, size and mtime (a changed file re-imports)."""
    from speed_ray.embedder.own_data import input_files

    _, files = input_files(path)
    return [[os.path.abspath(f), os.path.getsize(f), int(os.path.getmtime(f))] for f in files]


def _config(args: argparse.Namespace):
    from speed_ray.config import apply_overrides, to_dict
    from speed_ray.run_config import build_config, load_config

    base = load_config(args.config, []) if args.config else build_config({}, "defaults")
    data = to_dict(base)
    data["embedder"]["base_model"] = args.base_model
    data["embedder"]["train_pairs"] = True
    data["run"]["run_dir"] = args.out
    return build_config(apply_overrides(data, args.overrides or []), "command line")


def train_embedder_main(args: argparse.Namespace) -> int:
    from speed_ray.embedder.own_data import Columns, import_data
    from speed_ray.pipeline import fingerprints, run_stage, stage_spec
    from speed_ray.raylocal import ensure_ray
    from speed_ray.store import RunStore, stable_hash

    if not os.path.exists(args.data):
        raise FileNotFoundError(f"training data {args.data} does not exist")
    args.out = args.out or os.path.join("runs", "own-" + os.path.basename(os.path.normpath(args.data)).split(".")[0])
    cfg = _config(args)
    cols = Columns(query=args.query_column, positive=args.positive_column,
                   negative=None if args.no_negatives else args.negative_column, task=args.task_column,
                   id=args.id_column, task_type=args.task_type_column,
                   negative_required=args.negative_column != "negative")
    store = RunStore(cfg.run.run_dir)
    ensure_ray(cfg.run.ray_address, cfg.run.num_cpus)

    data_fp = stable_hash({"data": _data_signature(args.data), "columns": dataclasses.asdict(cols),
                           "task": args.task, "task_type": args.task_type})
    data_out = store.stage("own_data", data_fp)
    if not data_out.done:
        for old in data_out.shard_names():   # an interrupted import: its shards are redone from the files
            data_out.fs.rm(data_out._path(data_out.shard_url(old)))
        t0 = time.time()
        info = import_data(args.data, data_out, cols, args.task or "", args.task_type)
        data_out.write_manifest({"stage": "own_data", "source": os.path.abspath(args.data), **info,
                                 "started_at": t0, "ended_at": time.time(), "fingerprint": data_fp})
        print(f"imported {info['rows']} rows ({info['pairs']} pairs) from {len(info['files'])} file(s)")
    # The pipeline's own stages and bookkeeping, reading the imported rows instead of dedup's: with --screen, the
    # screen stage first (false-negative screening, decontamination, scores; screen.mine=pairs mines negatives).
    specs = [stage_spec("train_embedder", data="own_data")]
    if args.screen:
        specs = [stage_spec("screen", samples="own_data"), stage_spec("train_embedder", data="screen")]
    fps = fingerprints(cfg, specs, known={"own_data": data_fp})
    for spec in specs:
        entry = run_stage(cfg, spec, fps, store=store, force=args.force)
        if spec.name == "screen":
            sm = store.stage(spec.name, fps[spec.name]).manifest.get("screen") or {}
            print(f"screened: kept {sm.get('rows_out')} of {sm.get('rows_in')} rows (removed: "
                  f"{sm.get('removed') or {}}; actions: {sm.get('actions') or {}})")
    result = store.stage(spec.name, fps[spec.name]).manifest
    if entry["state"] == "skipped":
        print(f"already trained: {result['model_path']} (--force to train again)")
        return 0
    m = result.get("metrics", {})
    data = m.get("data") or {}
    rows, pairs = data.get("triples"), data.get("pairs") or 0   # the feed's "triples" counts every training row
    print(json.dumps({"model_path": result["model_path"], "steps": m.get("steps"),
                      "loss": (m.get("loss") or {}).get("last"), "rows": rows,
                      "triples": None if rows is None else rows - pairs, "pairs": pairs}))
    print(f"evaluate it: speed-ray evaluate {cfg.run.run_dir} --local-tasks configs/tasks/stsb.yaml")
    return 0


def add_parser(p, sub) -> None:
    t = p.add_command(sub, "train-embedder", trailing="overrides",
                      help="train an embedder on your own pairs or triples (Parquet, JSONL, datasets dir)")
    t.add_argument("data", help="a Parquet file or directory, a JSONL file, or a local `datasets` directory")
    t.add_argument("--base-model", required=True, help="hub id, local path, or offline:minilm")
    t.add_argument("--out", help="output run directory (default: runs/own-<data name>)")
    t.add_argument("--config", help="YAML whose `embedder` and `run` sections are the defaults")
    t.add_argument("--query-column", default="query")
    t.add_argument("--positive-column", default="positive")
    t.add_argument("--negative-column", default="negative",
                   help="hard negatives (default: 'negative' where present; rows without one are pairs)")
    t.add_argument("--no-negatives", action="store_true", help="ignore any negative column: train on pairs")
    t.add_argument("--task-column", default="task", help="per-row instruction (default: 'task' where present)")
    t.add_argument("--task", help="the instruction for rows without one (none: queries get no instruction)")
    t.add_argument("--id-column", default="id")
    t.add_argument("--task-type-column", default="task_type")
    t.add_argument("--task-type", default="own", help="task type for rows without one")
    t.add_argument("--screen", action="store_true",
                   help="screen the rows first (the pipeline's screen stage: false negatives, decontamination, "
                        "scores; add screen.mine=pairs to mine hard negatives for pairs from your documents)")
    t.add_argument("--force", action="store_true", help="train again even if this data and config are done")
    t.add_argument("overrides", nargs="*", help="a.b=value overrides, e.g. embedder.batch_size=64")
    t.set_defaults(fn=_lazy_main)


def _lazy_main(args: argparse.Namespace) -> int:
    from speed_ray.config import check_overrides

    args.overrides = check_overrides(getattr(args, "overrides", None))
    return train_embedder_main(args)
