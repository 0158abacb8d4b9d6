"""Config for serving the embedder."""

from __future__ import annotations

from dataclasses import dataclass

from speed_ray.config import check


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    replicas_min: int = 1
    replicas_max: int = 1
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    max_batch_size: int = 64                  # serve.batch
    batch_wait_timeout_s: float = 0.01
    max_inputs: int = 256                     # items per request (413 above)
    max_input_chars: int = 16000              # per text (413 above)
    token_env: str = "SPEED_RAY_API_TOKEN"    # bearer token from this env var ...
    token_file: str | None = None             # ... or this file
    allow_unauthenticated_public: bool = False   # bind a non-loopback host with no token

    def __post_init__(self):
        check(0 < self.port < 65536, "port", "must be a TCP port")
        check(1 <= self.replicas_min <= self.replicas_max, "replicas_min", "need 1 <= replicas_min <= replicas_max")
        check(self.max_inputs > 0, "max_inputs", "must be > 0")
