"""Config for serving the embedder (an OpenAI-compatible /v1/embeddings on Ray Serve)."""

from __future__ import annotations

from dataclasses import dataclass

from speed_ray.config import check


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"                   # loopback by default; other hosts need a token
    port: int = 8000                          # Serve HTTP port
    replicas_min: int = 1                     # autoscaling bounds (equal: a fixed replica count)
    replicas_max: int = 1
    num_cpus: float = 0.5                     # per replica; fractional so a small Ray does not deadlock
    num_gpus: float = 0.0                     # per replica; > 0 encodes on the GPU
    max_batch_size: int = 512                 # serve.batch: texts per batched encode (raised to max_inputs if lower)
    batch_wait_timeout_s: float = 0.01        # how long a batch waits to fill
    max_inputs: int = 256                     # items per request (413 above)
    max_input_chars: int = 16000              # per text (413 above)
    token_env: str = "SPEED_RAY_API_TOKEN"    # bearer token from this env var ...
    token_file: str | None = None             # ... or this file
    allow_unauthenticated_public: bool = False   # bind a non-loopback host with no token
    encode_batch_size: int = 64               # texts per forward pass inside a replica
    target_ongoing_requests: float = 8.0      # autoscaling target per replica (when replicas_max > replicas_min)
    torch_threads: int | None = None          # CPU intra-op threads per replica; None: max(1, num_cpus) as Ray sets
    model_name: str | None = None             # the id /v1/models reports; None: the model argument

    def __post_init__(self):
        check(0 < self.port < 65536, "port", "must be a TCP port")
        check(1 <= self.replicas_min <= self.replicas_max, "replicas_min", "need 1 <= replicas_min <= replicas_max")
        check(self.max_inputs > 0, "max_inputs", "must be > 0")
        check(self.max_input_chars > 0, "max_input_chars", "must be > 0")
        check(self.max_batch_size > 0, "max_batch_size", "must be > 0")
        check(self.encode_batch_size > 0, "encode_batch_size", "must be > 0")
        check(self.num_cpus > 0 or self.num_gpus > 0, "num_cpus", "a replica needs num_cpus > 0 or num_gpus > 0")
        check(self.torch_threads is None or self.torch_threads > 0, "torch_threads", "must be > 0")
