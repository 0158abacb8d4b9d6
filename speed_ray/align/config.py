"""Configs for aligning the generators on Ray Train: junior SFT, senior DPO, revisor SFT."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from speed_ray.config import check


@dataclass(frozen=True)
class TrainerConfig:
    base_model: str = "meta-llama/Meta-Llama-3-8B"   # hub id or local path; offline:smollm2, offline:tiny-llama
    lora: bool = True                         # LoRA adapters (merged into a full checkpoint at the end)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = ("all-linear",)   # peft target_modules; "all-linear": every linear layer
    learning_rate: float = 1e-4
    batch_size: int = 16                      # global batch (per-device batch x workers x grad accumulation)
    per_device_batch_size: int = 4
    epochs: float = 1.0
    max_steps: int = -1                       # > 0 overrides epochs
    max_length: int = 2048
    num_workers: int = 1                      # Ray Train workers
    use_gpu: bool = False
    cpus_per_worker: float = 1.0              # Ray resources each training worker asks for
    # Threads torch uses in each CPU worker (None: its CPU share). Speed only: not in the fingerprint.
    torch_threads: int | None = field(default=None, metadata={"fingerprint": False})
    strategy: Literal["ddp", "fsdp", "deepspeed_zero3"] = "ddp"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"   # auto: fp32 on CPU, bf16 on GPU
    gradient_checkpointing: bool = False
    save_steps: int = 50                      # checkpoint every N steps (the unit of resume)
    keep_checkpoints: int = 2                 # checkpoints kept in storage: Ray Train CheckpointConfig(num_to_keep)
    # Node-local scratch for each worker's HF checkpoint before it is uploaded (None: the system temp dir; on a GPU
    # node, an NVMe mount). Each rank keeps at most the one checkpoint being uploaded there. Not in the fingerprint.
    scratch_dir: str | None = field(default=None, metadata={"fingerprint": False})
    max_failures: int = 2                     # Ray Train FailureConfig: worker deaths survived per run
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    lr_scheduler_type: str = "linear"         # any transformers scheduler name (linear, cosine, constant, ...)
    logging_steps: int = 1                    # log train metrics every N optimizer steps
    n_samples: int | None = None              # use at most this many training rows (paper Fig. 3 grids)

    def __post_init__(self):
        check(self.learning_rate > 0, "learning_rate", "must be > 0")
        check(self.batch_size > 0, "batch_size", "must be > 0")
        check(self.per_device_batch_size > 0, "per_device_batch_size", "must be > 0")
        check(self.num_workers >= 1, "num_workers", "must be >= 1")
        check(self.batch_size % (self.per_device_batch_size * self.num_workers) == 0, "batch_size",
              "must be a multiple of per_device_batch_size * num_workers")
        check(self.strategy == "ddp" or self.use_gpu, "strategy", "fsdp and deepspeed_zero3 need use_gpu: true")
        check(self.lora_r > 0, "lora_r", "must be > 0")
        check(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        check(len(self.lora_target_modules) > 0, "lora_target_modules", "must name at least one module")
        check(self.max_steps > 0 or self.epochs > 0, "epochs", "must be > 0 when max_steps is not set")
        check(self.max_length > 0, "max_length", "must be > 0")
        check(self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0")
        check(self.torch_threads is None or self.torch_threads >= 1, "torch_threads", "must be >= 1 or null")
        check(self.save_steps > 0, "save_steps", "must be > 0")
        check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        check(self.max_failures >= -1, "max_failures", "must be >= 0 (or -1: retry forever)")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        check(self.logging_steps > 0, "logging_steps", "must be > 0")
        check(self.n_samples is None or self.n_samples > 0, "n_samples", "must be > 0 (or null: all rows)")
        check(not (self.precision == "bf16" and not self.use_gpu and self.strategy != "ddp"), "precision",
              "bf16 without a GPU only works with ddp")
        check(self.precision != "fp16" or self.use_gpu, "precision", "fp16 mixed precision needs use_gpu: true")


@dataclass(frozen=True)
class DPOTrainerConfig(TrainerConfig):
    # base_model is not trained from: DPO starts from the junior's merged checkpoint (its reference model).
    beta: float = 0.1                         # paper: 0.1 (Figure 3 sweeps 0.05-0.3)
    learning_rate: float = 1e-5
    loss_type: str = "sigmoid"                # trl DPO loss; sigmoid is the paper's (standard) DPO

    def __post_init__(self):
        super().__post_init__()
        check(self.beta > 0, "beta", "must be > 0")


def grad_accum_steps(cfg: TrainerConfig) -> int:
    """Gradient accumulation that makes per-device batch x workers x accumulation equal the global batch."""
    return cfg.batch_size // (cfg.per_device_batch_size * cfg.num_workers)


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """auto -> bf16 on GPU, fp32 on CPU (bf16 matmuls are ~5x slower than fp32 on CPU)."""
    if precision == "auto":
        return "bf16" if use_gpu else "fp32"
    return precision


def fsdp_args(cfg: TrainerConfig, transformers_major: int = 5) -> dict:
    """TrainingArguments fields for FSDP2 full sharding (transformers >= 5 takes fsdp=True plus fsdp_config)."""
    fsdp_config = {
        "version": 2,
        "reshard_after_forward": True,          # FULL_SHARD: ZeRO-3-like memory for an 8B model on 8 GPUs
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",   # wraps the model's _no_split_modules (decoder layers)
        "state_dict_type": "FULL_STATE_DICT",   # save_model gathers one HF-loadable checkpoint
        "cpu_ram_efficient_loading": True,      # only rank 0 reads the weights; the others get a broadcast
        # FSDP prefers its own activation checkpointing; TrainingArguments.gradient_checkpointing adds an all-gather
        "activation_checkpointing": cfg.gradient_checkpointing,
    }
    return {"fsdp": True if transformers_major >= 5 else "full_shard auto_wrap", "fsdp_config": fsdp_config,
            "gradient_checkpointing": False}


def deepspeed_zero3_config(cfg: TrainerConfig, precision: str) -> dict:
    """A DeepSpeed ZeRO-3 config for the HF integration ("auto" values are filled in from TrainingArguments)."""
    return {
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "stage3_max_live_parameters": 1e9,
            "stage3_max_reuse_distance": 1e9,
            # save_model gathers the shards into one 16-bit HF checkpoint that vLLM and HF load directly
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 1_000_000,           # the Trainer logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }


def training_args(cfg: TrainerConfig, *, output_dir: str, seed: int, transformers_major: int = 5) -> dict:
    """The TrainingArguments / SFTConfig / DPOConfig fields shared by all three trainers (flat, JSON-able)."""
    precision = resolve_precision(cfg.precision, cfg.use_gpu)
    out = {
        "output_dir": output_dir,
        "per_device_train_batch_size": cfg.per_device_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(cfg),
        "learning_rate": cfg.learning_rate,
        "num_train_epochs": cfg.epochs,
        "max_steps": cfg.max_steps,
        "warmup_steps": float(cfg.warmup_ratio),   # transformers 5: a float in [0, 1) is a ratio of all steps
        "weight_decay": cfg.weight_decay,
        "lr_scheduler_type": cfg.lr_scheduler_type,
        "logging_steps": cfg.logging_steps,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        # Only the main rank rotates its checkpoints (the others write their RNG state, FSDP / ZeRO shards too):
        # train.py's report callback moves every rank's checkpoint out to upload it and deletes it after.
        "save_total_limit": 1,
        "seed": seed,
        "data_seed": seed,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "use_cpu": not cfg.use_gpu,
        "gradient_checkpointing": cfg.gradient_checkpointing,   # trl defaults this to True; we default to False
        "report_to": "none",                    # metrics go through Ray Train
        "disable_tqdm": True,
        "max_length": cfg.max_length,
        "dataloader_num_workers": 0,
        "ddp_find_unused_parameters": False,
        "max_grad_norm": 1.0,
    }
    if cfg.gradient_checkpointing:
        out["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if cfg.strategy == "fsdp":
        out.update(fsdp_args(cfg, transformers_major))
    elif cfg.strategy == "deepspeed_zero3":
        out["deepspeed"] = deepspeed_zero3_config(cfg, precision)
    return out
