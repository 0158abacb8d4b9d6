"""The TRL side of alignment in-process (no Ray): SFT lowers the completion loss, the export merges LoRA into the
base, and DPO against the junior grows the reward margin of chosen over rejected."""

from __future__ import annotations

import json
import os

import pytest

from speed_ray.align.config import DPOTrainerConfig, TrainerConfig
from speed_ray.align.data import to_columns

TOPICS = ["owls", "rivers", "chess", "tea", "volcanoes", "jazz", "bridges", "comets"]
REJECTED = "sports games business 0 1 2 3 [ ] label"


def _prompt(topic: str) -> list[dict]:
    return [{"role": "user", "content": f"Task: retrieve documents about {topic}. Write a JSON object with keys "
                                        f"query, positive, hard_negative."}]


def _sample(topic: str) -> str:
    return json.dumps({"query": f"what about {topic}", "positive": f"The {topic} document.",
                       "hard_negative": "The quick brown fox."})


def completion_logps(model_dir: str, prompts: list[list[dict]], completions: list[str]) -> list[float]:
    """Sum of log P(completion | prompt) per example, rendered with the model's own chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for prompt, completion in zip(prompts, completions):
        p = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": completion}], tokenize=False)
        assert full.startswith(p)
        n_prompt = len(tok(p, add_special_tokens=False)["input_ids"])
        ids = tok(full, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1]
        lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        out.append(float(lp[n_prompt - 1:].sum()))
    return out


def _mean(xs):
    return sum(xs) / len(xs)


def _write(path, examples) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(to_columns(examples)), str(path))
    return str(path)


def _run_in_process(job, tmp_path):
    """What a Ray worker does, minus Ray: build the TRL trainer, train, save the merged model and adapter."""
    from speed_ray.align.train import build_trainer, save_outputs

    trainer = build_trainer(job, str(tmp_path / f"hf-{job.kind}"), callbacks=[])
    trainer.train()
    save_outputs(trainer, job, str(tmp_path / f"local-{job.kind}"), is_main=True)
    return trainer.state.log_history


LORA = dict(lora_r=8, lora_alpha=16, lora_dropout=0.0, max_length=160, save_steps=100)


@pytest.fixture(scope="module")
def junior(tiny_llama, tmp_path_factory):
    """A junior SFT'd in-process on 16 prompt -> sample examples (completion-only loss)."""
    from speed_ray.align.train import TrainJob

    tmp = tmp_path_factory.mktemp("junior")
    ex = [{"id": f"s{i}", "prompt": _prompt(t), "completion": [{"role": "assistant", "content": _sample(t)}]}
          for i, t in enumerate(TOPICS * 2)]
    cfg = TrainerConfig(base_model=tiny_llama, learning_rate=3e-3, batch_size=8, per_device_batch_size=4,
                        max_steps=8, **LORA)
    job = TrainJob("sft", _write(tmp / "sft.parquet", ex), cfg, tiny_llama, str(tmp / "model"), str(tmp / "adapter"),
                   str(tmp / "ray"), str(tmp / "metrics.json"))
    history = _run_in_process(job, tmp)
    return job, history


def test_sft_lowers_the_completion_loss_of_the_merged_model(junior, tiny_llama):
    job, history = junior
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 8 and losses[-1] < losses[0]
    prompts, samples = [_prompt(t) for t in TOPICS], [_sample(t) for t in TOPICS]
    before = _mean(completion_logps(tiny_llama, prompts, samples))
    after = _mean(completion_logps(job.model_url, prompts, samples))
    assert after > before + 1.0, (before, after)


def test_sft_loss_covers_the_completion_only(junior, tmp_path):
    """Every prompt token (the data prompt and task) is masked out of the labels; the sample's tokens are not."""
    from speed_ray.align.train import build_trainer

    job, _ = junior
    trainer = build_trainer(job, str(tmp_path / "hf"), callbacks=[])
    labels = trainer.data_collator([trainer.train_dataset[0]])["labels"][0]
    tok = trainer.processing_class
    prompt = tok.apply_chat_template(_prompt(TOPICS[0]), tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert (labels[:n_prompt] == -100).all()
    assert (labels[n_prompt:] != -100).sum() > 10


def test_merged_checkpoint_equals_base_plus_adapter(junior, tiny_llama):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    job, _ = junior
    assert os.path.exists(os.path.join(job.adapter_url, "adapter_config.json"))
    assert not os.path.exists(os.path.join(job.model_url, "adapter_config.json"))
    assert os.path.exists(os.path.join(job.model_url, "tokenizer_config.json"))
    ids = torch.tensor([[1, 5, 9, 20, 33, 40]])
    merged = AutoModelForCausalLM.from_pretrained(job.model_url, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                        job.adapter_url)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4)


def test_dpo_from_the_junior_grows_the_reward_margin(junior, tmp_path):
    from speed_ray.align.train import TrainJob

    jr, _ = junior
    ex = [{"id": f"p{i}", "prompt": _prompt(t), "chosen": [{"role": "assistant", "content": _sample(t)}],
           "rejected": [{"role": "assistant", "content": REJECTED}]} for i, t in enumerate(TOPICS * 2)]
    beta = 0.1
    cfg = DPOTrainerConfig(base_model="unused", beta=beta, learning_rate=5e-3, batch_size=4, per_device_batch_size=2,
                           max_steps=6, **LORA)
    job = TrainJob("dpo", _write(tmp_path / "dpo.parquet", ex), cfg, jr.model_url, str(tmp_path / "model"),
                   str(tmp_path / "adapter"), str(tmp_path / "ray"), str(tmp_path / "m.json"))
    history = _run_in_process(job, tmp_path)
    margins_logged = [h["rewards/margins"] for h in history if "rewards/margins" in h]
    assert margins_logged[0] == pytest.approx(0.0, abs=1e-5)     # step 1: the policy is the reference (the junior)
    assert margins_logged[-1] > margins_logged[0]

    prompts = [_prompt(t) for t in TOPICS]
    chosen, rejected = [_sample(t) for t in TOPICS], [REJECTED] * len(TOPICS)
    ref_c, ref_r = completion_logps(jr.model_url, prompts, chosen), completion_logps(jr.model_url, prompts, rejected)
    pol_c, pol_r = completion_logps(job.model_url, prompts, chosen), completion_logps(job.model_url, prompts, rejected)
    margins = [beta * ((pc - rc) - (pr - rr)) for pc, rc, pr, rr in zip(pol_c, ref_c, pol_r, ref_r)]
    assert _mean(margins) > 0.05 and sum(m > 0 for m in margins) >= 6, margins


def test_prompts_that_fill_max_length_give_a_clear_error(junior, tmp_path):
    from dataclasses import replace

    from speed_ray.align.data import DataError
    from speed_ray.align.train import build_trainer

    job, _ = junior
    short = replace(job, cfg=replace(job.cfg, max_length=8))
    with pytest.raises(DataError, match="max_length=8"):
        build_trainer(short, str(tmp_path / "hf"), callbacks=[])
