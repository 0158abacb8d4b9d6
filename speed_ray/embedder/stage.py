"""The train_embedder stage: dedup rows -> the training feed (feed.py) -> Ray Train TorchTrainer -> SentenceTransformer
dir."""

from __future__ import annotations

import dataclasses
import time

from speed_ray.config import to_dict
from speed_ray.embedder.feed import prepare_feed


def train_embedder_stage(ctx) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    from speed_ray.models.offline import resolve_model
    from speed_ray.raylocal import ensure_ray

    cfg, seed = ctx.cfg.embedder, ctx.cfg.run.seed
    ensure_ray(ctx.cfg.run.ray_address, ctx.cfg.run.num_cpus)
    # The training set as files in batch order (artifacts/triples, artifacts/feed): built by Ray tasks, read per
    # step by each worker; the driver holds the plan only (speed_ray/embedder/feed.py).
    plan = prepare_feed(ctx, cfg, seed)
    data_summary = plan.summary
    ctx.log("%d triples -> %d batches of %d on %d worker(s)", data_summary["triples"], plan.n_batches,
            cfg.batch_size, cfg.num_workers)

    model_url = ctx.out.artifact("model")
    loop_config = {"embedder": to_dict(cfg), "model_path": resolve_model(cfg.base_model),
                   "feed": dataclasses.asdict(plan), "export_url": model_url, "seed": seed, "query_instruction": cfg.query_instruction,
                   "guide_path": resolve_model(cfg.gist_guide_model or cfg.base_model) if cfg.gist else None}
    # Same name + storage path on a rerun: Ray Train restores its checkpoint manager and get_checkpoint()
    # returns the latest checkpoint, so a killed stage continues from its last save_steps. Storage keeps the two
    # newest checkpoints (each a single file from rank 0, see train._report_with_checkpoint).
    run_config = ray.train.RunConfig(name="train", storage_path=_storage_path(ctx.out.artifact("ray_train")),
                                     failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                                     checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2))
    scaling = ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                      resources_per_worker=None if cfg.use_gpu else {"CPU": cfg.cpus_per_worker})
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
                        "precision": m.get("precision"), "torch_threads": m.get("torch_threads"), "skipped_steps": m.get("skipped_steps"),
                        "weights_in_sync": m.get("weights_in_sync"), "wall_seconds": wall, "data": data_summary},
            "train_config": dataclasses.asdict(cfg) | {"resolved_model": loop_config["model_path"]}}


def _train_func(config: dict) -> None:
    from speed_ray.embedder.train import train_func

    train_func(config)


def _storage_path(url: str) -> str:
    import os

    return url if "://" in url else os.path.abspath(url)

