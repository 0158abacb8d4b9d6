"""Stage functions that align the generators: junior SFT, senior DPO and revisor SFT (SPEED Sections 3.2.2-3.2.4)."""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable

from speed_ray.align.config import TrainerConfig
import pyarrow as pa

from speed_ray.align.data import (DataError, build_examples, cap_indices, dpo_example, revise_sft_example,
                                  seed_sft_example, to_columns)
from speed_ray.config import to_dict
from speed_ray.stage import StageContext
from speed_ray.store import StageOutput


def _prepare(ctx: StageContext, source: StageOutput, make: Callable[[dict], dict], columns: list[str],
             cfg: TrainerConfig) -> tuple[str, int, dict]:
    """Stream the source's shards into examples, batch by batch, into one Parquet artifact that the workers read
    (the driver holds one batch, not the stage: SPEED's 25K D_seed rows, or many more). When trainer.n_samples
    caps the examples, a second pass keeps the same seeded uniform subset as align.data.cap_examples. Returns
    (url, examples kept, rows skipped by reason)."""
    import fsspec
    import pyarrow.parquet as pq

    if not source.shard_names():
        raise DataError(f"stage {ctx.name}: input {source.stage} has no data shards at {source.data_url}")
    present = set(source.read_table(shards=source.shard_names()[:1]).column_names)
    read = [c for c in columns if c in present]
    url = ctx.out.artifact("train_data.parquet")
    every = ctx.out.artifact("train_data.uncapped.parquet")
    skipped: Counter = Counter()
    n_rows = kept = 0
    fs, path = fsspec.core.url_to_fs(every)
    with fs.open(path, "wb") as f:
        writer = None
        for batch in source.iter_batches(batch_size=2048, columns=read):
            rows = batch.to_pylist()
            examples, sk = build_examples(rows, make)
            n_rows += len(rows)
            skipped.update(sk)
            if examples:
                table = pa.table(to_columns(examples))
                writer = writer or pq.ParquetWriter(f, table.schema)
                writer.write_table(table.cast(writer.schema))
                kept += len(examples)
        if writer is not None:
            writer.close()
    if not kept:
        fs.rm(path)
        raise DataError(f"stage {ctx.name}: none of the {n_rows} rows of {source.stage} makes a training "
                        f"example (skipped: {dict(skipped)})")
    n = _cap(every, url, kept, cfg.n_samples, ctx.cfg.run.seed)
    ctx.log("%d training examples from %d rows (skipped: %s)", n, n_rows, dict(skipped) or "none")
    return url, n, dict(skipped)


def _cap(src_url: str, dst_url: str, kept: int, n: int | None, seed: int) -> int:
    """Move the examples to dst_url, keeping at most n: the seeded uniform subset of cap_examples, in order."""
    import fsspec
    import numpy as np
    import pyarrow.parquet as pq

    fs, src = fsspec.core.url_to_fs(src_url)
    _, dst = fsspec.core.url_to_fs(dst_url)
    if n is None or kept <= n:
        fs.mv(src, dst)
        return kept
    mask = np.zeros(kept, dtype=bool)
    mask[cap_indices(kept, n, seed)] = True
    start = 0
    with fs.open(src, "rb") as fin, fs.open(dst, "wb") as fout:
        pf = pq.ParquetFile(fin)
        writer = pq.ParquetWriter(fout, pf.schema_arrow)
        for batch in pf.iter_batches(batch_size=4096):
            take = mask[start:start + batch.num_rows]
            start += batch.num_rows
            if take.any():
                writer.write_table(pa.Table.from_batches([batch]).filter(pa.array(take)))
        writer.close()
    fs.rm(src)
    return n


def _train(ctx: StageContext, kind: str, cfg: TrainerConfig, data_url: str, base_model: str, n: int,
           skipped: dict) -> dict:
    from speed_ray.align.train import RAY_RUN_NAME, train_dpo, train_sft
    from speed_ray.raylocal import ensure_ray

    ensure_ray(ctx.cfg.run.ray_address, ctx.cfg.run.num_cpus)
    model_url, adapter_url = ctx.out.artifact("model"), (ctx.out.artifact("adapter") if cfg.lora else None)
    t0 = time.time()
    fn = train_sft if kind == "sft" else train_dpo
    metrics = fn(data_url, cfg, base_model=base_model, model_url=model_url, adapter_url=adapter_url,
                 storage_url=ctx.out.artifacts_url, metrics_url=ctx.out.artifact("train_metrics.json"),
                 seed=ctx.cfg.run.seed)
    fit_seconds = time.time() - t0
    worker_seconds = fit_seconds * cfg.num_workers
    if cfg.use_gpu:
        ctx.ledger.gpu_seconds += worker_seconds
    else:
        ctx.ledger.cpu_seconds += worker_seconds * cfg.cpus_per_worker
    return {"model_path": model_url, "adapter_path": adapter_url, "base_model": base_model, "metrics": metrics,
            "fit_seconds": round(fit_seconds, 3), "train_config": to_dict(cfg), "train_examples": n,
            "skipped_rows": skipped,
            "checkpoints": f"{ctx.out.artifacts_url}/{RAY_RUN_NAME}"}


def junior_sft_stage(ctx: StageContext) -> dict:
    """SFT the junior generator on D_seed: data prompt (holding the task) -> validated sample (Eq. 1)."""
    from speed_ray.models.offline import resolve_model

    cfg = ctx.cfg.junior_sft
    url, n, skipped = _prepare(ctx, ctx.inputs["data"], seed_sft_example, ["id", "prompt", "sample", "valid"], cfg)
    return _train(ctx, "sft", cfg, url, resolve_model(cfg.base_model), n, skipped)


def senior_dpo_stage(ctx: StageContext) -> dict:
    """DPO the junior into the senior on D_DPO; the junior (merged) is both the start and the reference (Eq. 2)."""
    cfg = ctx.cfg.senior_dpo
    ref = ctx.inputs["reference"]
    junior = ref.manifest.get("model_path")
    if not junior:
        raise DataError(f"stage {ctx.name}: the reference stage {ref.stage} has no model_path in its manifest")
    url, n, skipped = _prepare(ctx, ctx.inputs["pairs"], dpo_example, ["id", "prompt", "chosen", "rejected", "valid"],
                               cfg)
    return _train(ctx, "dpo", cfg, url, junior, n, skipped)


def revisor_sft_stage(ctx: StageContext) -> dict:
    """SFT the revisor on D_revise: (data prompt, task, root sample) -> the teacher's revision (Eq. 3)."""
    from speed_ray.models.offline import resolve_model
    from speed_ray.synth.prompts import revisor_messages

    cfg = ctx.cfg.revisor_sft
    url, n, skipped = _prepare(ctx, ctx.inputs["data"], lambda r: revise_sft_example(r, revisor_messages),
                               ["id", "prompt", "root_text", "revised_text", "valid"], cfg)
    return _train(ctx, "sft", cfg, url, resolve_model(cfg.base_model), n, skipped)
