"""The generation row contract, the stub engine, and the HF engine (batching, per-row limits, JSON schemas)."""

from __future__ import annotations

import json

import pytest

from speed_ray.generate.config import EngineConfig
from speed_ray.generate.engine import StubEngine, generate_batch
from speed_ray.llm.rows import LLMRequest, request_columns, requests_from_batch

SMALL_SCHEMA = {"type": "object", "properties": {"label": {"enum": ["yes", "no"]},
                                                  "score": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["label", "score"], "additionalProperties": False}


def _msgs(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _columns(reqs: list[LLMRequest], **extra) -> dict:
    cols = [request_columns(r) for r in reqs]
    batch = {k: [c[k] for c in cols] for k in cols[0]}
    batch.update(extra)
    return batch


def test_request_columns_roundtrip():
    r = LLMRequest(_msgs("hi"), temperature=0.7, top_p=0.9, max_tokens=12, json_schema=SMALL_SCHEMA, seed=3)
    back = requests_from_batch(_columns([r]))[0]
    assert back == r
    r2 = LLMRequest(_msgs("hi"))
    assert requests_from_batch(_columns([r2]))[0] == r2


def test_generate_batch_keeps_passthrough_and_isolates_bad_rows():
    from faulty_engine import FaultyEngine

    reqs = [LLMRequest(_msgs("a"), seed=1), LLMRequest(_msgs("FAIL_ME"), seed=2), LLMRequest(_msgs("c"))]
    batch = _columns(reqs, id=["x", "y", "z"])
    batch["messages"][2] = "{not json"
    out = generate_batch(FaultyEngine("stub"), batch, "custom")
    assert out["id"] == ["x", "y", "z"]
    assert out["finish_reason"] == ["stop", "error", "error"]
    assert json.loads(out["text"][0])
    assert out["text"][1] == "" and out["text"][2] == ""
    assert out["error"][2].startswith("bad_request: ")       # a bad row is answered with an error naming it
    assert out["engine"] == ["custom"] * 3


def test_stub_engine_follows_schema_and_is_deterministic():
    r = LLMRequest(_msgs("topic"), json_schema=SMALL_SCHEMA, seed=5)
    a, b = StubEngine().generate([r]), StubEngine().generate([r])
    assert a == b
    assert json.loads(a[0].text) == {"label": "yes", "score": 0}


def test_engine_failure_marks_rows_not_raises():
    class Boom:
        def generate(self, requests):
            raise RuntimeError("CUDA out of memory")

    out = generate_batch(Boom(), _columns([LLMRequest(_msgs("a"))]), "boom")
    assert out["finish_reason"] == ["error"] and "out of memory" in out["error"][0]


@pytest.fixture(scope="module")
def tiny_engine(tiny_llama):
    from speed_ray.generate.hf_engine import HFEngine

    return HFEngine(tiny_llama, batch_size=4)


def test_hf_engine_batches_mixed_params(tiny_engine):
    reqs = [LLMRequest(_msgs(f"prompt {i} " + "word " * i), temperature=t, max_tokens=m, seed=i)
            for i, (t, m) in enumerate([(1.0, 7), (0.0, 3), (1.0, 12), (0.5, 5), (1.0, 1), (0.0, 9)])]
    res = tiny_engine.generate(reqs)
    assert len(res) == len(reqs)
    for r, g in zip(reqs, res):
        assert g.finish_reason in ("stop", "length")
        assert 1 <= g.completion_tokens <= r.max_tokens
        assert g.prompt_tokens > 0
        if g.finish_reason == "length":
            assert g.completion_tokens == r.max_tokens


def test_hf_engine_greedy_is_deterministic_across_batches(tiny_engine):
    r = LLMRequest(_msgs("the quick brown fox"), temperature=0.0, max_tokens=8)
    alone = tiny_engine.generate([r])[0]
    batched = tiny_engine.generate([LLMRequest(_msgs("a much longer prompt " * 5), temperature=0.0, max_tokens=8),
                                    r])[1]
    assert alone.text == batched.text  # left padding + attention mask: neighbours do not change a row


def test_hf_engine_seeded_sampling_reproduces(tiny_engine):
    reqs = [LLMRequest(_msgs(f"p{i}"), max_tokens=10, seed=i) for i in range(3)]
    assert [g.text for g in tiny_engine.generate(reqs)] == [g.text for g in tiny_engine.generate(reqs)]


def test_hf_engine_json_schema_constrains_a_random_model(tiny_engine):
    reqs = [LLMRequest(_msgs(f"rate {i}"), max_tokens=40, json_schema=SMALL_SCHEMA, seed=i) for i in range(4)]
    reqs.append(LLMRequest(_msgs("free text"), max_tokens=6, seed=9))  # unconstrained neighbour
    res = tiny_engine.generate(reqs)
    for g in res[:4]:
        obj = json.loads(g.text)  # random weights, yet every constrained output parses
        assert obj["label"] in ("yes", "no") and 0 <= obj["score"] <= 9
        assert g.finish_reason == "stop"
    assert res[4].finish_reason in ("stop", "length")


def test_hf_engine_bad_request_does_not_fail_batch(tiny_engine):
    too_long = LLMRequest(_msgs("word " * 5000), max_tokens=4)
    ok = LLMRequest(_msgs("hello"), max_tokens=4, seed=1)
    res = tiny_engine.generate([too_long, ok])
    assert res[0].finish_reason == "error" and "max_model_len" in res[0].error
    assert res[1].finish_reason in ("stop", "length") and res[1].completion_tokens >= 1


def test_hf_actor_pool_args_from_config():
    """Replicas, per-replica CPUs and torch threads come from the engine config."""
    from speed_ray.config import ConfigError
    from speed_ray.generate.ray_engines import map_kwargs

    kw = map_kwargs(EngineConfig(kind="hf", batch_size=4, replicas_min=1, replicas_max=3,
                                 num_cpus_per_replica=0.5), "m")
    assert (kw["compute"].min_size, kw["compute"].max_size) == (1, 3)
    assert kw["num_cpus"] == 0.5 and kw["batch_size"] == 16
    assert kw["fn_constructor_kwargs"]["num_threads"] == 1
    kw = map_kwargs(EngineConfig(kind="hf", num_cpus_per_replica=1.0, torch_threads=2), "m")
    assert kw["num_cpus"] == 1.0 and kw["fn_constructor_kwargs"]["num_threads"] == 2
    with pytest.raises(ConfigError, match="torch_threads"):
        EngineConfig(torch_threads=0)


def test_an_engine_error_marks_its_batch_but_a_fatal_one_fails_the_stage():
    from speed_ray.generate.engine import EngineFatalError

    class Broken:
        def __init__(self, exc):
            self.exc = exc

        def generate(self, requests):
            raise self.exc

    batch = _columns([LLMRequest(_msgs("a")), LLMRequest(_msgs("b"))], id=["x", "y"])
    out = generate_batch(Broken(RuntimeError("CUDA error: out of memory")), batch, "custom")
    assert out["finish_reason"] == ["error", "error"] and "out of memory" in out["error"][0]
    with pytest.raises(EngineFatalError, match="device lost"):
        generate_batch(Broken(EngineFatalError("device lost")), batch, "custom")


def test_production_engines_carry_no_test_hooks():
    """Fault injection lives in tests/faulty_engine.py (a custom engine), never in the engines users run."""
    import pathlib

    src = pathlib.Path(__file__).resolve().parents[1] / "speed_ray"
    hooks = ("crash_once", "fail_once", "STUB_FAIL", "FAIL_ME", "_load is not", "fake_load")
    found = [f"{p.relative_to(src)}: {h}" for p in src.rglob("*.py") for h in hooks if h in p.read_text()]
    assert found == []


def test_copy_free_gqa_attention_matches_sdpa_on_left_padded_batches(tiny_llama):
    """The CPU engine's grouped-query attention (no repeat_kv copy of the KV cache) gives sdpa's logits and greedy
    tokens on a left-padded batch, prefill and decode alike."""
    import torch
    from transformers import AutoModelForCausalLM

    from speed_ray.generate.gqa_attention import NAME, register
    from speed_ray.generate.hf_engine import HFEngine

    ref = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    gqa = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=register()).eval()
    assert ref.config.num_key_value_heads < ref.config.num_attention_heads      # the tiny Llama groups its heads
    torch.manual_seed(0)
    lens = [3, 9, 6]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, 9 - n:] = torch.randint(3, ref.config.vocab_size, (n,))
        mask[i, 9 - n:] = 1
    with torch.inference_mode():
        a = ref(input_ids=ids, attention_mask=mask).logits
        b = gqa(input_ids=ids, attention_mask=mask).logits
        for i, n in enumerate(lens):
            assert torch.allclose(a[i, 9 - n:], b[i, 9 - n:], atol=1e-5)
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(ref.generate(**kw), gqa.generate(**kw))
    assert HFEngine(tiny_llama, batch_size=2).model.config._attn_implementation == NAME
