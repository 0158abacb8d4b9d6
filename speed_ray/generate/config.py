"""Configs for generation: engines (HF on CPU, vLLM on GPU), the root/synthesis/revision stages, the local server."""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Literal

from speed_ray.config import check

# Field metadata of a setting that checks a stage's output instead of shaping it (min_valid_share): it is left out
# of the stage's fingerprint (speed_ray.pipeline.fingerprint_settings), so changing it reuses the written shards.
CHECK_ONLY = {"fingerprint": False}


def check_min_valid_share(value: float) -> None:
    """min_valid_share: below this share of valid output a stage fails (speed_ray.llm.metrics.check_valid_share),
    keeping its shards, so a rerun resumes. 0 disables the floor; a stage with nothing valid fails whatever it is."""
    check(0.0 <= value <= 1.0, "min_valid_share", "must be in [0, 1] (0 disables the floor)")


def torch_threads_for(torch_threads: int | None, num_cpus: float) -> int:
    """Torch threads for a CPU replica: the configured number, else its CPU reservation rounded (at least 1)."""
    return torch_threads or max(1, math.floor(num_cpus + 0.5))


@dataclass(frozen=True)
class EngineConfig:
    # hf: transformers generate (CPU); vllm: ray.data.llm; stub: the model-free test engine (tests, benchmarks);
    # custom: your own engine, built by `factory` in each replica; openai: any OpenAI-compatible endpoint at
    # base_url (a vLLM server, a hosted API), called through speed_ray.llm.client
    kind: Literal["hf", "vllm", "stub", "custom", "openai"] = "hf"
    model: str | None = None                  # None: the upstream generator's merged checkpoint; openai: the model
    #                                           name the endpoint serves (required)
    base_url: str | None = None               # openai: the endpoint, e.g. http://host:8000/v1 (required)
    api_key_env: str = "OPENAI_API_KEY"       # openai: env var holding the key, read on the driver (none: no header)
    concurrency: int = 16                     # openai: requests in flight per replica
    timeout_s: float = 120.0                  # openai: per attempt
    max_retries: int = 6                      # openai: retries of 429/5xx/timeouts; a row still unanswered is not
    #                                           written and the stage fails naming the error (a rerun resends it)
    factory: str | None = None                # custom: "module:callable", called with the model string; returns an
    #                                           object with generate(list[LLMRequest]) -> list[LLMResult]
    batch_size: int = 8                       # prompts per generate call / vLLM batch
    max_new_tokens: int = 800                 # the SPEED tryout scripts use 800
    max_model_len: int = 4096
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"   # auto: fp32 on CPU, bf16 on GPU
    replicas_min: int = 1                     # actor pool grows between min and max with the autoscaler
    replicas_max: int = 1
    num_gpus_per_replica: float = 0.0
    num_cpus_per_replica: float = 1.0
    torch_threads: int | None = None          # hf: torch threads per replica (None: num_cpus_per_replica, rounded);
    #                                           more than the reservation lets one replica use an idle small box
    tensor_parallel_size: int = 1
    structured_output: bool = True            # JSON-schema-constrained decoding per task type
    enforce_eager: bool = False               # vLLM: skip CUDA graphs (faster start for small runs)
    gpu_memory_utilization: float = 0.9       # vLLM: share of GPU memory for weights + KV cache
    accelerator_type: str | None = None       # vLLM: pin replicas to a GPU type (e.g. "H100", "A10G")
    use_adapter: bool = False                 # load the upstream LoRA adapter on its base model (vLLM: dynamic LoRA; hf: merged at load), else the merged checkpoint
    max_lora_rank: int = 64                   # vLLM: largest LoRA rank it reserves for
    max_restarts: int = -1                    # actor restarts after a worker dies (-1: unlimited)
    max_task_retries: int = -1                # batch retries on a restarted actor (-1: unlimited)

    def __post_init__(self):
        check(self.batch_size > 0, "batch_size", "must be > 0")
        check((self.kind == "custom") == bool(self.factory), "factory",
              "is needed by kind: custom (a 'module:callable' building the engine), and only by it")
        check(not self.factory or ":" in self.factory, "factory", "must be 'module:callable'")
        check((self.kind == "openai") == bool(self.base_url), "base_url",
              "is needed by kind: openai (the endpoint, e.g. http://host:8000/v1), and only by it")
        check(self.kind != "openai" or bool(self.model), "model",
              "is needed by kind: openai (the model name the endpoint serves)")
        check(self.concurrency > 0, "concurrency", "must be > 0")
        check(self.timeout_s > 0, "timeout_s", "must be > 0")
        check(self.max_retries >= 0, "max_retries", "must be >= 0")
        check(self.max_new_tokens > 0, "max_new_tokens", "must be > 0")
        check(1 <= self.replicas_min <= self.replicas_max, "replicas_min",
              "need 1 <= replicas_min <= replicas_max")
        check(self.num_gpus_per_replica >= 0, "num_gpus_per_replica", "must be >= 0")
        check(self.num_cpus_per_replica > 0, "num_cpus_per_replica", "must be > 0")
        check(self.torch_threads is None or self.torch_threads > 0, "torch_threads", "must be > 0")
        check(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]")


@dataclass(frozen=True)
class RootDataConfig:
    n_prompts: int = 10000                    # prompts for D_root; each gets samples_per_prompt outputs
    samples_per_prompt: int = 4               # the list the judge picks best/worst from
    temperature: float = 1.0
    top_p: float = 1.0
    engine: EngineConfig = field(default_factory=EngineConfig)
    min_valid_share: float = field(default=0.5, metadata=CHECK_ONLY)   # floor on the share of the n_prompts x k
    #                                          outputs that parse (see check_min_valid_share); not fingerprinted

    def __post_init__(self):
        check(self.n_prompts > 0, "n_prompts", "must be > 0")
        check(self.samples_per_prompt >= 2, "samples_per_prompt", "must be >= 2 (the judge needs a pair)")
        check_min_valid_share(self.min_valid_share)


@dataclass(frozen=True)
class SynthesisConfig:
    n_samples: int = 1_150_000                # paper: 1.15M raw samples
    temperature: float = 1.0
    top_p: float = 1.0
    shard_size: int = 1000                    # prompts per output shard (the unit of resume)
    engine: EngineConfig = field(default_factory=EngineConfig)
    min_valid_share: float = field(default=0.5, metadata=CHECK_ONLY)   # floor on valid / (valid + rejects)
    #                                          (see check_min_valid_share); not part of the fingerprint. The
    #                                          teacher_synthesis baseline uses teacher.min_valid_share instead

    def __post_init__(self):
        check(self.n_samples > 0, "n_samples", "must be > 0")
        check(self.shard_size > 0, "shard_size", "must be > 0")
        check_min_valid_share(self.min_valid_share)


@dataclass(frozen=True)
class RevisionConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    shard_size: int = 1000
    engine: EngineConfig = field(default_factory=EngineConfig)
    min_valid_share: float = field(default=0.5, metadata=CHECK_ONLY)   # floor on the share of revisions that parse
    #                                          (a failed one keeps its original sample, but a revisor failing on most
    #                                          rows is broken); not part of the fingerprint

    def __post_init__(self):
        check_min_valid_share(self.min_valid_share)


@dataclass(frozen=True)
class LocalServerConfig:
    """A Ray Serve app with an OpenAI-compatible /v1/chat/completions, used as the offline teacher."""

    model: str = "offline:smollm2"
    engine: Literal["hf", "vllm"] = "hf"
    host: str = "127.0.0.1"                   # loopback by default
    port: int = 8011
    replicas: int = 1
    num_cpus: float = 0.5                     # fractional so a 2-CPU Ray does not deadlock
    torch_threads: int | None = None          # hf: torch threads per replica (None: num_cpus, rounded, at least 1)
    num_gpus: float = 0.0
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.05
    max_new_tokens: int = 512

    def __post_init__(self):
        check(0 < self.port < 65536, "port", "must be a TCP port")
        check(self.replicas >= 1, "replicas", "must be >= 1")
        check(self.num_cpus > 0 or self.num_gpus > 0, "num_cpus", "a replica needs num_cpus > 0 or num_gpus > 0")
        check(self.max_batch_size > 0, "max_batch_size", "must be > 0")
        check(self.max_new_tokens > 0, "max_new_tokens", "must be > 0")
        check(self.torch_threads is None or self.torch_threads > 0, "torch_threads", "must be > 0")
