"""The vLLM adapter's plain-data parts (processor kwargs, per-row sampling params, row mapping) without vLLM."""

from __future__ import annotations

import json

import pytest

from speed_ray.generate.config import EngineConfig
from speed_ray.generate.engine import GenRequest, request_columns
from speed_ray.generate.vllm_engine import Preprocess, finalize_row, postprocess, processor_kwargs, sampling_params

SCHEMA = {"type": "object", "properties": {"S1": {"type": "string"}}, "required": ["S1"]}


def test_processor_kwargs_autoscaling_pool_and_engine_args():
    cfg = EngineConfig(kind="vllm", batch_size=256, replicas_min=2, replicas_max=16, tensor_parallel_size=2,
                       max_model_len=4096, num_gpus_per_replica=2, accelerator_type="H100")
    kw = processor_kwargs(cfg, "/ckpt/senior")
    assert kw["model_source"] == "/ckpt/senior" and kw["concurrency"] == (2, 16) and kw["batch_size"] == 256
    assert kw["engine_kwargs"]["tensor_parallel_size"] == 2 and kw["engine_kwargs"]["max_model_len"] == 4096
    assert kw["accelerator_type"] == "H100" and kw["should_continue_on_error"]
    assert "enable_lora" not in kw["engine_kwargs"]


def test_processor_kwargs_lora_adapter():
    kw = processor_kwargs(EngineConfig(kind="vllm", use_adapter=True), "base-model", "/run/stages/x/artifacts/adapter")
    assert kw["engine_kwargs"]["enable_lora"] and kw["dynamic_lora_loading_path"] == "/run/stages/x/artifacts"


def test_processor_kwargs_validate_against_ray_config():
    pytest.importorskip("ray.data.llm")
    from ray.data.llm import vLLMEngineProcessorConfig

    cfg = vLLMEngineProcessorConfig(**processor_kwargs(EngineConfig(kind="vllm", replicas_max=4), "m"))
    assert cfg.concurrency == (1, 4) and cfg.engine_kwargs["enable_prefix_caching"]


def test_rows_to_vllm_and_back():
    row = {"id": "a", "prompt": "[data prompt]", **request_columns(GenRequest(
        [{"role": "user", "content": "hi"}], temperature=0.5, max_tokens=10, json_schema=SCHEMA, seed=3))}
    sp = sampling_params(row)
    assert sp == {"temperature": 0.5, "top_p": 1.0, "max_tokens": 10, "seed": 3, "structured_outputs": {"json": SCHEMA}}
    pre = Preprocess("adapter")(row)
    assert pre["messages"] == [{"role": "user", "content": "hi"}] and pre["model"] == "adapter"
    assert pre["__sr_prompt"] == "[data prompt]"        # our column survives ray.data.llm's own "prompt"
    # what ray.data.llm hands to postprocess: our columns carried over plus the engine's
    done = {**pre, "prompt": "<chat>hi", "generated_text": '{"S1": "x"}', "num_input_tokens": 7,
            "num_generated_tokens": 10, "generated_tokens": [1] * 10}
    out = postprocess(done)
    assert out["prompt"] == "[data prompt]" and out["id"] == "a" and out["text"] == '{"S1": "x"}'
    assert out["finish_reason"] == "length" and out["completion_tokens"] == 10 and out["prompt_tokens"] == 7
    assert json.loads(out["messages"]) == [{"role": "user", "content": "hi"}]
    assert "generated_tokens" not in out and "sampling_params" not in out and "model" not in out
    err = finalize_row({**pre, "__inference_error__": "prompt too long"})
    assert err["finish_reason"] == "error" and err["text"] == "" and err["gen_error"] == "prompt too long"
    assert err["prompt"] == "[data prompt]"


def test_unseeded_unconstrained_sampling_params():
    row = request_columns(GenRequest([{"role": "user", "content": "x"}]))
    assert sampling_params(row) == {"temperature": 1.0, "top_p": 1.0, "max_tokens": 800}


@pytest.mark.gpu
def test_vllm_generates_on_gpu(ray_local, tmp_path):
    pytest.importorskip("vllm")
    import ray

    from speed_ray.generate.ray_engines import generate_dataset
    from speed_ray.models.offline import resolve_model

    cfg = EngineConfig(kind="vllm", batch_size=8, max_model_len=2048, num_gpus_per_replica=1, enforce_eager=True)
    rows = [{"id": str(i), **request_columns(GenRequest([{"role": "user", "content": f"Write sentence {i}."}],
                                                        max_tokens=64, json_schema=SCHEMA, seed=i))}
            for i in range(8)]
    out = generate_dataset(ray.data.from_items(rows), cfg, resolve_model("offline:smollm2")).take_all()
    assert len(out) == 8 and all(json.loads(r["text"])["S1"] for r in out if r["finish_reason"] == "stop")
