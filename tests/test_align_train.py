"""SFT and DPO on a real local Ray Train cluster with TRL: losses move, checkpoints resume, workers agree."""

from __future__ import annotations

import json
import os
import sys

import pytest

from speed_ray.align.config import TrainerConfig
from speed_ray.align.data import to_columns
from speed_ray.align.stages import junior_sft_stage, revisor_sft_stage, senior_dpo_stage
from speed_ray.stage import StageContext
from speed_ray.run_config import build_config
from speed_ray.store import RunStore
from test_align_trl import completion_logps  # noqa: E402  (tests/ is on sys.path under pytest)

TOPICS = ["owls", "rivers", "chess", "tea", "volcanoes", "jazz", "bridges", "comets"]


def _prompt(topic: str) -> str:
    return json.dumps([{"role": "user", "content": f"Task: retrieve documents about {topic}. Write a JSON object "
                                                   f"with keys query, positive, hard_negative."}])


def _sample(topic: str) -> str:
    return json.dumps({"query": f"what about {topic}", "positive": f"The {topic} document.",
                       "hard_negative": "The quick brown fox."})


def _seed_rows(n: int = 16) -> list[dict]:
    return [{"id": f"s{i}", "prompt": _prompt(TOPICS[i % len(TOPICS)]), "sample": _sample(TOPICS[i % len(TOPICS)]),
             "text": "", "task_type": "retrieval", "valid": True} for i in range(n)]


def _pair_rows(n: int = 16) -> list[dict]:
    return [{"id": f"p{i}", "prompt": _prompt(TOPICS[i % len(TOPICS)]), "chosen": _sample(TOPICS[i % len(TOPICS)]),
             "rejected": "sports games business 0 1 2 3 [ ] label"} for i in range(n)]


def _stage_ctx(cfg, store: RunStore, name: str, inputs: dict) -> StageContext:
    return StageContext(cfg=cfg, name=name, out=store.stage(name, "test"), inputs=inputs, store=store, run_name="t")


def _upstream(store: RunStore, name: str, rows: list[dict], manifest: dict | None = None):
    out = store.stage(name, "test")
    if rows:
        out.write_shard("part-0", rows)
    out.write_manifest(manifest or {"stage": name})
    return out


def _mean(xs):
    return sum(xs) / len(xs)


_completion_logps = completion_logps


SFT = {"base_model": "offline:tiny-llama", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "learning_rate": 3e-3,
       "batch_size": 8, "per_device_batch_size": 4, "max_steps": 8, "save_steps": 4, "max_length": 128}


def _cfg(tmp_path, **sections):
    return build_config({"run": {"run_dir": str(tmp_path / "run"), "seed": 0}, **sections})


def _run_junior(cfg, store):
    seed_rows = _seed_rows() + [{"id": "bad", "prompt": "oops", "sample": "{}", "valid": True}]
    seed = _upstream(store, "seed_data", seed_rows)
    junior = junior_sft_stage(_stage_ctx(cfg, store, "junior_sft", {"data": seed}))
    store.stage("junior_sft", "test").write_manifest(junior)
    return junior


def test_junior_sft_stage_on_ray_train(ray_local, tiny_llama, tmp_path):
    """The junior stage trains on D_seed under Ray Train and returns the manifest contract: a merged HF
    checkpoint, its adapter, the base, final metrics, the config; checkpoints live in the stage's storage."""
    from speed_ray.align.train import latest_checkpoint

    cfg = _cfg(tmp_path, junior_sft={**SFT, "max_steps": 4, "save_steps": 2})
    store = RunStore(cfg.run.run_dir)
    junior = _run_junior(cfg, store)
    assert junior["base_model"] == tiny_llama and junior["train_examples"] == 16
    assert junior["skipped_rows"] == {"malformed: JSONDecodeError": 1}
    m = junior["metrics"]
    assert m["global_step"] == 4 and m["resumed_from_step"] == 0 and m["world_size"] == 1
    assert m["last_loss"] < m["first_loss"]
    # where the stage's time went: the workers' own setup, steps and final save sit inside the driver's fit
    phases = [m["setup_seconds"], m["train_seconds"], m["save_seconds"]]
    assert all(p > 0 for p in phases) and sum(phases) <= junior["fit_seconds"], (phases, junior["fit_seconds"])
    assert junior["train_config"]["learning_rate"] == 3e-3
    out = store.stage("junior_sft", "test")
    assert junior["model_path"] == out.artifact("model") and junior["adapter_path"] == out.artifact("adapter")
    assert os.path.exists(os.path.join(junior["adapter_path"], "adapter_config.json"))
    assert os.path.exists(os.path.join(junior["model_path"], "model.safetensors"))
    assert not os.path.exists(os.path.join(junior["model_path"], "adapter_config.json"))   # merged, not an adapter
    assert latest_checkpoint(out.artifacts_url)[1] == 4
    assert not out.shard_names()      # a training stage writes artifacts, no data shards
    from speed_ray.progress import read_steps   # each logged step, for progress and the report's loss curves

    logged = [s for s in read_steps(open(out.artifact("progress", "steps.jsonl")).read()) if "loss" in s]
    assert [(s["step"], s["total_steps"]) for s in logged] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert logged[0]["loss"] == pytest.approx(m["first_loss"]) and logged[-1]["loss"] == pytest.approx(m["last_loss"])

    from transformers import AutoModelForCausalLM, AutoTokenizer   # what HF generation engines do

    AutoModelForCausalLM.from_pretrained(junior["model_path"])
    assert AutoTokenizer.from_pretrained(junior["model_path"]).chat_template


@pytest.mark.slow
def test_senior_dpo_stage_starts_from_the_junior(ray_local, tiny_llama, tmp_path):
    cfg = _cfg(tmp_path, junior_sft=SFT,
               senior_dpo={**SFT, "beta": 0.1, "learning_rate": 5e-3, "max_steps": 6, "save_steps": 3,
                           "batch_size": 4, "per_device_batch_size": 2, "max_length": 160})
    store = RunStore(cfg.run.run_dir)
    junior = _run_junior(cfg, store)
    pairs = _upstream(store, "judge", _pair_rows() + [{"id": "same", "prompt": _prompt("x"), "chosen": "a",
                                                       "rejected": "a"}])
    senior = senior_dpo_stage(_stage_ctx(cfg, store, "senior_dpo",
                                         {"pairs": pairs, "reference": store.stage("junior_sft", "test")}))
    assert senior["base_model"] == junior["model_path"]           # the junior is the start and the reference
    assert senior["skipped_rows"] == {"identical_pair": 1}
    m = senior["metrics"]
    assert m["global_step"] == 6 and m["last_rewards/margins"] > m["first_rewards/margins"]

    pp = [json.loads(r["prompt"]) for r in _pair_rows(8)]
    chosen, rejected = [r["chosen"] for r in _pair_rows(8)], [r["rejected"] for r in _pair_rows(8)]
    jr, sr = junior["model_path"], senior["model_path"]
    ref_c, ref_r = _completion_logps(jr, pp, chosen), _completion_logps(jr, pp, rejected)
    pol_c, pol_r = _completion_logps(sr, pp, chosen), _completion_logps(sr, pp, rejected)
    margins = [0.1 * ((pc - rc) - (pr - rr)) for pc, rc, pr, rr in zip(pol_c, ref_c, pol_r, ref_r)]
    assert _mean(margins) > 0.05 and sum(x > 0 for x in margins) >= 6, margins


@pytest.mark.slow
def test_revisor_sft_stage(ray_local, tiny_llama, tmp_path):
    cfg = build_config({"run": {"run_dir": str(tmp_path / "run"), "seed": 0},
                        "revisor_sft": {**SFT, "max_steps": 4, "save_steps": 2, "max_length": 1024, "n_samples": 12}})
    store = RunStore(cfg.run.run_dir)
    rows = [{"id": f"r{i}", "prompt": _prompt(t), "root_text": '{"query": "x"}', "revised_text": _sample(t)}
            for i, t in enumerate(TOPICS * 2)]
    data = _upstream(store, "revise_signals", rows)
    res = revisor_sft_stage(_stage_ctx(cfg, store, "revisor_sft", {"data": data}))
    assert res["train_examples"] == 12 and res["metrics"]["global_step"] == 4
    assert res["metrics"]["examples"] == 12 and res["metrics"]["examples_dropped_too_long"] == 0
    assert os.path.exists(os.path.join(res["model_path"], "model.safetensors"))
    assert res["metrics"]["last_loss"] < res["metrics"]["first_loss"]


# ---- recovery and data parallelism (train_sft directly, with a worker that dies once) -----------------------

class DieOnce:
    """A TrainerCallback that kills its worker process (no cleanup) at a step, the first time only."""

    def __init__(self, at_step: int, marker: str):
        self.at_step, self.marker = at_step, marker

    def __getattr__(self, name):          # every other TrainerCallback event is a no-op
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step and not os.path.exists(self.marker):
            with open(self.marker, "w") as f:
                f.write("died")
            os._exit(1)


def _sft_job(tmp_path, name: str, **over):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data.parquet"
    if not data.exists():
        ex = [{"id": r["id"], "prompt": json.loads(r["prompt"]),
               "completion": [{"role": "assistant", "content": r["sample"]}]} for r in _seed_rows()]
        pq.write_table(pa.table(to_columns(ex)), str(data))
    d = tmp_path / name
    return str(data), dict(model_url=str(d / "model"), adapter_url=str(d / "adapter"), storage_url=str(d / "ray"),
                           metrics_url=str(d / "metrics.json"))


@pytest.fixture
def pickle_callbacks_by_value():
    # Ray workers cannot import this test module by name; ship its classes by value (Ray's own cloudpickle).
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.slow
def test_killed_run_reruns_from_its_checkpoint(ray_local, tiny_llama, tmp_path, pickle_callbacks_by_value):
    from speed_ray.align.train import latest_checkpoint, train_sft

    cfg = TrainerConfig(**{**SFT, "base_model": tiny_llama, "max_steps": 6, "save_steps": 2, "max_failures": 0})
    data, paths = _sft_job(tmp_path, "run")
    die = DieOnce(at_step=5, marker=str(tmp_path / "died"))
    with pytest.raises(Exception):
        train_sft(data, cfg, base_model=tiny_llama, callbacks=(die,), **paths)
    assert os.path.exists(tmp_path / "died") and not os.path.exists(paths["metrics_url"])
    assert latest_checkpoint(paths["storage_url"])[1] == 4

    metrics = train_sft(data, cfg, base_model=tiny_llama, callbacks=(die,), **paths)   # the job is run again
    assert metrics["resumed_from_step"] == 4 and metrics["global_step"] == 6
    hist = json.load(open(paths["metrics_url"]))["log_history"]
    assert [h["step"] for h in hist if "loss" in h] == [1, 2, 3, 4, 5, 6]   # steps 1-4 restored, 5-6 trained


@pytest.mark.slow
def test_worker_death_is_recovered_within_the_run(ray_local, tiny_llama, tmp_path, pickle_callbacks_by_value):
    from speed_ray.align.train import train_sft

    cfg = TrainerConfig(**{**SFT, "base_model": tiny_llama, "max_steps": 6, "save_steps": 2, "max_failures": 1})
    data, paths = _sft_job(tmp_path, "run")
    metrics = train_sft(data, cfg, base_model=tiny_llama, callbacks=(DieOnce(3, str(tmp_path / "died")),), **paths)
    assert os.path.exists(tmp_path / "died")
    assert metrics["resumed_from_step"] == 2 and metrics["global_step"] == 6


@pytest.mark.slow
def test_two_workers_match_one_on_the_same_global_batch(ray_local, tiny_llama, tmp_path):
    import torch
    from safetensors.torch import load_file

    from speed_ray.align.train import train_sft

    results = {}
    for workers in (1, 2):
        cfg = TrainerConfig(**{**SFT, "base_model": tiny_llama, "num_workers": workers, "max_steps": 4})
        data, paths = _sft_job(tmp_path, f"w{workers}")
        metrics = train_sft(data, cfg, base_model=tiny_llama, **paths)
        assert metrics["world_size"] == workers and metrics["epoch"] == 2.0   # 16 rows / 8 per step: data sharded
        results[workers] = (metrics, load_file(os.path.join(paths["adapter_url"], "adapter_model.safetensors")))
    (m1, a1), (m2, a2) = results[1], results[2]
    assert m1["first_loss"] == pytest.approx(m2["first_loss"], rel=1e-4)
    assert m1["last_loss"] == pytest.approx(m2["last_loss"], rel=1e-4)
    assert a1.keys() == a2.keys()
    for k in a1:
        torch.testing.assert_close(a1[k], a2[k], atol=1e-5, rtol=1e-4)


# ---- checkpoint disk: bounded on every rank, locally and in storage -------------------------------------------

class DiskProbe:
    """A TrainerCallback that records, on each rank after each save (it runs after the report callback), the HF
    checkpoint dirs left in that rank's output_dir and what its scratch dir holds."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_save(self, args, state, control, **kwargs):
        scratch = os.path.dirname(args.output_dir.rstrip("/"))
        rec = {"step": state.global_step,
               "checkpoints": sorted(n for n in os.listdir(args.output_dir) if n.startswith("checkpoint-")),
               "scratch": sorted(os.listdir(scratch))}
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"rank{args.process_index}.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")


@pytest.mark.rehearsal    # the multi-rank checkpoint path of the paper's 8-worker FSDP runs, on 2 CPU workers (~2 min)
def test_checkpoint_disk_is_bounded_on_every_rank(ray_local, tiny_llama, tmp_path, pickle_callbacks_by_value):
    """2 CPU workers, a save every step: after each save no rank keeps an HF checkpoint (the HF Trainer rotates on
    rank 0 only, so rank 1's checkpoint-N dirs used to pile up) and no staging copy; after the run the scratch
    root holds no dir of this run and none of a dead worker; storage keeps keep_checkpoints, each with every
    rank's files."""
    from speed_ray.align.train import RAY_RUN_NAME, SCRATCH, latest_checkpoint, train_sft

    root = tmp_path / "scratch" / SCRATCH
    dead = root / "sft-rank1-pid999999999-x1"          # a worker killed before its cleanup (pid > pid_max)
    (dead / "hf" / "checkpoint-2").mkdir(parents=True)
    live = root / f"sft-rank0-pid{os.getpid()}-x2"     # a live process's dir: left alone
    live.mkdir()
    cfg = TrainerConfig(**{**SFT, "base_model": tiny_llama, "num_workers": 2, "max_steps": 3, "save_steps": 1,
                           "keep_checkpoints": 2, "scratch_dir": str(tmp_path / "scratch")})
    data, paths = _sft_job(tmp_path, "run")
    metrics = train_sft(data, cfg, base_model=tiny_llama, callbacks=(DiskProbe(str(tmp_path / "probe")),), **paths)
    assert metrics["world_size"] == 2 and metrics["global_step"] == 3

    for rank in (1, 0):
        recs = [json.loads(line) for line in open(tmp_path / "probe" / f"rank{rank}.jsonl")]
        assert [r["step"] for r in recs] == [1, 2, 3], (rank, recs)
        assert all(r["checkpoints"] == [] for r in recs), (rank, recs)      # nothing piles up in output_dir
        assert all(r["scratch"] == ["hf"] for r in recs), (rank, recs)      # no staging copy left per report
    assert sorted(os.listdir(root)) == [live.name]

    run = os.path.join(paths["storage_url"], RAY_RUN_NAME)
    ckpts = sorted(n for n in os.listdir(run) if n.startswith("checkpoint_") and os.path.isdir(os.path.join(run, n)))
    assert len(ckpts) == 2, ckpts                                          # CheckpointConfig(num_to_keep)
    url, step = latest_checkpoint(paths["storage_url"])
    assert step == 3
    files = set(os.listdir(os.path.join(url, "checkpoint")))
    assert {"trainer_state.json", "rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors"} <= files


def test_prune_storage_keeps_tracked_and_the_newest_resumable(tmp_path):
    """A crash between an upload and its registration leaves a checkpoint Ray Train never deletes: prune_storage
    removes untracked ones (incomplete, or older than the newest tracked), keeps the tracked ones and an untracked
    one newer than all of them (the rerun resumes from it)."""
    from speed_ray.align.train import RAY_RUN_NAME, latest_checkpoint, prune_storage

    run = tmp_path / RAY_RUN_NAME

    def ckpt(name, step=None):
        d = run / name / "checkpoint"
        d.mkdir(parents=True)
        if step is not None:
            (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))

    ckpt("checkpoint_a", 2)      # untracked, older than the tracked ones: an orphan
    ckpt("checkpoint_b", 4)      # tracked
    ckpt("checkpoint_c")         # untracked, half-written
    ckpt("checkpoint_d", 6)      # tracked
    ckpt("checkpoint_e", 8)      # untracked, newest: the one to resume from
    ckpt("checkpoint_f", 7)      # untracked, older than e
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_b", "metrics": {}},
                                {"checkpoint_dir_name": "checkpoint_d", "metrics": {}}],
         "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_d", "metrics": {}}}))
    deleted = prune_storage(str(tmp_path))
    assert sorted(os.path.basename(p) for p in deleted) == ["checkpoint_a", "checkpoint_c", "checkpoint_f"]
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["checkpoint_b", "checkpoint_d", "checkpoint_e"]
    assert latest_checkpoint(str(tmp_path))[1] == 8
    (run / "checkpoint_manager_snapshot.json").write_text("{not json")
    assert prune_storage(str(tmp_path)) == []         # an unreadable snapshot: nothing is called untracked
