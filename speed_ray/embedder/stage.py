"""The train_embedder stage: dedup rows -> training triples -> Ray Train TorchTrainer -> SentenceTransformer dir."""

from __future__ import annotations

import dataclasses
import time

from speed_ray.config import to_dict
from speed_ray.embedder.data import (DataError, load_public, make_batches, mix_public, select_rows, to_triples)

_ROW_COLUMNS = ["id", "task_type", "task", "query", "positive", "negative"]


def prepare_triples(rows: list[dict], cfg, seed: int) -> tuple[list[dict], dict]:
    """The training set of one run and a summary of how it was made (rows dropped, per-type counts)."""
    picked = select_rows(rows, cfg.n_samples, cfg.task_types, seed)
    triples, dropped = to_triples(picked, cfg.symmetric_task_types)
    n_public = 0
    if cfg.public_fraction > 0:
        public, _ = to_triples(load_public(cfg.public_data), cfg.symmetric_task_types, source="public")
        mixed = mix_public(triples, public, cfg.public_fraction, seed)
        n_public = len(mixed) - len(triples)
        triples = mixed
    counts: dict[str, int] = {}
    for t in triples:
        counts[t["task_type"]] = counts.get(t["task_type"], 0) + 1
    return triples, {"rows_in": len(rows), "rows_selected": len(picked), "rows_dropped_incomplete": dropped,
                     "public_rows": n_public, "triples": len(triples), "per_task_type": counts}


def train_embedder_stage(ctx) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    from speed_ray.models.offline import resolve_model
    from speed_ray.raylocal import ensure_ray

    cfg, seed = ctx.cfg.embedder, ctx.cfg.run.seed
    rows = ctx.inputs["data"].read_rows(columns=_ROW_COLUMNS)
    triples, data_summary = prepare_triples(rows, cfg, seed)
    n_batches = len(make_batches(triples, cfg.batch_size, cfg.one_task_per_batch, seed, 0))
    if n_batches == 0:
        raise DataError(f"{len(triples)} usable triples cannot fill one batch of embedder.batch_size="
                        f"{cfg.batch_size} (after n_samples/task_types filters: {data_summary}); lower batch_size")
    data_url = ctx.out.artifact("train_triples.parquet")
    ctx.out.fs.makedirs(ctx.out._path(ctx.out.artifacts_url), exist_ok=True)
    _write_parquet(ctx.out, data_url, triples)   # the exact training set, kept for lineage
    ctx.log("%d triples -> %d batches of %d on %d worker(s)", len(triples), n_batches, cfg.batch_size,
            cfg.num_workers)

    ensure_ray(ctx.cfg.run.ray_address, ctx.cfg.run.num_cpus)
    model_url = ctx.out.artifact("model")
    loop_config = {"embedder": to_dict(cfg), "model_path": resolve_model(cfg.base_model), "data_url": data_url,
                   "export_url": model_url, "seed": seed, "query_instruction": cfg.query_instruction}
    # Same name + storage path on a rerun: Ray Train restores its checkpoint manager and get_checkpoint()
    # returns the latest checkpoint, so a killed stage continues from its last save_steps. Storage keeps the two
    # newest checkpoints (each a single file from rank 0, see train._report_with_checkpoint).
    run_config = ray.train.RunConfig(name="train", storage_path=_storage_path(ctx.out.artifact("ray_train")),
                                     failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                                     checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2))
    scaling = ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                      resources_per_worker=None if cfg.use_gpu else {"CPU": 1})
    t0 = time.time()
    result = TorchTrainer(_train_func, train_loop_config=loop_config, scaling_config=scaling,
                          run_config=run_config).fit()
    wall = time.time() - t0
    if result.error:
        raise result.error
    m = result.metrics or {}
    from speed_ray.embedder.train import loss_summary

    seconds = wall * cfg.num_workers
    if cfg.use_gpu:
        ctx.ledger.gpu_seconds += seconds
    else:
        ctx.ledger.cpu_seconds += seconds
    return {"model_path": model_url,
            "metrics": {"loss": loss_summary(m.get("losses", [])), "steps": m.get("step"),
                        "steps_this_attempt": m.get("steps_this_attempt"), "resumed_from_step": m.get("resumed_from_step"),
                        "samples_per_s": m.get("samples_per_s"), "train_seconds": m.get("train_seconds"),
                        "precision": m.get("precision"), "skipped_steps": m.get("skipped_steps"),
                        "weights_in_sync": m.get("weights_in_sync"), "wall_seconds": wall, "data": data_summary},
            "train_config": dataclasses.asdict(cfg) | {"resolved_model": loop_config["model_path"]}}


def _train_func(config: dict) -> None:
    from speed_ray.embedder.train import train_func

    train_func(config)


def _storage_path(url: str) -> str:
    import os

    return url if "://" in url else os.path.abspath(url)


def _write_parquet(out, url: str, rows: list[dict]) -> None:
    import pyarrow.parquet as pq

    from speed_ray.store import to_table

    with out.fs.open(out._path(url), "wb") as f:
        pq.write_table(to_table(rows), f)
