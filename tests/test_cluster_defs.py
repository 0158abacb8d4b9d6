"""cluster/ definitions: they load, carry the required keys, name the right entry points, and scale from zero."""

from __future__ import annotations

from pathlib import Path

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
