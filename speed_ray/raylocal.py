"""Connect to the cluster named by the config or RAY_ADDRESS, or start a local Ray on demand."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("speed_ray")


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Idempotent ray.init: an existing connection is reused; inside a Ray job this joins its cluster."""
    import ray
    import ray.data

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {k: v for k, v in os.environ.items()
                        if k.startswith(("SPEED_RAY_", "HF_", "TRANSFORMERS_")) or k in ("RAY_TMPDIR",)}}
    if address:
        log.info("connecting to Ray at %s", address)
        # Inside `ray job submit` the job's runtime env (working dir, env vars) already applies; passing another
        # one here would fail to merge with it.
        in_job = bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))
        ray.init(address=address, runtime_env=None if in_job else env, log_to_driver=True)
    else:
        log.info("starting a local Ray (num_cpus=%s)", num_cpus)
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("SPEED_RAY_PROGRESS", "1") == "1"
