"""A real two-node Ray cluster on this machine: `ray start --head` + `ray start --address`, a job submitted
through the Jobs API with the repo as working dir and cluster/runtime_env.yaml, outputs checked in the run dir.
Only the processes this test started are stopped (by pid, found through the cluster's own temp dir)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    """Two nodes on one host (and other Ray clusters beside them) must not share agent/metrics ports."""
    return [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
            f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}"]


def _ours(marker: str) -> list[psutil.Process]:
    procs = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return procs


@pytest.fixture(scope="module")
def two_node_cluster():
    import secrets

    temp = tempfile.mkdtemp(prefix="speedray-2node-")
    gcs, dash = _free_port(), _free_port()
    # Ray >= 2.5x enables token auth: give this cluster its own token, shared by both nodes and the Jobs client.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    saved = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)
    # The nodes' `python` is this environment's, as on a cluster image with speed-ray installed.
    env = {**os.environ, "RAY_TMPDIR": temp, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    head = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=1",
            f"--temp-dir={temp}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}", "--disable-usage-stats", f"--ray-client-server-port={_free_port()}",
            *_node_ports()]
    subprocess.run(head, check=True, env=env, capture_output=True, timeout=180)
    try:
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                        "--disable-usage-stats", *_node_ports()], check=True, env=env, capture_output=True, timeout=180)
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "temp": temp}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        procs = {p.pid: p for p in _ours(temp) + _ours(f":{gcs}")}.values()
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=20)
        for p in alive:
            p.kill()


def test_two_nodes_joined(two_node_cluster):
    out = subprocess.run([sys.executable, "-c", "import ray, json; ray.init(address='%s', log_to_driver=False);"
                          "print(json.dumps([n['Alive'] for n in ray.nodes()]))" % two_node_cluster["gcs"]],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RAY_TMPDIR": two_node_cluster["temp"]})
    assert out.returncode == 0, out.stderr[-2000:]
    alive = json.loads(out.stdout.strip().splitlines()[-1])
    assert alive.count(True) == 2, out.stderr


def test_submit_pipeline_job_with_ray_job_submit(two_node_cluster, tmp_path):
    """`ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python -m jobs.speed_pipeline ...`,
    run as a user runs it (a separate process, so this test process's own Ray session plays no part)."""
    run_dir = tmp_path / "run"
    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"].update({"HF_HUB_OFFLINE": "1", "SPEED_RAY_PROGRESS": "0"})
    env_file = tmp_path / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump(runtime_env))
    # The cheap head of the tiny pipeline (no LLM): proves submission, stage execution on the cluster and the store.
    cmd = [RAY, "job", "submit", "--address", two_node_cluster["dashboard"], "--working-dir", str(REPO),
           "--runtime-env", str(env_file), "--", "python", "-m", "jobs.speed_pipeline", "--config",
           "configs/tiny.yaml", "--stages", "topics", f"run.run_dir={run_dir}", "run.num_cpus=null"]
    env = {**os.environ, "RAY_TMPDIR": two_node_cluster["temp"]}
    deadline = time.time() + 600
    while True:  # the job agent may still be starting ("No available agent to submit job")
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
        logs = out.stdout + out.stderr
        if out.returncode == 0 or "No available agent" not in logs or time.time() > deadline:
            break
        time.sleep(3)
    assert out.returncode == 0, logs[-3000:]
    assert "succeeded" in logs.lower(), logs[-2000:]
    manifests = list(run_dir.glob("stages/topics/*/manifest.json"))
    assert len(manifests) == 1, logs[-2000:]
    man = json.loads(manifests[0].read_text())
    assert man["rows"] > 0 and man["stage"] == "topics"
    assert (run_dir / "runs" / "tiny" / "plan.json").exists()
    assert "[topics] done" in logs
