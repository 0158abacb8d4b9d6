"""Shared fixtures: an isolated Ray temp dir, a session-wide local Ray, and the offline tiny models."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EVALDATA = REPO.parent / "shared" / "evaldata"

# Keep Ray's files out of /tmp/ray and ~/.ray, and keep everything offline.
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="speedray-ray-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("SPEED_RAY_PROGRESS", "0")


S3_BUCKET = "speed-ray-rehearsal"


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on loopback, with one bucket; the AWS_* variables point
    every client at it (s3fs, boto3, pyarrow's S3FileSystem) and reach the Ray workers through `ray_local`."""
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "rehearsal", "AWS_SECRET_ACCESS_KEY": "rehearsal", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=S3_BUCKET)
    yield {"bucket": S3_BUCKET, "endpoint": env["AWS_ENDPOINT_URL"], "env": env}
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the whole session (2 CPUs), shut down at the end. Its workers see the test S3 server and
    import the tests' own helpers (tests/faulty_engine.py, a custom engine) from this directory."""
    import ray

    if not ray.is_initialized():
        path = os.pathsep.join(p for p in (os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH"))
                               if p)
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=os.environ["RAY_TMPDIR"],
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                           "PYTHONPATH": path, **s3_server["env"]}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_llama() -> str:
    """Path of a tiny random-weight Llama with a locally trained BPE tokenizer (built once, cached)."""
    from speed_ray.models.offline import prepare_tiny_llama

    return str(prepare_tiny_llama())


@pytest.fixture(scope="session")
def minilm() -> str:
    from speed_ray.models.offline import minilm_path

    return str(minilm_path())


@pytest.fixture(scope="session")
def smollm2() -> str:
    from speed_ray.models.offline import prepare_smollm2

    return str(prepare_smollm2())


@pytest.fixture
def evaldata() -> Path:
    """../shared/evaldata, or skip (a user's clone does not have it)."""
    root = Path(os.environ.get("SPEED_RAY_EVALDATA", EVALDATA))
    if not root.exists():
        pytest.skip(f"offline eval data not found at {root}")
    return root
