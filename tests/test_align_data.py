"""Pure tests of the alignment examples and trainer configs: no Ray, no torch."""

from __future__ import annotations

import json
import os

import pytest

from speed_ray.align.config import (DPOTrainerConfig, TrainerConfig, deepspeed_zero3_config, grad_accum_steps,
                                    resolve_precision, training_args)
from speed_ray.align.data import (DataError, build_examples, cap_examples, dpo_example, from_columns,
                                  parse_messages, revise_sft_example, seed_sft_example, to_columns)
from speed_ray.align.train import latest_checkpoint, summarize_log_history
from speed_ray.config import ConfigError, from_dict

PROMPT = json.dumps([{"role": "system", "content": "You write data."},
                     {"role": "user", "content": "Task: find passages about owls. Write JSON."}])


def _revisor(prompt_messages, root_text):
    """Stand-in with the signature of speed_ray.synth.prompts.revisor_messages."""
    return [{"role": "user", "content": f"{prompt_messages[-1]['content']}\nOUTPUT: {root_text}\nRevise it."}]


def test_seed_rows_become_prompt_completion_examples_and_bad_rows_are_counted():
    rows = [
        {"id": "a", "prompt": PROMPT, "sample": '{"query":"owls"}', "valid": True},
        {"id": "b", "prompt": PROMPT, "sample": "", "valid": False},            # rejected upstream
        {"id": "c", "prompt": PROMPT, "sample": "", "valid": True},             # no sample
        {"id": "d", "prompt": "not json", "sample": '{"query":"x"}', "valid": True},
        {"id": "e", "prompt": json.dumps([{"role": "user"}]), "sample": "{}", "valid": True},
    ]
    examples, skipped = build_examples(rows, seed_sft_example)
    assert [e["id"] for e in examples] == ["a"]
    ex = examples[0]
    assert ex["prompt"] == json.loads(PROMPT)
    assert ex["completion"] == [{"role": "assistant", "content": '{"query":"owls"}'}]
    assert skipped == {"invalid": 1, "empty_sample": 1, "malformed: JSONDecodeError": 1, "malformed: ValueError": 1}


def test_dpo_pairs_keep_the_judges_choice_and_drop_pairs_without_signal():
    rows = [{"id": "p1", "prompt": PROMPT, "chosen": "good", "rejected": "bad"},
            {"id": "p2", "prompt": PROMPT, "chosen": "same", "rejected": "same"},
            {"id": "p3", "prompt": PROMPT, "chosen": "x", "rejected": ""}]
    examples, skipped = build_examples(rows, dpo_example)
    assert len(examples) == 1
    assert examples[0]["chosen"] == [{"role": "assistant", "content": "good"}]
    assert examples[0]["rejected"] == [{"role": "assistant", "content": "bad"}]
    assert skipped == {"identical_pair": 1, "empty_pair": 1}


def test_revisor_input_is_prompt_plus_root_sample_and_target_is_the_revision():
    rows = [{"id": "r", "prompt": PROMPT, "root_text": '{"query":"owl"}', "revised_text": '{"query":"owls at night"}'},
            {"id": "s", "prompt": PROMPT, "root_text": "x", "revised_text": " "}]
    examples, skipped = build_examples(rows, lambda r: revise_sft_example(r, _revisor))
    assert skipped == {"empty_revision": 1}
    (ex,) = examples
    assert "find passages about owls" in ex["prompt"][-1]["content"]
    assert '{"query":"owl"}' in ex["prompt"][-1]["content"]
    assert ex["completion"][0]["content"] == '{"query":"owls at night"}'


def test_the_real_revisor_prompt_builder_fits_the_example_builder():
    from speed_ray.synth.prompts import revisor_messages

    ex = revise_sft_example({"prompt": PROMPT, "root_text": "ROOT-SAMPLE", "revised_text": "REVISED"},
                            revisor_messages)
    assert any("ROOT-SAMPLE" in m["content"] for m in ex["prompt"])
    assert ex["completion"][0]["content"] == "REVISED"


def test_parse_messages_rejects_non_chat_json():
    with pytest.raises(ValueError):
        parse_messages("[]")
    with pytest.raises(ValueError):
        parse_messages(json.dumps({"role": "user", "content": "x"}))


def test_cap_is_a_seeded_subset_in_original_order():
    ex = [{"id": str(i)} for i in range(100)]
    a, b = cap_examples(ex, 10, seed=1), cap_examples(ex, 10, seed=1)
    assert a == b and len(a) == 10
    assert [int(e["id"]) for e in a] == sorted(int(e["id"]) for e in a)
    assert cap_examples(ex, 10, seed=2) != a
    assert cap_examples(ex, None, seed=0) is ex and cap_examples(ex, 500, seed=0) is ex


def test_examples_round_trip_through_parquet_columns():
    ex = [{"id": "a", "prompt": [{"role": "user", "content": "é"}], "completion": [{"role": "assistant", "content": "{}"}]}]
    cols = to_columns(ex)
    assert isinstance(cols["prompt"][0], str)
    rows = [dict(zip(cols, vals)) for vals in zip(*cols.values())]
    assert from_columns(rows) == ex
    with pytest.raises(DataError):
        to_columns([])


def test_global_batch_is_split_into_workers_and_accumulation():
    cfg = TrainerConfig(batch_size=24, per_device_batch_size=3, num_workers=8)
    assert grad_accum_steps(cfg) == 1
    assert grad_accum_steps(TrainerConfig(batch_size=16, per_device_batch_size=2, num_workers=2)) == 4
    with pytest.raises(ConfigError, match="batch_size"):
        TrainerConfig(batch_size=16, per_device_batch_size=3)
    with pytest.raises(ConfigError, match="strategy"):
        from_dict(TrainerConfig, {"strategy": "fsdp"})
    with pytest.raises(ConfigError, match="beta"):
        DPOTrainerConfig(beta=0)


def test_training_args_default_off_gradient_checkpointing_and_precision_by_device():
    cpu = training_args(TrainerConfig(), output_dir="/x", seed=3)
    assert cpu["gradient_checkpointing"] is False and cpu["bf16"] is False and cpu["use_cpu"] is True
    assert cpu["report_to"] == "none" and cpu["seed"] == 3 and cpu["max_length"] == 2048
    gpu = training_args(TrainerConfig(use_gpu=True), output_dir="/x", seed=0)
    assert gpu["bf16"] is True and gpu["use_cpu"] is False
    assert resolve_precision("auto", False) == "fp32" and resolve_precision("fp16", True) == "fp16"


def test_fsdp_strategy_builds_a_full_shard_fsdp2_config():
    args = training_args(TrainerConfig(use_gpu=True, strategy="fsdp", gradient_checkpointing=True, num_workers=8,
                                       batch_size=16, per_device_batch_size=2), output_dir="/x", seed=0)
    assert args["fsdp"] is True
    fc = args["fsdp_config"]
    assert fc["version"] == 2 and fc["reshard_after_forward"] is True
    assert fc["state_dict_type"] == "FULL_STATE_DICT" and fc["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    # FSDP does activation checkpointing itself; the Trainer's flag would add an all-gather
    assert fc["activation_checkpointing"] is True and args["gradient_checkpointing"] is False
    assert "deepspeed" not in args
    legacy = training_args(TrainerConfig(use_gpu=True, strategy="fsdp"), output_dir="/x", seed=0,
                           transformers_major=4)
    assert legacy["fsdp"] == "full_shard auto_wrap"


def test_deepspeed_zero3_config_is_a_valid_hf_integration_dict():
    cfg = TrainerConfig(use_gpu=True, strategy="deepspeed_zero3")
    args = training_args(cfg, output_dir="/x", seed=0)
    ds = args["deepspeed"]
    assert ds == deepspeed_zero3_config(cfg, "bf16")
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        assert ds[k] == "auto"     # filled in from TrainingArguments by the HF integration
    json.dumps(ds)                 # the dict must serialize: HF writes it for DeepSpeed
    assert "fsdp" not in args


def test_training_args_are_accepted_by_trl_configs(tmp_path):
    from trl import DPOConfig, SFTConfig

    cfg = DPOTrainerConfig(batch_size=8, per_device_batch_size=2, max_steps=3, max_length=256)
    args = training_args(cfg, output_dir=str(tmp_path), seed=0)
    sft = SFTConfig(**args, completion_only_loss=True)
    assert sft.gradient_checkpointing is False and sft.max_length == 256 and sft.gradient_accumulation_steps == 4
    dpo = DPOConfig(**args, beta=cfg.beta, loss_type=[cfg.loss_type])
    assert dpo.beta == 0.1 and dpo.learning_rate == 1e-5


def test_summarize_log_history_keeps_last_values_and_first_loss_and_margin():
    hist = [{"loss": 2.0, "rewards/margins": 0.0, "step": 1}, {"loss": 1.5, "rewards/margins": 0.3, "step": 2},
            {"train_loss": 1.7, "step": 2}]
    m = summarize_log_history(hist)
    assert m["first_loss"] == 2.0 and m["last_loss"] == 1.5 and m["train_loss"] == 1.7
    assert m["first_rewards/margins"] == 0.0 and m["last_rewards/margins"] == 0.3 and m["step"] == 2


def test_latest_checkpoint_picks_the_highest_complete_step(tmp_path):
    assert latest_checkpoint(str(tmp_path)) is None
    run = tmp_path / "ray_train"
    for name, step in [("checkpoint_2024-01-01_00-00-02", 4), ("checkpoint_2024-01-01_00-00-01", 6),
                       ("checkpoint_2024-01-01_00-00-03", None)]:   # None: an upload that never finished
        d = run / name / "checkpoint"
        d.mkdir(parents=True)
        if step is not None:
            (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (run / "checkpoint_manager_snapshot.json").write_text("{}")         # Ray's own file, not a checkpoint
    url, step = latest_checkpoint(str(tmp_path))
    assert step == 6 and url.endswith("checkpoint_2024-01-01_00-00-01")


def test_prepare_streams_the_input_and_caps_like_cap_examples(tmp_path, monkeypatch):
    """The alignment stages build their examples batch by batch (never the whole input as one list in the driver:
    SPEED's 25K D_seed rows, or more) and a cap keeps exactly cap_examples' seeded subset, in order."""
    import pyarrow.parquet as pq

    from speed_ray.align.stages import _prepare
    from speed_ray.run_config import build_config
    from speed_ray.stage import StageContext
    from speed_ray.store import RunStore, StageOutput

    store = RunStore(str(tmp_path / "run"))
    src = store.stage("seed_data", "fp-seed")
    rows = [{"id": f"r{i}", "prompt": json.dumps([{"role": "user", "content": f"task {i}"}]),
             "sample": "" if i % 7 == 0 else f"sample {i}", "valid": i % 11 != 0} for i in range(5000)]
    for k in range(3):                                    # three shards, one of them larger than a batch
        src.write_shard(f"part-{k}", rows[k * 1000: (k + 1) * 1000] if k < 2 else rows[2000:])
    src.write_manifest({"rows": len(rows)})

    def whole(*a, **kw):
        raise AssertionError("the driver read the whole input as one list")

    monkeypatch.setattr(StageOutput, "read_rows", whole)
    for cap in (None, 1234):
        cfg = build_config({"run": {"run_dir": str(tmp_path / "run"), "seed": 3},
                            "junior_sft": {"n_samples": cap}})
        ctx = StageContext(cfg=cfg, name="junior_sft", out=store.stage("junior_sft", f"fp-{cap}"),
                           inputs={"data": src}, store=store, run_name="t")
        url, n, skipped = _prepare(ctx, src, seed_sft_example, ["id", "prompt", "sample", "valid"], cfg.junior_sft)
        expect, expect_skipped = build_examples(rows, seed_sft_example)
        expect = cap_examples(expect, cap, seed=3)
        assert n == len(expect) and skipped == expect_skipped
        assert pq.read_table(url).to_pylist() == [dict(zip(to_columns(expect), vals))
                                                   for vals in zip(*to_columns(expect).values())]
        assert not os.path.exists(os.path.join(os.path.dirname(url), "train_data.uncapped.parquet"))
