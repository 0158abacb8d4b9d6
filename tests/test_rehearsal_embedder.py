"""Rehearsal of configs/paper.yaml's embedder path on CPU, through Ray Train's TorchTrainer with two workers:
a decoder (the tiny Llama) with last-token pooling, LoRA, gradient checkpointing, GradCache chunks, negatives
gathered across workers, fp16 with a GradScaler and bf16. Everything the GPU run does except the GPU."""

from __future__ import annotations

import glob
import os
import sys
import tempfile

import pytest
import torch

from speed_ray.config import to_dict
from speed_ray.embedder.config import EmbedderConfig

pytestmark = pytest.mark.rehearsal

B = 8
TOPICS = ["volcano eruptions", "tax law", "chess openings", "bread baking", "jazz history", "bee colonies",
          "tidal energy", "roman roads"]


def _batch():
    return [{"query": f"Instruct: retrieve\nQuery: question {i} about {TOPICS[i]}",
             "positive": f"a passage {i} explaining {TOPICS[i]} in " + "great detail " * (i % 3),
             "negative": f"a passage {i} explaining {TOPICS[(i + 3) % 8]}"} for i in range(B)]


def _embedder_cfg(**kw) -> dict:
    return to_dict(EmbedderConfig(**{"pooling": "last_token", "lora": True, "lora_r": 4, "lora_alpha": 8,
                                     "batch_size": B, "temperature": 0.05, "max_query_length": 24,
                                     "max_doc_length": 40, "gradient_checkpointing": True, **kw}))


def _settings(e: dict, mini: int, gather: bool):
    from speed_ray.embedder.train import StepSettings

    return StepSettings(e["temperature"], mini, gather, e["max_query_length"], e["max_doc_length"])


def _grad_worker(config):
    """Each worker: the embedder train_func builds (seeded differently per rank beforehand, as train_func's
    dropout seeding is), one GradCache step on its half of the batch with gathered negatives, the cross-worker
    average, the unscale. An fp16 overflow lowers the scale and redoes the step, as the next step would."""
    import ray.train
    import torch.distributed as dist

    from speed_ray.embedder.data import worker_slice
    from speed_ray.embedder.train import build_embedder, finish_gradients, make_scaler, train_step

    rank, world = dist.get_rank(), dist.get_world_size()
    e, cpu = config["e"], torch.device("cpu")
    out = {}
    for precision in ("fp32", "fp16", "bf16"):
        torch.manual_seed(1000 + rank)
        emb = build_embedder(e, config["model"], precision, seed=0, device=cpu)
        params = [p for p in emb.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params)
        scaler = make_scaler(precision, cpu)
        for retry in range(8):
            loss = train_step(emb, worker_slice(_batch(), rank, world), _settings(e, 2, True), scaler)
            finish_gradients(params, opt, scaler)
            if all(torch.isfinite(p.grad).all() for p in params):
                break
            opt.zero_grad(set_to_none=True)
            scaler.update()
        t = torch.tensor([loss])
        dist.all_reduce(t)
        out[precision] = {"loss": float(t) / world, "retries": retry,
                          "grads": {n: p.grad.tolist() for n, p in emb.named_parameters() if p.requires_grad},
                          "scale": scaler.get_scale() if scaler is not None else None}
    with tempfile.TemporaryDirectory() as d:
        open(f"{d}/done", "w").write("ok")
        ray.train.report({"out": out}, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)


def _rel_err(got: dict, want: dict) -> float:
    g = torch.cat([torch.tensor(got[k]).flatten() for k in sorted(want)])
    w = torch.cat([want[k].flatten() for k in sorted(want)])
    return float((g - w).norm() / w.norm())


def test_two_worker_grad_cache_fp32_fp16_bf16_equal_single_process(ray_local, tiny_llama, tmp_path):
    """2 workers x GradCache chunks of 2 x gathered negatives == one process, plain step, whole batch, fp32:
    the same loss and LoRA gradients (fp32 to float noise; fp16 and bf16 within their precision)."""
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from speed_ray.embedder.train import build_embedder, train_step

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    e = _embedder_cfg()
    ref = build_embedder(e, tiny_llama, "fp32", seed=0, device=torch.device("cpu"))
    ref_loss = train_step(ref, _batch(), _settings(e, 0, False))
    want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert sum(float(g.abs().sum()) > 0 for g in want.values()) >= len(want) // 2   # the LoRA B matrices

    result = TorchTrainer(_grad_worker, train_loop_config={"e": e, "model": tiny_llama},
                          scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
                          run_config=RunConfig(name="grads", storage_path=str(tmp_path))).fit()
    out = result.metrics["out"]
    assert out["fp32"]["loss"] == pytest.approx(ref_loss, abs=1e-5)
    for name, g in want.items():
        torch.testing.assert_close(torch.tensor(out["fp32"]["grads"][name]), g, atol=1e-5, rtol=1e-4, msg=name)
    for precision, loss_tol, grad_tol in (("fp16", 5e-3, 1e-2), ("bf16", 3e-2, 5e-2)):
        o = out[precision]
        assert o["loss"] == pytest.approx(ref_loss, abs=loss_tol), precision
        assert _rel_err(o["grads"], want) < grad_tol, (precision, _rel_err(o["grads"], want))
    assert out["fp16"]["scale"] < 2.0 ** 16 and out["fp16"]["retries"] >= 1   # the tiny model overflows at 2**16


def _stage_ctx(tmp_path, **embedder):
    from speed_ray.stage import StageContext
    from speed_ray.run_config import build_config
    from speed_ray.store import RunStore

    rows = [{"id": f"s{i}", "task_type": "retrieval", "task": "Given a question, retrieve passages",
             "query": f"question {i} about {TOPICS[i % 8]}", "positive": f"a passage {i} on {TOPICS[i % 8]}",
             "negative": f"a passage {i} on {TOPICS[(i + 3) % 8]}"} for i in range(32)]
    cfg = build_config({"run": {"run_dir": str(tmp_path), "seed": 0},
                        "embedder": {"base_model": "offline:tiny-llama", "pooling": "last_token", "lora": True,
                                     "lora_r": 4, "lora_alpha": 8, "batch_size": B, "mini_batch_size": 2,
                                     "gather_across_workers": True, "num_workers": 2, "precision": "fp16",
                                     "gradient_checkpointing": True, "learning_rate": 1e-3, "warmup_steps": 0,
                                     "max_query_length": 24, "max_doc_length": 40, "max_steps": 4,
                                     "save_steps": 1, "temperature": 1.0, **embedder}})
    store = RunStore(str(tmp_path))
    data = store.stage("dedup", "fp0")
    data.write_shard("s0", rows)
    data.write_manifest({"stage": "dedup"})
    return StageContext(cfg=cfg, name="train_embedder", out=store.stage("train_embedder", "fp1"),
                        inputs={"data": data}, store=store, run_name="t")


def test_stage_decoder_lora_fp16_two_workers_exports_and_keeps_bounded_checkpoints(ray_local, tmp_path, tiny_llama):
    """The train_embedder stage on the paper's path (decoder, last token, LoRA, gradient checkpointing, fp16,
    GradCache, gathered negatives, 2 workers), saving every step: it trains (both workers' weights equal), exports a
    SentenceTransformer that loads and encodes, keeps CheckpointConfig.num_to_keep checkpoints of rank 0's single
    file, whose newest holds the trained LoRA weights, and leaves no temporary checkpoint dir behind."""
    from sentence_transformers import SentenceTransformer

    from speed_ray.embedder.stage import train_embedder_stage

    tmp_ckpts = set(glob.glob(os.path.join(tempfile.gettempdir(), "speedray-ckpt-*")))
    ctx = _stage_ctx(tmp_path)
    out = train_embedder_stage(ctx)
    m = out["metrics"]
    assert m["steps"] == 4 and m["precision"] == "fp16" and m["weights_in_sync"] is True
    assert m["skipped_steps"] < 4 and all(1.0 < x < 4.0 for _, x in m["loss"]["curve"]), m

    ckpts = sorted(c for c in glob.glob(os.path.join(ctx.out._path(ctx.out.artifact("ray_train")), "train",
                                                     "checkpoint_*")) if os.path.isdir(c))
    assert len(ckpts) == 2, ckpts                              # 4 saves, num_to_keep=2
    for c in ckpts:
        assert sorted(os.listdir(c)) == ["state.pt"], c       # rank 0's file only
    state = torch.load(os.path.join(ckpts[-1], "state.pt"), weights_only=False)
    assert state["step"] == 4 and state["scaler"]["scale"] > 0
    lora_b = [v for k, v in state["trainable"].items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "speedray-ckpt-*"))) <= tmp_ckpts

    st = SentenceTransformer(out["model_path"], device="cpu")
    emb = st.encode(["question 1 about tax law", "a passage 1 on tax law"], prompt_name=None,
                    convert_to_tensor=True)
    assert emb.shape == (2, 64) and torch.isfinite(emb).all()
    assert st[1].get_config_dict()["pooling_mode"] == "lasttoken"
