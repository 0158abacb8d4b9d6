"""Contrastive training of the embedder: a per-step core usable in one process, and its Ray Train TorchTrainer loop.

Each step takes one global batch (the same on every worker and on resume: the feed's files hold the batches in
order, see feed.py; each worker reads its own slice of a step's batch and nothing else), each worker embeds its
slice, negatives are all-gathered with gradients, and the averaged gradients equal those of the single-process loss over the global batch (tests/test_embedder_distributed.py checks this).

Mixed precision: fp16 and bf16 compute under autocast with fp32 trainable weights (model.storage_dtype); fp16 scales
the loss with a GradScaler, unscales after the cross-worker average and skips steps whose gradients overflowed.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from speed_ray.embedder.loss import contrastive_loss, grad_cache_step, plain_step


@dataclass(frozen=True)
class StepSettings:
    """The flat values one training step needs (taken from EmbedderConfig)."""

    temperature: float = 0.02
    mini_batch_size: int = 0          # > 0: GradCache chunks
    gather: bool = True
    max_query_length: int = 512
    max_doc_length: int = 512
    pack: bool = True                 # plain loss: length-sorted chunks over all sides (Embedder.encode_packed)
    gist_margin: float = 0.0          # with a guide: GISTEmbed's false-negative margin


def guide_embeddings(guide, sides: list[list[str]], lengths) -> tuple:
    """The guide's embeddings of each side (no grad; None for a missing negative side)."""
    with torch.no_grad():
        embs = [guide.encode(texts, lengths[i]).detach() for i, texts in enumerate(sides)]
    return (embs[0], embs[1], embs[2] if len(embs) > 2 else None)


def train_step(embedder, batch: list[dict], s: StepSettings, scaler=None, backward=None, guide=None) -> float:
    """Embed (query, positive, negative) of this worker's slice, compute the loss, backprop into the weights.

    scaler: fp16's torch.amp.GradScaler. The loss is scaled before any backward pass (with GradCache the scaled
    loss's gradients are what the embedding cache holds, so every chunk's backward is scaled too); the caller
    unscales after averaging over workers (finish_gradients). Returns the unscaled loss."""
    if scaler is not None and backward is not None:
        raise ValueError("a custom backward (DeepSpeed) does its own loss scaling; do not pass a GradScaler too")
    lengths = (s.max_query_length, s.max_doc_length, s.max_doc_length)
    sides = [[t["query"] for t in batch], [t["positive"] for t in batch]]
    has_neg = [t.get("negative") is not None for t in batch]
    if any(has_neg) and not all(has_neg):
        raise ValueError("a batch mixes pairs and triples (the feed plans them apart: plan_batches(pairs=...))")
    if all(has_neg):   # triples; pairs train with in-batch negatives only
        sides.append([t["negative"] for t in batch])
    unscaled: list[torch.Tensor] = []
    # GISTEmbed: the guide (a frozen embedder) embeds the slice once; the loss masks the candidates it scores as
    # false negatives. Under GradCache the mask is built on the whole slice, as in the plain step.
    g = guide_embeddings(guide, sides, lengths) if guide is not None else None

    def encode(side: int, texts: list[str]) -> torch.Tensor:
        return embedder.encode(texts, lengths[side])

    def loss_fn(q, p, n=None):
        loss = contrastive_loss(q, p, n, s.temperature, s.gather, g, s.gist_margin)
        unscaled.append(loss.detach())
        return scaler.scale(loss) if scaler is not None else loss

    if s.mini_batch_size and s.mini_batch_size < len(batch):
        if backward is not None:
            raise ValueError("GradCache runs its own backward passes; it cannot use a custom backward (DeepSpeed)")
        grad_cache_step(encode, sides, loss_fn, s.mini_batch_size)
    else:
        plain_step(encode, sides, loss_fn, backward,
                   encode_all=(lambda sd: embedder.encode_packed(sd, list(lengths[:len(sd)]))) if s.pack else None)
    return float(unscaled[-1])


def make_scaler(precision: str, device: torch.device):
    """fp16 needs loss scaling (its gradients underflow otherwise); bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def finish_gradients(params: list[torch.nn.Parameter], opt, scaler=None) -> None:
    """After a step's backward passes: the mean over workers, then (fp16) the division by the loss scale, in this
    order, so every worker holds the same true gradients of the global batch and reaches the same inf/nan verdict
    (an overflow on any worker reaches all of them through the all_reduce). Clipping would go after this."""
    average_gradients(params)
    if scaler is not None:
        scaler.unscale_(opt)


def optimizer_step(opt, sched, scaler=None) -> bool:
    """Update the weights, zero the gradients, advance the LR schedule. With fp16 the scaler skips the update when
    the gradients hold inf/nan (and halves its scale); the schedule then waits too, as in transformers' Trainer.
    Returns whether the weights were updated."""
    if scaler is None:
        opt.step()
        stepped = True
    else:
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        stepped = scaler.get_scale() >= before   # the scale only shrinks after an inf/nan step
    opt.zero_grad(set_to_none=True)
    if stepped:
        sched.step()
    return stepped


def num_steps(n_batches: int, epochs: float, max_steps: int) -> int:
    if n_batches == 0:
        return 0
    return max_steps if max_steps > 0 else max(1, math.ceil(n_batches * epochs))


def make_optimizer(embedder, lr: float, warmup_steps: int, total_steps: int):
    """AdamW over the trainable weights, linear warmup then linear decay (E5-mistral)."""
    params = [p for p in embedder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(0, min(warmup_steps, total_steps - 1))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Mean of every worker's gradients, flattened into one all_reduce. Done by hand instead of DDP because
    GradCache runs several forward/backward passes per step and DDP would sync after each."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()


def loss_summary(losses: list[float], points: int = 50) -> dict:
    if not losses:
        return {"first": None, "last": None, "min": None, "tail_mean": None, "curve": []}
    tail = losses[-max(1, len(losses) // 10):]
    stride = max(1, len(losses) // points)
    return {"first": losses[0], "last": losses[-1], "min": min(losses), "tail_mean": sum(tail) / len(tail),
            "curve": [[i, losses[i]] for i in range(0, len(losses), stride)]}


def _export(embedder, export_url: str, query_instruction: str, max_length: int) -> None:
    """Rank 0 writes the SentenceTransformer dir locally, then copies it to the stage's (maybe remote) storage."""
    import fsspec

    from speed_ray.embedder.model import save_sentence_transformer

    fs, path = fsspec.core.url_to_fs(export_url)
    if fs.protocol in ("file", ("file", "local"), "local") or "://" not in export_url:
        save_sentence_transformer(embedder, path, query_instruction, max_length)
        return
    tmp = tempfile.mkdtemp(prefix="speedray-export-")
    try:
        save_sentence_transformer(embedder, os.path.join(tmp, "model"), query_instruction, max_length)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        fs.put(os.path.join(tmp, "model"), path, recursive=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_embedder(e: dict, model_path: str, precision: str, seed: int, device: torch.device):
    """The embedder every worker trains: the same seed for the LoRA initialisation on every rank, then rank 0's
    trainable weights broadcast to the others (what DDP does at wrap time; gradients are averaged by hand here)."""
    from speed_ray.embedder.model import load_embedder

    torch.manual_seed(seed)
    embedder = load_embedder(model_path, e["pooling"], e["lora"], e["lora_r"], e["lora_alpha"], e["lora_dropout"],
                             precision, e["gradient_checkpointing"], max(e["max_query_length"], e["max_doc_length"]))
    embedder.to(device).train()
    if e["strategy"] != "deepspeed_zero3":   # DeepSpeed broadcasts (and partitions) the weights itself
        broadcast_trainable(embedder)
    return embedder


def broadcast_trainable(embedder) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for p in embedder.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, 0)


def weights_in_sync(params: list[torch.nn.Parameter]) -> bool:
    """Whether every worker holds the same trainable weights (a per-tensor checksum compared across ranks)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not params:
        return True
    sums = torch.stack([p.detach().double().sum() for p in params])
    lo, hi = sums.clone(), sums.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def train_func(config: dict[str, Any]) -> None:
    """Ray Train per-worker loop. config: feed (a FeedPlan as a dict), model_path, export_url, seed,
    query_instruction, and the EmbedderConfig fields as "embedder" (a dict)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from speed_ray.embedder.model import load_trainable_state, trainable_state

    e = config["embedder"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if e["use_gpu"] else torch.device("cpu")
    from speed_ray.threads import set_worker_threads

    threads = set_worker_threads(e.get("torch_threads"), e.get("cpus_per_worker", 1.0), e["use_gpu"])
    precision = e["precision"] if e["precision"] != "auto" else ("bf16" if e["use_gpu"] else "fp32")

    from speed_ray.embedder.feed import FeedPlan, FeedReader

    feed = FeedReader(FeedPlan.from_dict(config["feed"]), rank, world)   # this worker's slice of each batch
    total = num_steps(feed.plan.n_batches, e["epochs"], e["max_steps"])
    embedder = build_embedder(e, config["model_path"], precision, config["seed"], device)
    torch.manual_seed(config["seed"] + rank)   # each worker's own dropout masks
    opt, sched = make_optimizer(embedder, e["learning_rate"], e["warmup_steps"], total)
    params = [p for p in embedder.parameters() if p.requires_grad]
    engine = None
    if e["strategy"] == "deepspeed_zero3":
        engine, opt = _deepspeed(embedder, opt, sched, precision, e["batch_size"])
    scaler = make_scaler(precision, device) if engine is None else None
    settings = StepSettings(e["temperature"], e["mini_batch_size"], e["gather_across_workers"],
                            e["max_query_length"], e["max_doc_length"], gist_margin=e.get("gist_margin", 0.0))
    guide = None
    if e.get("gist"):   # a frozen embedder (no LoRA) for GISTEmbed's false-negative mask
        from speed_ray.embedder.model import load_embedder

        guide = load_embedder(config["guide_path"], "auto" if e.get("gist_guide_model") else e["pooling"],
                              lora=False, precision=precision,
                              max_length=max(e["max_query_length"], e["max_doc_length"])).to(device).eval()
        for p_ in guide.parameters():
            p_.requires_grad_(False)

    start, losses, skipped = 0, [], 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=False)
        with _full_params(engine):
            load_trainable_state(embedder, state["trainable"])
        if engine is None:
            opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start, losses, skipped = state["step"], state["losses"], state.get("skipped_steps", 0)
        torch.set_rng_state(state["rng"])

    def report(metrics: dict, step: int, trainable=None) -> None:
        extra = {"scaler": scaler.state_dict() if scaler is not None else None, "skipped_steps": skipped}
        _report_with_checkpoint(metrics, rank, embedder, engine, opt, sched, step, losses, extra, trainable)

    from speed_ray.steplog import StepLog, steps_url

    steplog = StepLog(steps_url(config["export_url"].rsplit("/", 1)[0])) if rank == 0 else None   # progress, curves
    t0, done_here = time.time(), 0
    for step in range(start, total):
        batch = feed.batch(step)
        loss = train_step(embedder, batch, settings, scaler, engine.backward if engine is not None else None,
                          guide)
        if engine is not None:
            engine.step()   # optimizer, zero_grad and the LR schedule (DeepSpeed scales fp16 losses itself)
        else:
            finish_gradients(params, opt, scaler)
            skipped += not optimizer_step(opt, sched, scaler)
        # the logged loss is the global batch's loss: the mean of the workers' local means
        if world > 1 and dist.is_initialized():
            t = torch.tensor([loss], device=device)
            dist.all_reduce(t)
            loss = float(t) / world
        losses.append(loss)
        done_here += 1
        metrics = {"step": step + 1, "loss": loss, "lr": sched.get_last_lr()[0], "skipped_steps": skipped}
        if steplog is not None:
            steplog.log(step + 1, total, loss=loss, lr=metrics["lr"], skipped_steps=skipped)
        if (step + 1) % e["save_steps"] == 0 and step + 1 < total:
            report(metrics, step + 1)
    elapsed = time.time() - t0
    if steplog is not None:
        steplog.close()
    feed.close()
    in_sync = weights_in_sync(params) if engine is None else True
    # The export merges LoRA into the backbone in place: the final checkpoint's weights are taken before it.
    # (Under ZeRO-3 gathering the weights is a collective: every rank enters, rank 0 reads and exports.)
    final_state = None
    with _full_params(engine):
        if rank == 0:
            final_state = trainable_state(embedder)
            _export(embedder, config["export_url"], config["query_instruction"],
                    max(e["max_query_length"], e["max_doc_length"]))
    if world > 1 and dist.is_initialized():
        dist.barrier()
    final = {"step": total, "steps_this_attempt": done_here, "resumed_from_step": start,
             "samples_per_s": done_here * e["batch_size"] / elapsed if elapsed > 0 else None,
             "train_seconds": elapsed, "losses": losses, "skipped_steps": skipped, "weights_in_sync": in_sync,
             "precision": precision, "torch_threads": threads}
    report(final, total, final_state)


def _report_with_checkpoint(metrics, rank, embedder, engine, opt, sched, step, losses, extra=None,
                            trainable=None) -> None:
    """Every worker reports (Ray Train syncs on it); only rank 0 writes and attaches a checkpoint (the trainable
    weights, optimizer, schedule, scaler), from a temporary dir removed once Ray Train has copied it to storage.
    Other ranks write nothing: every rank that passes a checkpoint uploads its files, and the state is the same
    on every rank. Storage keeps the newest CheckpointConfig.num_to_keep checkpoints."""
    import ray.train

    from speed_ray.embedder.model import trainable_state

    reported = {k: v for k, v in metrics.items() if k != "losses"} | {"losses": losses}
    with _full_params(engine):   # under ZeRO-3 a collective: every rank enters it
        if rank == 0 and trainable is None:
            trainable = trainable_state(embedder)
    if rank != 0:
        ray.train.report(reported, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="speedray-ckpt-") as d:
        torch.save({"trainable": trainable, "optimizer": opt.state_dict() if engine is None else None,
                    "scheduler": sched.state_dict(), "step": step, "losses": losses,
                    "rng": torch.get_rng_state(), **(extra or {})}, os.path.join(d, "state.pt"))
        ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(d))


def _full_params(engine):
    """Under ZeRO-3 parameters are sharded: gather them to read or write whole weights; a no-op otherwise."""
    if engine is None:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=0)


def _deepspeed(embedder, opt, sched, precision: str, batch_size: int):
    """DeepSpeed ZeRO-3 (SPEED Appendix B trains with ZeRO-3 and fp16). GPU only; imported lazily."""
    try:
        import deepspeed
    except ImportError as err:
        raise RuntimeError("embedder.strategy=deepspeed_zero3 needs deepspeed: pip install deepspeed") from err
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    ds_config = {
        "train_micro_batch_size_per_gpu": batch_size // world, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "overlap_comm": True, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": precision == "bf16"}, "fp16": {"enabled": precision == "fp16"},
    }
    engine, opt, _, _ = deepspeed.initialize(model=embedder, optimizer=opt, lr_scheduler=sched, config=ds_config)
    return engine, opt
