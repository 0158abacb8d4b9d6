"""Configs for aligning the generators on Ray Train: junior SFT, senior DPO, revisor SFT."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from speed_ray.config import check


@dataclass(frozen=True)
class TrainerConfig:
    base_model: str = "meta-llama/Meta-Llama-3-8B"   # hub id or local path; offline:smollm2, offline:tiny-llama
    lora: bool = True                         # LoRA adapters (merged into a full checkpoint at the end)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    learning_rate: float = 1e-4
    batch_size: int = 16                      # global batch (per-device batch x workers x grad accumulation)
    per_device_batch_size: int = 4
    epochs: float = 1.0
    max_steps: int = -1                       # > 0 overrides epochs
    max_length: int = 2048
    num_workers: int = 1                      # Ray Train workers
    use_gpu: bool = False
    strategy: Literal["ddp", "fsdp", "deepspeed_zero3"] = "ddp"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"   # auto: fp32 on CPU, bf16 on GPU
    gradient_checkpointing: bool = False
    save_steps: int = 50                      # checkpoint every N steps (the unit of resume)
    max_failures: int = 2                     # Ray Train FailureConfig
    warmup_ratio: float = 0.0
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


@dataclass(frozen=True)
class DPOTrainerConfig(TrainerConfig):
    beta: float = 0.1                         # paper: 0.1 (Figure 3 sweeps 0.05-0.3)
    learning_rate: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        check(self.beta > 0, "beta", "must be > 0")
