"""The training loop (speed_ray.embedder.train.train_func) in one process, through Ray Train's local mode
(TorchTrainer with num_workers=0: no Ray workers), with the paper config's decoder path on the tiny Llama:
last-token pooling, LoRA, gradient checkpointing, fp16 with a GradScaler, bf16 with autocast alone."""

from __future__ import annotations

import os

import pytest
import torch

from speed_ray.config import to_dict
from speed_ray.embedder.config import EmbedderConfig


def _triples(n=16):
    topics = ["volcano eruptions", "tax law", "chess openings", "bread baking", "jazz history", "bee colonies",
              "tidal energy", "roman roads"]
    return [{"id": f"s{i}", "task_type": "retrieval", "task": "Given a question, retrieve passages",
             "query": f"Instruct: retrieve\nQuery: question {i} about {topics[i % 8]}",
             "positive": f"a passage {i} explaining {topics[i % 8]} in detail",
             "negative": f"a passage {i} explaining {topics[(i + 3) % 8]} in detail", "source": "synthetic"}
            for i in range(n)]


def _loop_config(tmp_path, model_path, **embedder):
    import dataclasses

    from speed_ray.embedder.feed import write_feed_local

    cfg = EmbedderConfig(**{"pooling": "last_token", "lora": True, "lora_r": 4, "lora_alpha": 8, "batch_size": 8,
                            "learning_rate": 1e-3, "warmup_steps": 0, "max_query_length": 24, "max_doc_length": 40,
                            "max_steps": 4, "save_steps": 2, "temperature": 0.05, "gradient_checkpointing": True,
                            **embedder})
    feed = write_feed_local(_triples(), str(tmp_path / "feed"), cfg.batch_size, cfg.one_task_per_batch, 0, epochs=2)
    return {"embedder": to_dict(cfg), "model_path": model_path, "feed": dataclasses.asdict(feed),
            "export_url": str(tmp_path / "model"), "seed": 0, "query_instruction": "retrieve"}


def _run_local(config, monkeypatch):
    """train_func in this process (Ray Train's local mode); returns the result and every checkpoint's state."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.execution.train_fn_utils import LocalTrainFnUtils

    from speed_ray.embedder.train import train_func

    states = []
    report = LocalTrainFnUtils.report

    def keep(self, metrics, checkpoint=None, **kw):
        if checkpoint is not None:   # local mode keeps no copy: read it while its directory exists
            with checkpoint.as_directory() as d:
                states.append(torch.load(os.path.join(d, "state.pt"), weights_only=False))
        return report(self, metrics, checkpoint, **kw)

    monkeypatch.setattr(LocalTrainFnUtils, "report", keep)
    result = TorchTrainer(train_func, train_loop_config=config, scaling_config=ScalingConfig(num_workers=0),
                          run_config=RunConfig(name="local")).fit()
    return result, states


def _lora_b(state):
    return {k: v for k, v in state["trainable"].items() if "lora_B" in k}


def test_fp16_steps_scale_the_loss_and_log_it_unscaled(tmp_path, tiny_llama, monkeypatch):
    """fp16: the GradScaler scales the loss, the optimizer steps (before the fix: 'Attempted step but _scale is
    None' at step 1), the logged loss is the true InfoNCE loss, the scaler's state is checkpointed, and the final
    checkpoint holds the trained LoRA weights although the export merged them into the backbone. (temperature 1:
    the tiny model's gradients then stay within fp16's range at the initial scale of 2**16.)"""
    from sentence_transformers import SentenceTransformer

    result, states = _run_local(_loop_config(tmp_path, tiny_llama, precision="fp16", temperature=1.0), monkeypatch)
    m = result.metrics
    assert m["step"] == 4 and len(m["losses"]) == 4 and m["precision"] == "fp16"
    # unscaled: an InfoNCE loss over 16 candidates is near log(16), not 2**16 times it
    assert all(1.0 < x < 4.0 for x in m["losses"]), m["losses"]
    assert m["skipped_steps"] == 0
    assert len(states) == 2                                   # step 2 (save_steps) and the final one
    assert states[-1]["scaler"]["scale"] == 2.0 ** 16 and states[-1]["skipped_steps"] == 0
    final_b = _lora_b(states[-1])
    assert final_b and all(v.dtype == torch.float32 for v in final_b.values())
    assert all(v.abs().sum() > 0 for v in final_b.values())  # LoRA B starts at zero: the steps were applied
    st = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    emb = st.encode(["hello world", "a passage about bees"], convert_to_tensor=True)
    assert emb.shape[0] == 2 and torch.isfinite(emb).all()


def test_fp16_grad_cache_skips_overflowing_steps(tmp_path, tiny_llama, monkeypatch):
    """GradCache under fp16: the cached embedding gradients carry the loss scale into every chunk's backward.
    At temperature 0.05 the tiny model's gradients times 2**16 overflow fp16 (they fit from about 2**12): those
    updates are skipped (the weights stay as they were), the scale halves, and the logged loss stays finite."""
    result, states = _run_local(_loop_config(tmp_path, tiny_llama, precision="fp16", mini_batch_size=2,
                                             max_steps=2, save_steps=1), monkeypatch)
    m = result.metrics
    assert m["skipped_steps"] == 2 and all(1.0 < x < 4.0 for x in m["losses"]), m
    assert [s["scaler"]["scale"] for s in states] == [2.0 ** 15, 2.0 ** 14]
    assert all(v.abs().sum() == 0 for v in _lora_b(states[-1]).values())   # no update was applied


def test_bf16_steps_without_a_scaler(tmp_path, tiny_llama, monkeypatch):
    result, states = _run_local(_loop_config(tmp_path, tiny_llama, precision="bf16", mini_batch_size=2,
                                             max_steps=2), monkeypatch)
    m = result.metrics
    assert m["precision"] == "bf16" and m["skipped_steps"] == 0
    assert all(0.5 < x < 6 for x in m["losses"]), m["losses"]
    assert states[-1]["scaler"] is None
    assert any(v.abs().sum() > 0 for v in _lora_b(states[-1]).values())
    # every step is in the stage's step log (artifacts/progress/steps.jsonl beside artifacts/model): progress, curves
    from speed_ray.progress import read_steps

    logged = read_steps((tmp_path / "progress" / "steps.jsonl").read_text())
    assert [(s["step"], s["total_steps"]) for s in logged] == [(1, 2), (2, 2)]
    assert [s["loss"] for s in logged] == pytest.approx(m["losses"])


def test_mixed_precision_keeps_fp32_trainable_weights(tiny_llama):
    """fp16/bf16: autocast computes in half precision, the weights the optimizer updates stay fp32 (LoRA: the
    frozen base in half precision; full fine-tuning: fp32 masters), so the GradScaler can unscale them."""
    from speed_ray.embedder.model import load_embedder

    for precision, half in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        lora = load_embedder(tiny_llama, lora=True, lora_r=4, precision=precision, max_length=24)
        dtypes = {p.dtype for p in lora.parameters() if p.requires_grad}
        assert dtypes == {torch.float32}
        assert {p.dtype for p in lora.parameters() if not p.requires_grad} == {half}
        full = load_embedder(tiny_llama, lora=False, precision=precision, max_length=24)
        assert {p.dtype for p in full.parameters()} == {torch.float32}
        assert lora.autocast_dtype == full.autocast_dtype == half
        out = full.encode(["a b c"])
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


def _toy(grad_value):
    from speed_ray.embedder.train import make_optimizer

    lin = torch.nn.Linear(3, 2)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

    opt, sched = make_optimizer(Wrap(), lr=0.1, warmup_steps=0, total_steps=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    out = scaler.scale(lin(torch.ones(1, 3)).sum() * grad_value)
    out.backward()
    return lin, opt, sched, scaler


def test_scaler_unscales_before_the_step_and_skips_overflows():
    from speed_ray.embedder.train import finish_gradients, optimizer_step

    lin, opt, sched, scaler = _toy(1.0)
    finish_gradients(list(lin.parameters()), opt, scaler)
    torch.testing.assert_close(lin.weight.grad, torch.ones(2, 3))      # unscaled: clipping would see true grads
    w = lin.weight.detach().clone()
    assert optimizer_step(opt, sched, scaler) is True
    assert not torch.equal(lin.weight, w) and lin.weight.grad is None and sched.last_epoch == 1

    lin, opt, sched, scaler = _toy(float("inf"))
    finish_gradients(list(lin.parameters()), opt, scaler)
    w = lin.weight.detach().clone()
    assert optimizer_step(opt, sched, scaler) is False                 # skipped: weights and schedule wait
    assert torch.equal(lin.weight, w) and scaler.get_scale() == 512.0 and sched.last_epoch == 0


def test_cpu_worker_uses_the_configured_torch_threads(tmp_path, tiny_llama, monkeypatch):
    """embedder.torch_threads: a CPU worker sets torch's threads (Ray gives a {"CPU": 1} worker one thread, which
    leaves a core idle on a 2-core machine) and reports them; unset, the worker's CPU share."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        result, _ = _run_local(_loop_config(tmp_path, tiny_llama, max_steps=1, torch_threads=2), monkeypatch)
        assert result.metrics["torch_threads"] == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_worker_threads_follow_the_setting_or_the_cpu_share():
    from speed_ray.config import ConfigError
    from speed_ray.threads import worker_threads

    assert worker_threads(None, 1.0) == 1 and worker_threads(None, 2.5) == 2 and worker_threads(None, 0.5) == 1
    assert worker_threads(3, 1.0) == 3
    with pytest.raises(ValueError, match="torch_threads"):
        worker_threads(0, 1.0)
    with pytest.raises(ConfigError, match="torch_threads"):
        EmbedderConfig(torch_threads=0)


def test_the_tiny_bert_stand_in_embeds_and_trains(tmp_path, capsys):
    """offline:tiny-bert (a random BERT with MiniLM's tokenizer; the paper-scale benchmark's stand-in embedder, so the
    data path is measured, not a model): `speed-ray models prepare` builds it once, it resolves to that directory,
    loads with mean pooling, embeds a batch in fp32 and a contrastive step moves its weights."""
    from speed_ray.cli import main
    from speed_ray.embedder.model import load_embedder
    from speed_ray.models.offline import resolve_model

    assert main(["models", "prepare", "--only", "tiny-bert"]) == 0
    path = resolve_model("offline:tiny-bert")
    assert f'"offline:tiny-bert": "{path}"' in capsys.readouterr().out
    assert os.path.exists(os.path.join(path, "model.safetensors")) and os.path.exists(os.path.join(path, "tokenizer.json"))
    emb = load_embedder(path, pooling="mean", lora=False, max_length=16)
    texts = ["a query about cats", "a passage about cats", "a passage about tax law"]
    before = [p.detach().clone() for p in emb.parameters()]
    assert sum(p.numel() for p in before) < 2_000_000          # milliseconds a step, not MiniLM's seconds
    opt = torch.optim.SGD(emb.parameters(), lr=0.5)
    q, d = emb.encode(texts[:1]), emb.encode(texts[1:])
    assert q.shape == (1, 32) and d.shape == (2, 32) and torch.isfinite(d).all()
    loss = torch.nn.functional.cross_entropy(q @ d.T / 0.05, torch.tensor([0]))
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, emb.parameters()))
