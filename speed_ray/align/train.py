"""SFT and DPO with TRL under Ray Train: the per-worker train function and the TorchTrainer that runs it.

`train_sft` / `train_dpo` launch a Ray Train TorchTrainer (DDP, FSDP or DeepSpeed ZeRO-3 per the config) whose
workers read prepared examples from Parquet, train with TRL's SFTTrainer / DPOTrainer, report checkpoints to
Ray Train under `storage_url`, and finally write a merged Hugging Face checkpoint (plus the LoRA adapter).
A worker that dies is restarted from the last reported checkpoint (FailureConfig); a rerun of the whole job
resumes from the newest checkpoint in `storage_url`.

Checkpoint disk stays bounded. Locally: every rank writes a checkpoint-N at each save (rank 0 the model, optimizer
and trainer state; every rank its RNG state, and with FSDP sharded state / ZeRO-3 its shards), but the HF Trainer
rotates (save_total_limit) on the main rank only, so `_bounded_report_callback` moves each rank's checkpoint out of
output_dir, uploads it and deletes it: a rank holds at most the checkpoint being uploaded. A worker killed before
its `finally` leaves its scratch dir behind; the next worker on that node removes the dirs of dead processes. In
storage: Ray Train keeps `keep_checkpoints` (CheckpointConfig.num_to_keep) and `prune_storage` removes the
checkpoints a crash left unregistered.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import fsspec

from speed_ray.align.config import DPOTrainerConfig, TrainerConfig, resolve_precision, training_args
from speed_ray.align.data import FALLBACK_CHAT_TEMPLATE, DataError, from_columns

log = logging.getLogger("speed_ray")

Kind = Literal["sft", "dpo"]
RAY_RUN_NAME = "ray_train"       # Ray Train run name inside storage_url: a rerun with the same name resumes
HF_CHECKPOINT = "checkpoint"     # RayTrainReportCallback.CHECKPOINT_NAME: the HF checkpoint inside a Ray one


@dataclass(frozen=True)
class TrainJob:
    """Everything one training run needs, as flat values (what the workers receive)."""

    kind: Kind
    data_url: str                  # Parquet of prepared examples (speed_ray.align.data.to_columns)
    cfg: TrainerConfig
    base_model: str                # local dir or hub id (for DPO: the junior, which is also the reference)
    model_url: str                 # where the merged checkpoint goes
    adapter_url: str | None        # where the LoRA adapter goes (None: full fine-tuning)
    storage_url: str               # Ray Train storage: checkpoints of this run
    metrics_url: str               # final metrics and log history (JSON)
    seed: int = 0
    callbacks: tuple = field(default=())   # extra transformers TrainerCallbacks (picklable)


# ---- pure helpers ----------------------------------------------------------------------------------------

def summarize_log_history(history: list[dict]) -> dict[str, Any]:
    """Final train metrics from a Trainer's log history: last value of each metric, plus the first loss and
    reward margin so a manifest shows whether training moved them."""
    out: dict[str, Any] = {}
    for entry in history:
        for k, v in entry.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = v
    steps = [e for e in history if "loss" in e]
    if steps:
        out["first_loss"], out["last_loss"] = steps[0]["loss"], steps[-1]["loss"]
    margins = [e for e in history if "rewards/margins" in e]
    if margins:
        out["first_rewards/margins"] = margins[0]["rewards/margins"]
        out["last_rewards/margins"] = margins[-1]["rewards/margins"]
    return out


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(url)


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def checkpoint_step(ckpt_dir_url: str) -> int | None:
    """global_step of a Ray checkpoint that holds a complete HF checkpoint, else None."""
    fs, path = _fs(ckpt_dir_url)
    state = f"{path.rstrip('/')}/{HF_CHECKPOINT}/trainer_state.json"
    try:
        with fs.open(state, "r") as f:
            return int(json.load(f)["global_step"])
    except (OSError, KeyError, ValueError):   # missing, not a directory, or half-written
        return None


def latest_checkpoint(storage_url: str, name: str = RAY_RUN_NAME) -> tuple[str, int] | None:
    """(url, step) of the newest complete checkpoint a previous run of this job left in storage, else None."""
    fs, path = _fs(storage_url)
    run = f"{path.rstrip('/')}/{name}"
    if not fs.exists(run):
        return None
    best = None
    for entry in fs.ls(run, detail=True):
        p = entry["name"]
        # Ray keeps checkpoint_<time>/ directories next to its checkpoint_manager_snapshot.json
        if entry.get("type") != "directory" or not os.path.basename(p.rstrip("/")).startswith("checkpoint_"):
            continue
        url = p if _is_local(storage_url) else fs.unstrip_protocol(p)
        step = checkpoint_step(url)
        if step is not None and (best is None or step > best[1]):
            best = (url, step)
    return best


def _snapshot_names(fs, run: str) -> set[str] | None:
    """The checkpoint dir names Ray Train's checkpoint manager snapshot refers to (empty: no snapshot yet; None:
    unreadable, so nothing can safely be called untracked)."""
    snap = f"{run}/checkpoint_manager_snapshot.json"
    if not fs.exists(snap):
        return set()
    try:
        with fs.open(snap, "r") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    names: set[str] = set()

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, str) and os.path.basename(x.rstrip("/")).startswith("checkpoint_"):
            names.add(os.path.basename(x.rstrip("/")))

    walk(state)
    return names


def prune_storage(storage_url: str, name: str = RAY_RUN_NAME) -> list[str]:
    """Delete the checkpoint dirs in storage that Ray Train does not track and no run will resume from: a worker or
    job killed between an upload and its registration leaves one behind, which CheckpointConfig(num_to_keep) never
    sees. Keeps every tracked checkpoint (Ray's snapshot must find them) and the newest complete untracked one when
    it is newer than every tracked one (`latest_checkpoint` resumes from it). Returns the deleted paths."""
    fs, path = _fs(storage_url)
    run = f"{path.rstrip('/')}/{name}"
    if not fs.exists(run):
        return []
    tracked = _snapshot_names(fs, run)
    if tracked is None:
        return []
    dirs = []
    for entry in fs.ls(run, detail=True):
        p = entry["name"].rstrip("/")
        base = os.path.basename(p)
        if entry.get("type") == "directory" and base.startswith("checkpoint_"):
            url = p if _is_local(storage_url) else fs.unstrip_protocol(p)
            dirs.append((base, p, checkpoint_step(url)))
    newest_tracked = max((s for b, _, s in dirs if b in tracked and s is not None), default=-1)
    untracked = [(b, p, s) for b, p, s in dirs if b not in tracked]
    complete = [d for d in untracked if d[2] is not None and d[2] > newest_tracked]
    keep = max(complete, key=lambda d: d[2])[0] if complete else None
    deleted = []
    for b, p, _ in untracked:
        if b != keep:
            fs.rm(p, recursive=True)
            deleted.append(p)
    return deleted


def _put_dir(local: str, url: str) -> None:
    """Replace the directory at url with a copy of local (any fsspec filesystem)."""
    fs, path = _fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    if _is_local(url):
        shutil.copytree(local, path)
    else:
        fs.put(local.rstrip("/") + "/", path, recursive=True)


def _write_json(url: str, obj: Any) -> None:
    fs, path = _fs(url)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)


# ---- the TRL side (runs inside a worker; usable without Ray too) ----------------------------------------

def load_examples(data_url: str) -> list[dict]:
    import pyarrow.parquet as pq

    fs, path = _fs(data_url)
    with fs.open(path, "rb") as f:
        rows = pq.read_table(f).to_pylist()
    return [{k: v for k, v in e.items() if k != "id"} for e in from_columns(rows)]


def _dtype(precision: str):
    import torch

    # fp16 trains with autocast over fp32 weights (fp16 weights cannot be unscaled); bf16 trains in bf16.
    return torch.bfloat16 if precision == "bf16" else torch.float32


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    if not getattr(tok, "chat_template", None):
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def lora_config(cfg: TrainerConfig):
    from peft import LoraConfig

    targets = cfg.lora_target_modules
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
                      target_modules=targets[0] if targets == ("all-linear",) else list(targets))


def build_trainer(job: TrainJob, output_dir: str, callbacks: list):
    """A TRL SFTTrainer or DPOTrainer for the job (the Ray callbacks are passed in)."""
    import transformers
    from datasets import Dataset

    cfg = job.cfg
    precision = resolve_precision(cfg.precision, cfg.use_gpu)
    major = int(transformers.__version__.split(".")[0])
    args = training_args(cfg, output_dir=output_dir, seed=job.seed, transformers_major=major)
    args["model_init_kwargs"] = {"dtype": _dtype(precision)}
    tok = load_tokenizer(job.base_model)
    ds = Dataset.from_list(load_examples(job.data_url))
    peft = lora_config(cfg) if cfg.lora else None
    if job.kind == "sft":
        from trl import SFTConfig, SFTTrainer

        # prompt/completion data: the loss covers the completion (the sample) only, as in SPEED Eq. 1 and 3
        trainer = SFTTrainer(model=job.base_model, args=SFTConfig(**args, completion_only_loss=True),
                             train_dataset=ds, processing_class=tok, peft_config=peft, callbacks=callbacks)
    else:
        from trl import DPOConfig, DPOTrainer

        assert isinstance(cfg, DPOTrainerConfig), "DPO needs a DPOTrainerConfig"
        # ref_model=None: with LoRA the reference is the base with the adapter disabled, without it TRL loads a
        # frozen copy of base_model. Either way the reference is the junior, because base_model is the junior.
        trainer = DPOTrainer(model=job.base_model, ref_model=None,
                             args=DPOConfig(**args, beta=cfg.beta, loss_type=[cfg.loss_type]),
                             train_dataset=ds, processing_class=tok, peft_config=peft, callbacks=callbacks)
    from speed_ray.raylocal import verbose

    if not verbose():   # its print of every log dict; the step log (steplog.py) keeps them, progress shows them
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    # TRL silently drops examples whose prompt alone fills max_length (nothing left to learn from)
    kept = len(trainer.train_dataset)
    if kept == 0:
        raise DataError(f"all {len(ds)} {job.kind} examples were dropped: their prompts fill max_length="
                        f"{cfg.max_length} tokens, leaving no completion tokens; raise max_length")
    trainer.speed_ray_counts = {"examples": len(ds), "examples_dropped_too_long": len(ds) - kept}
    return trainer


def set_adapter_base(adapter_dir: str, base_ref: str) -> None:
    """Record the base model as the run knows it (hub id, run-dir path or s3:// URL) in adapter_config.json;
    peft writes the path it loaded from, which for a fetched s3 checkpoint is a cache dir on one worker node."""
    path = os.path.join(adapter_dir, "adapter_config.json")
    with open(path) as f:
        conf = json.load(f)
    conf["base_model_name_or_path"] = base_ref
    with open(path, "w") as f:
        json.dump(conf, f, indent=2)


def save_outputs(trainer, job: TrainJob, local_dir: str, is_main: bool, base_ref: str | None = None) -> None:
    """Save the trained model: every rank joins save_model (it gathers FSDP / ZeRO-3 shards); the main rank
    then merges the LoRA adapter into the base and writes the merged checkpoint and the adapter."""
    final = os.path.join(local_dir, "final")
    trainer.save_model(final)
    if not is_main:
        return
    tok = trainer.processing_class
    tok.save_pretrained(final)
    if job.adapter_url is None:
        _put_dir(final, job.model_url)
        return
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    precision = resolve_precision(job.cfg.precision, job.cfg.use_gpu)
    # Merge on CPU from the saved adapter: the same path for DDP, FSDP and ZeRO-3, and no GPU memory spike.
    base = AutoModelForCausalLM.from_pretrained(job.base_model, dtype=_dtype(precision), device_map="cpu")
    merged = PeftModel.from_pretrained(base, final).merge_and_unload()
    merged_dir = os.path.join(local_dir, "merged")
    merged.save_pretrained(merged_dir, safe_serialization=True)
    tok.save_pretrained(merged_dir)
    set_adapter_base(final, base_ref or job.base_model)
    _put_dir(final, job.adapter_url)
    _put_dir(merged_dir, job.model_url)
    del base, merged
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def _ray_checkpoint_step(ckpt) -> int:
    try:
        with ckpt.filesystem.open_input_stream(f"{ckpt.path}/{HF_CHECKPOINT}/trainer_state.json") as f:
            return int(json.loads(f.read())["global_step"])
    except (OSError, KeyError, ValueError):
        return 0


def _resume_point(job: TrainJob):
    """The checkpoint to resume from: Ray's restored one (a worker died) or the newest in storage (the job
    was re-run); the later of the two, since a crash can land between an upload and its registration."""
    import ray.train

    found = []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        found.append((ckpt, _ray_checkpoint_step(ckpt)))
    latest = latest_checkpoint(job.storage_url)
    if latest is not None:
        found.append((ray.train.Checkpoint(latest[0]), latest[1]))
    return max(found, key=lambda cs: cs[1]) if found else (None, 0)


@contextlib.contextmanager
def _builtin_print():
    """Python's own print while TRL prepares its datasets. Ray Train patches builtins.print to log every print,
    even one made while sys.stdout is redirected, so dill's hashing of the datasets map functions (it captures
    `dis.dis` output by swapping sys.stdout) would dump thousands of lines of bytecode into the worker logs."""
    import builtins

    try:
        from ray.train.v2._internal.logging.patch_print import _original_print
    except ImportError:          # another Ray version: nothing to undo
        yield
        return
    patched, builtins.print = builtins.print, _original_print
    try:
        yield
    finally:
        builtins.print = patched


SCRATCH = "speed-ray-train"      # under the node's scratch root: one dir per worker process
_SCRATCH_ENTRY = re.compile(r"^[a-z]+-rank\d+-pid(\d+)-")


def _pid_alive(pid: int) -> bool:
    import psutil

    return psutil.pid_exists(pid)


def remove_dead_scratch(root: str) -> list[str]:
    """Remove the scratch dirs under root whose worker process is gone (killed before its `finally`: an OOM, a
    preempted node, os._exit). Dirs of live processes and anything not named like ours are left alone."""
    removed = []
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return removed
    for n in names:
        m = _SCRATCH_ENTRY.match(n)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(os.path.join(root, n), ignore_errors=True)
            removed.append(n)
    return removed


def make_scratch_dir(job: TrainJob, rank: int) -> str:
    """This worker's node-local dir (HF output_dir, checkpoint staging, the final save), named by its pid so that a
    later worker can tell a dead one's leftovers from a live one's."""
    root = os.path.join(job.cfg.scratch_dir or tempfile.gettempdir(), SCRATCH)
    os.makedirs(root, exist_ok=True)
    gone = remove_dead_scratch(root)
    if gone:
        log.info("removed %d scratch dirs of dead training workers under %s", len(gone), root)
    return tempfile.mkdtemp(prefix=f"{job.kind}-rank{rank}-pid{os.getpid()}-", dir=root)


def hf_checkpoints(output_dir: str) -> list[str]:
    """The HF Trainer's checkpoint-N dirs in output_dir."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    try:
        names = os.listdir(output_dir)
    except FileNotFoundError:
        return []
    return sorted(os.path.join(output_dir, n) for n in names
                  if n.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and os.path.isdir(os.path.join(output_dir, n)))


def _bounded_report_callback(staging_root: str):
    """Ray's RayTrainReportCallback (same metrics, same checkpoint layout: checkpoint_*/checkpoint/), but it moves
    this rank's newest checkpoint-N out of output_dir instead of copying it to /tmp, reports it (Ray uploads it
    before report returns), then deletes it and any other checkpoint-N there. Needed on every rank: the HF Trainer
    rotates checkpoints (save_total_limit) on the main rank only, while every rank writes one per save."""
    from ray.train.huggingface.transformers import RayTrainReportCallback

    class BoundedReportCallback(RayTrainReportCallback):
        def on_save(self, args, state, control, **kwargs):
            import ray.train
            from transformers.trainer_utils import get_last_checkpoint

            metrics = {}
            for entry in state.log_history:
                metrics.update(entry)
            stage = tempfile.mkdtemp(prefix=f"report-{state.global_step}-", dir=staging_root)
            try:
                src = get_last_checkpoint(args.output_dir)
                checkpoint = None
                if src is not None:
                    os.replace(src, os.path.join(stage, self.CHECKPOINT_NAME))   # same disk: a rename, no copy
                    checkpoint = ray.train.Checkpoint.from_directory(stage)
                ray.train.report(metrics=metrics, checkpoint=checkpoint)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
                for old in hf_checkpoints(args.output_dir):
                    shutil.rmtree(old, ignore_errors=True)

    return BoundedReportCallback()


def _steplog_callback(metrics_url: str):
    """Each logged step's metrics to the stage's artifacts/progress/steps.jsonl (the main rank's trainer)."""
    from transformers import TrainerCallback

    from speed_ray.steplog import StepLog, steps_url

    class StepLogCallback(TrainerCallback):
        def __init__(self):
            self.log = StepLog(steps_url(metrics_url.rsplit("/", 1)[0]))

        def on_log(self, args, state, control, logs=None, **kwargs):
            nums = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if nums:
                self.log.log(state.global_step, state.max_steps, **nums)

        def on_train_end(self, args, state, control, **kwargs):
            self.log.close()

    return StepLogCallback()


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's per-worker function: build the TRL trainer, resume if a checkpoint exists, train, save."""
    import ray.train
    from ray.train.huggingface.transformers import prepare_trainer

    from speed_ray.models.remote import local_model_dir

    import time

    t0 = time.time()
    job: TrainJob = config["job"]
    base_ref = job.base_model          # what the adapter records as its base: a hub id, a path or an s3:// URL
    job = replace(job, base_model=local_model_dir(base_ref))   # an s3:// checkpoint (DPO's junior): fetched per node
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    from speed_ray.threads import set_worker_threads

    threads = set_worker_threads(job.cfg.torch_threads, job.cfg.cpus_per_worker, job.cfg.use_gpu)
    local_dir = make_scratch_dir(job, rank)
    try:
        with _builtin_print():
            steplog = [_steplog_callback(job.metrics_url)] if rank == 0 else []   # progress and loss curves
            trainer = build_trainer(job, os.path.join(local_dir, "hf"),
                                    [_bounded_report_callback(local_dir), *job.callbacks, *steplog])
        trainer = prepare_trainer(trainer)
        t_built = time.time()
        ckpt, resumed_from = _resume_point(job)
        if ckpt is not None:
            with ckpt.as_directory() as d:
                log.info("rank %d resumes from step %d (%s)", rank, resumed_from, ckpt.path)
                out = trainer.train(resume_from_checkpoint=os.path.join(d, HF_CHECKPOINT))
        else:
            out = trainer.train()
        t_trained = time.time()
        save_outputs(trainer, job, local_dir, is_main=rank == 0, base_ref=base_ref)
        if rank == 0:
            metrics = summarize_log_history(trainer.state.log_history)
            metrics.update({k: v for k, v in out.metrics.items() if isinstance(v, (int, float))})
            metrics.update(trainer.speed_ray_counts)
            metrics.update({"global_step": trainer.state.global_step, "resumed_from_step": resumed_from,
                            "world_size": ctx.get_world_size(), "torch_threads": threads,
                            # where this worker's time went: TRL's import, the model and the tokenized datasets;
                            # the steps (with their checkpoint uploads); the final save
                            "setup_seconds": round(t_built - t0, 3), "train_seconds": round(t_trained - t_built, 3),
                            "save_seconds": round(time.time() - t_trained, 3)})
            _write_json(job.metrics_url, {"metrics": metrics, "log_history": trainer.state.log_history})
    finally:
        shutil.rmtree(local_dir, ignore_errors=True)


# ---- the Ray side (driver) ------------------------------------------------------------------------------

def _check_strategy(cfg: TrainerConfig) -> None:
    import importlib.util

    if cfg.strategy == "deepspeed_zero3" and importlib.util.find_spec("deepspeed") is None:
        raise RuntimeError("strategy deepspeed_zero3 needs the deepspeed package on the training workers "
                           "(pip install deepspeed); or use strategy: fsdp")


def worker_resources(cfg: TrainerConfig) -> dict[str, float]:
    """Ray resources of one training worker: one bundle of the TorchTrainer's placement group, which some worker
    group of the cluster must hold for the autoscaler to start a node for it (tests/test_cluster_defs.py)."""
    return {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}


def run_training(job: TrainJob) -> dict[str, Any]:
    """Run the job on a Ray Train TorchTrainer; returns the final metrics the main worker wrote."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    _check_strategy(job.cfg)
    cfg = job.cfg
    storage = os.path.abspath(job.storage_url) if _is_local(job.storage_url) else job.storage_url
    job = replace(job, storage_url=storage)
    pruned = prune_storage(storage)
    if pruned:
        log.info("%s: removed %d untracked checkpoints from %s", job.kind, len(pruned), storage)
    found = latest_checkpoint(storage)
    if found:
        log.info("%s: resuming from %s (step %d)", job.kind, found[0], found[1])
    resources = worker_resources(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=RAY_RUN_NAME, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
    )
    trainer.fit()
    fs, path = _fs(job.metrics_url)
    with fs.open(path, "r") as f:
        return json.load(f)["metrics"]


def train_sft(data_url: str, cfg: TrainerConfig, *, base_model: str, model_url: str, adapter_url: str | None,
              storage_url: str, metrics_url: str, seed: int = 0, callbacks: tuple = ()) -> dict[str, Any]:
    """SFT with completion-only loss on prepared prompt/completion examples. Returns the final metrics."""
    return run_training(TrainJob("sft", data_url, cfg, base_model, model_url, adapter_url if cfg.lora else None,
                                 storage_url, metrics_url, seed, tuple(callbacks)))


def train_dpo(data_url: str, cfg: DPOTrainerConfig, *, base_model: str, model_url: str, adapter_url: str | None,
              storage_url: str, metrics_url: str, seed: int = 0, callbacks: tuple = ()) -> dict[str, Any]:
    """DPO on prepared prompt/chosen/rejected examples; base_model is the policy's start and the reference."""
    return run_training(TrainJob("dpo", data_url, cfg, base_model, model_url, adapter_url if cfg.lora else None,
                                 storage_url, metrics_url, seed, tuple(callbacks)))
