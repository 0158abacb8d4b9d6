"""cluster/ definitions: they load, carry the required keys, name the right entry points, pass Ray's own validation,
give the autoscaler every GPU group's resources so each scales up from zero for the paper config's stages, and
the driver hands the Hugging Face token to every worker without writing it anywhere."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def _load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def test_cluster_launcher_yamls():
    for name, provider in (("aws.yaml", "aws"), ("gcp.yaml", "gcp")):
        c = _load(name)
        for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "head_start_ray_commands",
                    "worker_start_ray_commands", "max_workers"):
            assert key in c, (name, key)
        assert c["provider"]["type"] == provider
        types = c["available_node_types"]
        assert c["head_node_type"] in types
        assert {"gpu_generation", "gpu_training"} <= set(types)
        for group in ("gpu_generation", "gpu_training"):
            assert types[group]["min_workers"] == 0, (name, group)
            assert types[group]["max_workers"] > 0
        assert "ray start --head" in " ".join(c["head_start_ray_commands"])
        assert "ray start --address" in " ".join(c["worker_start_ray_commands"])
        assert "speed-ray[gpu]" in " ".join(c["setup_commands"])
        assert "jobs.speed_pipeline" in (CLUSTER / name).read_text()
        assert c["docker"]["image"].startswith("rayproject/ray:")


def test_kuberay_manifests():
    rc = _load("kuberay/raycluster.yaml")
    assert rc["kind"] == "RayCluster" and rc["apiVersion"].startswith("ray.io/")
    assert rc["spec"]["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"gpu-generation", "gpu-training"}
    for g in groups.values():
        assert g["replicas"] == 0 and g["minReplicas"] == 0 and g["maxReplicas"] > 0
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
    job = _load("kuberay/rayjob.yaml")
    assert job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("python -m jobs.speed_pipeline --config configs/")
    jgroups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert set(jgroups) == set(groups) and all(g["minReplicas"] == 0 for g in jgroups.values())


def test_runtime_env_and_entry_points():
    env = _load("runtime_env.yaml")
    assert ".venv/" in env["excludes"] and "runs/" in env["excludes"]
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    import importlib

    for mod in ("jobs.speed_pipeline", "jobs.dedup", "jobs.train_embedder", "jobs.evaluate"):
        assert importlib.import_module(mod)
    config_refs = [p for p in (REPO / "configs").glob("*.yaml")]
    job_cfg = _load("kuberay/rayjob.yaml")["spec"]["entrypoint"].split("--config ")[1].split()[0]
    assert (REPO / job_cfg).exists() and config_refs


# ---- Ray's own validation, and the autoscaler's view of each worker group before any node exists ----------------

LAUNCHER = ("aws.yaml", "gcp.yaml")
KUBERAY = ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml")
STANDARD = {"CPU", "GPU", "memory", "object_store_memory"}
# (vCPUs, GPUs, GiB of RAM) of the machine types the launcher files use (AWS / GCP instance type pages)
MACHINES = {"m6i.4xlarge": (16, 0, 64), "g6e.xlarge": (4, 1, 32), "p4d.24xlarge": (96, 8, 1152),
            "n2-standard-16": (16, 0, 64), "g2-standard-8": (8, 1, 32), "a2-highgpu-8g": (96, 8, 680)}
# the worker group a GPU stage of configs/paper.yaml starts from zero: all its bundles at once (a trainer's
# placement group) and, for the actor pools that grow one replica at a time, a single replica
TRAINING = ("junior_sft", "senior_dpo", "revisor_sft", "train_embedder")
GENERATION = ("root_data", "synthesis", "revision")


def _prepared(name: str) -> dict:
    """The launcher's own preparation (defaults merged, docker and min/max checked) and validation (ray-schema.json
    through jsonschema, plus its own checks), as `ray up` runs them before asking the cloud for anything."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(_load(name))
    validate_config(cfg)
    return cfg


def _kuberay_config(name: str) -> dict:
    """The autoscaling config the KubeRay autoscaler derives from the RayCluster (or the RayJob's cluster spec):
    Ray's own code, which reads rayStartParams and the Ray container's limits, then runs validate_config."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    doc = _load(name)
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    return _derive_autoscaling_config_from_ray_cr({"metadata": {"name": doc["metadata"]["name"],
                                                                "namespace": "default"}, "spec": spec})


def _autoscaler_view(name: str) -> dict:
    return _prepared(name) if name in LAUNCHER else _kuberay_config(name)


def _worker_groups(cfg: dict) -> dict[str, dict]:
    """Worker node types by a cloud-neutral name (gpu-training -> gpu_training)."""
    return {k.replace("-", "_"): v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def _paper_requests() -> dict[str, list[dict]]:
    """Every GPU stage of configs/paper.yaml as the bundles it asks Ray for (at its largest parallelism): training
    workers from align.train.worker_resources, vLLM replicas from generate.ray_engines.replicas_resources (ray.data.llm
    gives each replica {GPU: 1, CPU: 1} per tensor-parallel rank, plus accelerator_type:X when the config pins one),
    the embedder's Ray Train workers (ScalingConfig(use_gpu=True) without resources_per_worker: {GPU: 1}) and the
    distributed evaluation's encoder tasks (num_gpus=1, num_cpus=0)."""
    from speed_ray.align.train import worker_resources
    from speed_ray.generate.ray_engines import replicas_resources
    from speed_ray.run_config import load_config

    cfg = load_config(str(REPO / "configs" / "paper.yaml"))
    out: dict[str, list[dict]] = {}
    for stage in ("junior_sft", "senior_dpo", "revisor_sft"):
        t = getattr(cfg, stage)
        out[stage] = [worker_resources(t)] * t.num_workers
    for stage in ("root_data", "synthesis", "revision"):
        e = getattr(cfg, stage).engine
        res = replicas_resources(e)
        bundles = ([{"GPU": 1, "CPU": 1}] * e.tensor_parallel_size if e.kind == "vllm" and e.tensor_parallel_size > 1
                   else [{"CPU": res["cpus"], "GPU": res["gpus"]}])
        if e.kind == "vllm" and e.accelerator_type:
            bundles = [{**b, f"accelerator_type:{e.accelerator_type}": 0.001} for b in bundles]
        out[stage] = [{k: v for k, v in b.items() if v} for b in bundles] * e.replicas_max
    if cfg.screen.enabled and cfg.screen.gpus_per_actor:     # the guide's actors (map_batches num_gpus)
        out["screen"] = [{"CPU": cfg.screen.cpus_per_actor, "GPU": cfg.screen.gpus_per_actor}] * cfg.screen.num_actors
    if cfg.embedder.use_gpu:
        out["train_embedder"] = [{"GPU": 1}] * cfg.embedder.num_workers
    if cfg.evaluate.use_gpu and cfg.evaluate.distributed:
        out["evaluate"] = [{"GPU": 1}] * cfg.evaluate.num_workers
    return out


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_yaml_passes_rays_schema_and_preparation(name):
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(_load(name), schema)       # the file as written
    cfg = _prepared(name)                           # and as `ray up` completes it
    assert cfg["provider"]["type"] == name.split(".")[0]


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_worker_groups_declare_their_cpus_gpus_and_memory(name):
    """The autoscaler scales a group from zero only for demands its declared `resources` hold: GCP infers nothing,
    AWS only with ec2:DescribeInstanceTypes at `ray up` time (a failure is only a warning). So every node type
    declares what its machine has, no more: CPU and GPU exactly, memory at most Ray's default 70% of RAM."""
    cfg = _prepared(name)
    for group, nt in cfg["available_node_types"].items():
        nc = nt["node_config"]
        machine = nc.get("InstanceType") or nc.get("machineType")
        cpus, gpus, gib = MACHINES[machine]
        res = nt["resources"]
        assert res.get("CPU") == cpus, (name, group, res)
        assert res.get("GPU", 0) == gpus, (name, group, res)
        if group != cfg["head_node_type"]:
            assert 0 < res.get("memory", 0) <= 0.7 * gib * 2**30, (name, group, res)
        if gpus and "guestAccelerators" in nc:      # GCP: the attached GPUs, their driver, no live migration
            assert sum(a["acceleratorCount"] for a in nc["guestAccelerators"]) == gpus
            items = {i["key"]: i["value"] for i in nc.get("metadata", {}).get("items", [])}
            assert items.get("install-nvidia-driver") == "True", (name, group)
            assert {"onHostMaintenance": "TERMINATE"} in nc["scheduling"]


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_gpu_groups_give_the_autoscaler_their_gpus(name):
    """KubeRay: Ray's autoscaler takes a group's GPUs from rayStartParams num-gpus, else from a limit ending in
    "gpu"; the operator fills `ray start --num-gpus` the same way, unless it fails to parse rayStartParams
    resources first. num-gpus is set explicitly and must equal the nvidia.com/gpu limit."""
    doc = _load(name)
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    view = _worker_groups(_kuberay_config(name))
    for g in spec["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert g["rayStartParams"]["num-gpus"] == str(limits["nvidia.com/gpu"]), g["groupName"]
        res = view[g["groupName"].replace("-", "_")]["resources"]
        assert res["GPU"] == int(limits["nvidia.com/gpu"]) >= 1 and res["CPU"] >= 1, (name, res)
        tolerations = g["template"]["spec"].get("tolerations", [])
        assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), (name, g["groupName"])
    if doc["kind"] == "RayJob":      # the RayJob's ephemeral cluster has the RayCluster's groups, as they are
        rc = {g["groupName"]: g for g in _load("kuberay/raycluster.yaml")["spec"]["workerGroupSpecs"]}
        for g in spec["workerGroupSpecs"]:
            ref = rc[g["groupName"]]
            assert g["rayStartParams"] == ref["rayStartParams"]
            assert g["template"]["spec"]["containers"][0]["resources"] == \
                ref["template"]["spec"]["containers"][0]["resources"]


@pytest.mark.parametrize("name", LAUNCHER + KUBERAY)
def test_custom_resources_are_the_ones_the_stages_request(name):
    """A custom resource a group declares but no stage requests steers nothing (Ray places only by what is asked
    for); one a stage requests but no group declares can never be scaled up for. paper.yaml's stages request none
    (no accelerator_type either), so the groups declare none."""
    declared = {k for nt in _worker_groups(_autoscaler_view(name)).values() for k in nt["resources"]
                if k not in STANDARD}
    requested = {k for bundles in _paper_requests().values() for b in bundles for k in b if k not in STANDARD}
    assert declared == requested, (name, declared, requested)


@pytest.mark.parametrize("name", LAUNCHER + KUBERAY)
def test_paper_stages_scale_up_from_zero(name):
    """From a cluster of just the head, Ray's own resource demand scheduler (the v1 autoscaler's get_nodes_for,
    with its default utilization scorer) finds worker nodes for every bundle of every GPU stage of paper.yaml:
    each bundle fits a group and the groups' max_workers hold them all. A trainer's workers start gpu_training
    nodes (not one 1-GPU node per worker: that needs each group's memory declared, which evens the scorer's
    min-utilization term); a vLLM replica starts a gpu_generation node. A burst of replicas may be packed onto a
    gpu_training node: no stage requests a group by name (no custom resources), the scorer picks the best fit."""
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

    cfg = _autoscaler_view(name)
    types, head = cfg["available_node_types"], cfg["head_node_type"]
    scorer = functools.partial(_default_utilization_scorer,
                               node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))
    groups = _worker_groups(cfg)
    for stage, bundles in _paper_requests().items():
        for b in bundles:
            assert any(all(nt["resources"].get(k, 0) >= v for k, v in b.items()) for nt in groups.values()), \
                (name, stage, b)
        def launch(demand):
            to_add, unplaced = get_nodes_for(types, {head: 1}, head, cfg["max_workers"], list(demand),
                                             utilization_scorer=scorer)
            assert unplaced == [] and to_add and head not in to_add, (name, stage, to_add, unplaced)
            return {k.replace("-", "_") for k in to_add}

        landed = launch(bundles)
        if stage in TRAINING:
            assert landed == {"gpu_training"}, (name, stage, landed)
        if stage in GENERATION:
            assert launch(bundles[:1]) == {"gpu_generation"}, (name, stage)


# ---- the Hugging Face token: from the driver to every worker, never into a log, a runtime env or a manifest -----

_HEAD = textwrap.dedent("""
    import sys, ray
    info = ray.init(num_cpus=2, include_dashboard=False, _temp_dir=sys.argv[1])
    print(info.address_info["gcs_address"], flush=True)
    sys.stdin.read()       # until the test closes stdin
""")

_DRIVER = textwrap.dedent("""
    import hashlib, json, os, sys
    import ray
    from speed_ray.raylocal import ensure_ray
    from speed_ray.run_config import build_config
    from speed_ray.pipeline import run_pipeline

    def seen():
        return {k: hashlib.sha256(os.environ[k].encode()).hexdigest() if os.environ.get(k) else None
                for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}

    ensure_ray(os.environ["SR_TEST_ADDRESS"])
    task = ray.remote(num_cpus=0)(seen)

    @ray.remote(num_cpus=0)
    class Probe:
        def seen(self):
            return seen()

    out = {"task": ray.get(task.remote()),
           "task_with_own_env": ray.get(task.options(runtime_env={"env_vars": {"X": "1"}}).remote()),
           "actor": ray.get(Probe.remote().seen.remote()),
           "job_env": ray.get_runtime_context().runtime_env}
    cfg = build_config({"run": {"name": "tok", "run_dir": sys.argv[1], "seed": 0},
                        "topics": {"source": "iab", "n_topics": 4}})
    run_pipeline(cfg, stages=["topics"])
    print("RESULT " + json.dumps(out, default=str), flush=True)
""")


@pytest.fixture(scope="module")
def bare_ray_head():
    """A Ray cluster started by another process whose environment has no hub token (and no token file), like a
    cluster's nodes: its workers see a token only if the driver forwards it."""
    tmp = tempfile.mkdtemp(prefix="srtok-")          # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "RAY_ADDRESS")}
    env["HF_HOME"] = os.path.join(tmp, "hf-empty")
    env["RAY_AUTH_MODE"] = "disabled"                 # a plain cluster; a local ray.init() would turn token auth on
    head = subprocess.Popen([sys.executable, "-c", _HEAD, os.path.join(tmp, "ray")], env=env, cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        address = head.stdout.readline().strip()
        assert address, "the Ray head did not start"
        yield address, os.path.join(tmp, "ray")
    finally:
        head.stdin.close()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
            head.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def _files_containing(root, needle: bytes) -> list[str]:
    hits = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                with open(p, "rb") as fh:
                    if needle in fh.read():
                        hits.append(p)
            except OSError:
                pass
    return hits


@pytest.mark.rehearsal    # the `ray job submit` path on a separately started Ray (~1 min)
@pytest.mark.parametrize("in_job", [True, False], ids=["ray-job-submit", "plain-driver"])
def test_hub_token_reaches_every_worker_and_no_log(bare_ray_head, tmp_path, in_job):
    """HF_TOKEN only in the driver's environment: every task and actor of the job sees it as HF_TOKEN and
    HUGGING_FACE_HUB_TOKEN, also one with its own runtime_env, both when the driver runs under `ray job submit`
    (the job's runtime env is cluster/runtime_env.yaml's, given to the driver the way Ray's job supervisor does) and
    when it connects directly; the token is in no file of the Ray session (logs), the job's runtime env, the
    driver's output, nor the run directory (manifests, saved config)."""
    address, ray_dir = bare_ray_head
    token = "hf_" + secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "RAY_ADDRESS")}
    env.update(HF_TOKEN=token, SR_TEST_ADDRESS=address, HF_HOME=str(tmp_path / "hf-empty"), RAY_AUTH_MODE="disabled")
    if in_job:
        job_env = {"env_vars": dict(_load("runtime_env.yaml")["env_vars"])}
        env.update(job_env["env_vars"])
        env["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps({"runtime_env": job_env, "metadata": {}})
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(run_dir)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    digest = hashlib.sha256(token.encode()).hexdigest()
    for where in ("task", "task_with_own_env", "actor"):
        assert out[where] == {"HF_TOKEN": digest, "HUGGING_FACE_HUB_TOKEN": digest}, (where, out)
    if in_job:     # the job's own runtime env still applies, merged with the driver's
        assert out["job_env"]["env_vars"]["SPEED_RAY_PROGRESS"] == "1"
    assert token not in json.dumps(out) and token not in proc.stdout + proc.stderr
    assert (run_dir / "runs").exists() or any(run_dir.iterdir())
    assert _files_containing(run_dir, token.encode()) == []
    assert _files_containing(ray_dir, token.encode()) == []
