"""Connect to the cluster named by the config or RAY_ADDRESS, or start a local Ray on demand.

The Hugging Face token (gated models: Llama 3, Mistral) reaches every worker of the job from the driver: HF_TOKEN or
HUGGING_FACE_HUB_TOKEN in the driver's environment, else huggingface_hub's token file (`hf auth login`). It travels
as a `worker_process_setup_hook` (a pickled function, stored in the GCS) that sets both variables in each worker
process, never as runtime_env env_vars: Ray logs the serialized runtime env (runtime_env_agent.log on every node)
and shows it in the dashboard, so a token there would be written to disk on every node.
"""

from __future__ import annotations

import json
import logging
import os
import re

log = logging.getLogger("speed_ray")

HUB_TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")   # huggingface_hub reads the first, older libraries the second
FORWARDED_PREFIXES = ("SPEED_RAY_", "HF_", "TRANSFORMERS_")
_SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)


def hub_token() -> str | None:
    """The driver's Hugging Face token: HF_TOKEN / HUGGING_FACE_HUB_TOKEN, else the token file huggingface_hub uses."""
    for name in HUB_TOKEN_VARS:
        if os.environ.get(name):
            return os.environ[name]
    try:
        from huggingface_hub import get_token

        return get_token() or None
    except Exception:   # no huggingface_hub, an unreadable token file: no token
        return None


def hub_token_hook(token: str):
    """A worker_process_setup_hook that gives every worker process the token under both names (a worker whose node
    already has its own keeps it)."""
    names = HUB_TOKEN_VARS

    def speed_ray_hub_token():
        import os

        for name in names:
            if not os.environ.get(name):
                os.environ[name] = token

    return speed_ray_hub_token


def forwarded_env() -> dict[str, str]:
    """The driver's settings its workers get as env_vars (offline flags, caches); nothing that looks like a secret."""
    return {k: v for k, v in os.environ.items()
            if (k.startswith(FORWARDED_PREFIXES) or k == "RAY_TMPDIR") and not _SECRET_NAME.search(k)}


def _job_runtime_env() -> dict | None:
    """The runtime env of the `ray job submit` job this driver runs in (None: not in a job)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if raw is None:
        return {} if os.environ.get("RAY_JOB_ID") else None
    try:
        return json.loads(raw).get("runtime_env") or {}
    except ValueError:
        return {}


def cluster_runtime_env() -> dict | None:
    """The runtime env a driver connecting to a cluster passes to ray.init. Outside a job: the forwarded settings.
    Inside one, the job's runtime env already applies and ray.init's is merged into it, failing on any key both
    set, so only the token hook is added."""
    job_env = _job_runtime_env()
    env: dict = {"env_vars": forwarded_env()} if job_env is None else {}
    token = hub_token()
    if token:
        if job_env and job_env.get("worker_process_setup_hook"):
            log.warning("the job's runtime env has its own worker_process_setup_hook: the Hugging Face token is not "
                        "forwarded to the workers (set HF_TOKEN on every node instead)")
        else:
            env["worker_process_setup_hook"] = hub_token_hook(token)
    return env or None


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Idempotent ray.init: an existing connection is reused; inside a Ray job this joins its cluster."""
    import ray
    import ray.data

    if ray.is_initialized():
        return
    # Loggers only: touching ray.data's DataContext before ray.init, in a job's driver, lost the job's working
    # dir (Ray deleted its package; the next import failed), so the context is set once connected.
    _quiet_loggers()
    level = logging.INFO if verbose() else logging.WARNING
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, runtime_env=cluster_runtime_env(), log_to_driver=True, logging_level=level)
    else:
        log.info("starting a local Ray (num_cpus=%s)", num_cpus)
        # local workers are children of this process: they inherit its environment, token included
        env: dict = {"env_vars": forwarded_env()}
        if not verbose():
            env["worker_process_setup_hook"] = "speed_ray.raylocal.quiet_worker_logs"
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=True,
                 logging_level=level)
    quiet_ray()


def verbose() -> bool:
    """`speed-ray -v` (SPEED_RAY_VERBOSE=1): Ray's own progress bars, execution plans and INFO logs come back."""
    return os.environ.get("SPEED_RAY_VERBOSE", "0") == "1"


def quiet_ray() -> None:
    """Ray Data's operator progress bars ("Total Progress: 0/?" every few seconds), its execution-start notes
    and Ray's INFO logs are off unless verbose: speed-ray's own progress lines (speed_ray/monitor.py) say
    what each stage did in its units."""
    import ray.data

    on = verbose()
    _quiet_loggers()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = on
    ctx.enable_operator_progress_bars = on
    ctx.print_on_execution_start = on
    ctx.verbose_stats_logs = on
    ctx.enable_auto_log_stats = on


def quiet_worker_logs() -> None:
    """worker_process_setup_hook of a local Ray (unless verbose): Ray Train's INFO lines from its workers
    ("Checkpoint successfully created", "Reporting training result") and its placement-group cleaner's warning
    every few seconds that the state API is unavailable (a local Ray runs without the dashboard that serves it)
    stay out of the driver's terminal."""
    for name in ("ray.train", "ray.tune", "ray.data", "ray.serve"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def _quiet_loggers() -> None:
    on = verbose()
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve"):
        logging.getLogger(name).setLevel(logging.INFO if on else logging.WARNING)
    # its "Progress bars disabled. To enable, set ..." warning: off on purpose, and -v turns them back on
    logging.getLogger("ray.data._internal.progress").setLevel(logging.INFO if on else logging.ERROR)
