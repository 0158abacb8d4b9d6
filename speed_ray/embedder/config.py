"""Config for contrastive embedder training."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from speed_ray.config import check


@dataclass(frozen=True)
class EmbedderConfig:
    base_model: str = "mistralai/Mistral-7B-v0.1"   # hub id, local path, or offline:minilm
    pooling: Literal["auto", "mean", "last_token", "cls"] = "auto"   # auto: last_token for decoders, else mean
    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    temperature: float = 0.02                 # tau in equation 4 (E5-mistral)
    batch_size: int = 1536                    # global contrastive batch (paper)
    mini_batch_size: int = 0                  # > 0: GradCache with chunks of this size per worker
    gather_across_workers: bool = True        # negatives from every worker
    one_task_per_batch: bool = True           # batches hold one task type, so in-batch negatives make sense
    learning_rate: float = 1e-4
    epochs: float = 1.0
    max_steps: int = -1
    warmup_steps: int = 100
    max_query_length: int = 512
    max_doc_length: int = 512
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0              # Ray resources each CPU training worker asks for
    # Threads torch uses in each CPU worker (None: its CPU share). A single worker on an otherwise idle machine
    # can take every core without reserving them. Speed only: not in the fingerprint (speed_ray/threads.py).
    torch_threads: int | None = field(default=None, metadata={"fingerprint": False})
    strategy: Literal["ddp", "deepspeed_zero3"] = "ddp"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    save_steps: int = 100
    max_failures: int = 2
    n_samples: int | None = None              # train on at most this many synthetic triples (scaling sweep; nested)
    task_types: tuple[str, ...] | None = None # keep only these task types (influence study)
    public_data: str | None = None            # pairs or triples (query, positive[, negative, task]): Parquet, JSONL
    #                                           or a local `datasets` directory
    public_fraction: float = 0.0              # share of the training mix from public_data
    no_duplicate_texts: bool = True           # no batch holds a text twice (copies are each other's false negatives)
    train_pairs: bool = True                  # rows without a hard negative (SPEED's short-long matching has none)
                                              # train with in-batch negatives only; false: dropped as incomplete
    symmetric_task_types: tuple[str, ...] = ("sts", "matching_short", "matching_long", "bitext")  # instruction on both sides (E5)
    query_instruction: str = "Given a web search query, retrieve relevant passages that answer the query"  # exported "query" prompt
    # GISTEmbed false-negative masking: in-batch candidates a guide model scores above (its score of the query with
    # its own positive - gist_margin) leave the softmax (https://arxiv.org/abs/2402.16829)
    gist: bool = False
    gist_guide_model: str | None = None       # a sentence-transformers embedder; None: base_model as loaded, frozen
    gist_margin: float = 0.0

    def __post_init__(self):
        check(self.temperature > 0, "temperature", "must be > 0")
        check(self.batch_size >= 2, "batch_size", "must be >= 2 (in-batch negatives)")
        check(self.num_workers >= 1, "num_workers", "must be >= 1")
        check(self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0")
        check(self.torch_threads is None or self.torch_threads >= 1, "torch_threads", "must be >= 1 or null")
        check(self.batch_size % self.num_workers == 0, "batch_size", "must be a multiple of num_workers")
        check(self.mini_batch_size >= 0, "mini_batch_size", "must be >= 0")
        check(0.0 <= self.public_fraction < 1.0, "public_fraction", "must be in [0, 1)")
        check(self.public_fraction == 0 or bool(self.public_data), "public_data",
              "public_fraction > 0 needs public_data")
        check(self.save_steps >= 1, "save_steps", "must be >= 1")
        check(self.strategy == "ddp" or self.use_gpu, "strategy", "deepspeed_zero3 needs use_gpu: true")
        check(self.strategy == "ddp" or self.mini_batch_size == 0, "mini_batch_size",
              "GradCache (mini_batch_size > 0) is not supported with deepspeed_zero3; use strategy: ddp")
        check(self.n_samples is None or self.n_samples > 0, "n_samples", "must be > 0")
