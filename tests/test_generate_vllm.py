"""The vLLM adapter's plain-data parts (processor kwargs, per-row sampling params, row mapping) without vLLM."""

from __future__ import annotations

import json
import os

import pytest

from speed_ray.generate.config import EngineConfig
from speed_ray.llm.rows import LLMRequest, request_columns
from speed_ray.generate.vllm_engine import (Preprocess, finalize_row, lora_target, postprocess, processor_kwargs,
                                            sampling_params, vllm_lora_rank)
from speed_ray.synth.schemas import sample_schema

SCHEMA = {"type": "object", "properties": {"S1": {"type": "string"}}, "required": ["S1"]}


def test_processor_kwargs_autoscaling_pool_and_engine_args():
    cfg = EngineConfig(kind="vllm", batch_size=256, replicas_min=2, replicas_max=16, tensor_parallel_size=2,
                       max_model_len=4096, num_gpus_per_replica=2, accelerator_type="H100")
    kw = processor_kwargs(cfg, "/ckpt/senior")
    assert kw["model_source"] == "/ckpt/senior" and kw["concurrency"] == (2, 16) and kw["batch_size"] == 256
    assert kw["engine_kwargs"]["tensor_parallel_size"] == 2 and kw["engine_kwargs"]["max_model_len"] == 4096
    assert kw["accelerator_type"] == "H100" and kw["should_continue_on_error"]
    assert "enable_lora" not in kw["engine_kwargs"]


def test_processor_kwargs_local_lora_adapter_is_loaded_by_path(tmp_path):
    # ray.data.llm: a local adapter is the row's `model` with no dynamic_lora_loading_path (a local loading path
    # fails its CloudMirrorConfig check on every row; see test_lora_target_against_rays_loader)
    adapter = tmp_path / "stages" / "x" / "artifacts" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 16, "rank_pattern": {}}))
    kw = processor_kwargs(EngineConfig(kind="vllm", use_adapter=True), "base-model", str(adapter) + "/")
    assert kw["engine_kwargs"]["enable_lora"] and kw["engine_kwargs"]["max_lora_rank"] == 64
    assert "dynamic_lora_loading_path" not in kw


def test_processor_kwargs_remote_lora_adapter_and_its_rank(tmp_path, monkeypatch):
    ranks = {"s3://b/run/stages/x/artifacts/adapter": 128}
    monkeypatch.setattr("speed_ray.generate.vllm_engine.adapter_rank", lambda url: ranks.get(url))
    kw = processor_kwargs(EngineConfig(kind="vllm", use_adapter=True), "s3://b/run/stages/j/model",
                          "s3://b/run/stages/x/artifacts/adapter")
    assert kw["dynamic_lora_loading_path"] == "s3://b/run/stages/x/artifacts"
    assert kw["engine_kwargs"]["max_lora_rank"] == 128        # the adapter's rank, above the configured 64


def test_lora_target_local_remote_and_unsupported(tmp_path):
    assert lora_target(None) is None and lora_target("") is None
    assert lora_target("/run/a/adapter/") == (None, "/run/a/adapter")
    assert lora_target("file:///run/a/adapter") == (None, "/run/a/adapter")
    assert lora_target("rel/adapter") == (None, os.path.abspath("rel/adapter"))
    assert lora_target("s3://bkt/run/a/adapter") == ("s3://bkt/run/a", "adapter")
    assert lora_target("gcs://bkt/run/a/adapter/") == ("gs://bkt/run/a", "adapter")
    assert lora_target("abfss://c@acct.dfs.core.windows.net/run/adapter")[1] == "adapter"
    for bad in ("abfs://container/run/adapter", "hf://org/adapter", "s3://adapter"):
        with pytest.raises(ValueError, match="adapter"):
            lora_target(bad)


def test_lora_target_against_rays_loader(tmp_path):
    """What ray.data.llm's engine stage does with lora_target's answer (its real download_lora_adapter)."""
    pytest.importorskip("ray.llm")
    from ray.llm._internal.common.utils.cloud_utils import CloudMirrorConfig
    from ray.llm._internal.common.utils.lora_utils import download_lora_adapter

    local = str(tmp_path / "artifacts" / "adapter")
    loading_path, name = lora_target(local)
    assert download_lora_adapter(name, remote_path=loading_path) == local
    with pytest.raises(ValueError, match="bucket_uri"):    # the old (dirname, basename) split of a local adapter
        download_lora_adapter("adapter", remote_path=str(tmp_path / "artifacts"))
    loading_path, name = lora_target("s3://bkt/run/stages/x/fp/artifacts/adapter")
    assert CloudMirrorConfig(bucket_uri=os.path.join(loading_path, name)).storage_type == "s3"


def test_vllm_lora_rank_is_one_vllm_accepts_and_holds_the_adapter():
    assert vllm_lora_rank(64) == 64 and vllm_lora_rank(64, 16) == 64 and vllm_lora_rank(48) == 64
    assert vllm_lora_rank(64, 80) == 128 and vllm_lora_rank(8, 300) == 320 and vllm_lora_rank(1, 1) == 1
    with pytest.raises(ValueError, match="512"):
        vllm_lora_rank(64, 1024)


def test_processor_kwargs_validate_against_ray_config():
    pytest.importorskip("ray.data.llm")
    from ray.data.llm import vLLMEngineProcessorConfig

    cfg = vLLMEngineProcessorConfig(**processor_kwargs(EngineConfig(kind="vllm", replicas_max=4), "m"))
    assert cfg.concurrency == (1, 4) and cfg.engine_kwargs["enable_prefix_caching"]


def test_rows_to_vllm_and_back():
    row = {"id": "a", "prompt": "[data prompt]", **request_columns(LLMRequest(
        [{"role": "user", "content": "hi"}], temperature=0.5, max_tokens=10, json_schema=SCHEMA, seed=3))}
    sp = sampling_params(row)
    assert sp == {"temperature": 0.5, "top_p": 1.0, "max_tokens": 10, "seed": 3,
                  "structured_outputs": {"json": json.dumps(SCHEMA)}}   # a JSON string: see the Arrow test below
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
    assert err["finish_reason"] == "error" and err["text"] == "" and err["error"] == "prompt too long"
    assert err["prompt"] == "[data prompt]"


def test_unseeded_unconstrained_sampling_params():
    row = request_columns(LLMRequest([{"role": "user", "content": "x"}]))
    assert sampling_params(row) == {"temperature": 1.0, "top_p": 1.0, "max_tokens": 1024, "seed": None}


def _block(rows: list[dict]):
    import pyarrow as pa

    # what ray.data.llm's preprocess output becomes: one struct column (Processor.DATA_COLUMN) per block
    return pa.Table.from_pylist([{"__data": Preprocess("m")(r)} for r in rows])


def _req(task_type: str | None, seed: int | None, tag: str | None = None) -> dict:
    return request_columns(LLMRequest([{"role": "user", "content": tag or str(task_type)}], seed=seed,
                                      json_schema=sample_schema(task_type) if task_type else None))


TYPES = ["retrieval", "classification", "sts", "matching_short", "bitext", "matching_long"]


def test_sampling_params_survive_an_arrow_block_of_mixed_task_types():
    """Every row of a block that mixes task types (and seeded/unseeded rows) keeps its own schema, whole."""
    rows = [_req(t, i if i % 2 else None) for i, t in enumerate(TYPES)]
    back = [r["__data"]["sampling_params"] for r in _block(rows).to_pylist()]
    for i, (t, sp) in enumerate(zip(TYPES, back)):
        assert set(sp) == {"temperature", "top_p", "max_tokens", "seed", "structured_outputs"}
        assert json.loads(sp["structured_outputs"]["json"]) == sample_schema(t)
        assert sp["seed"] == (i if i % 2 else None)


@pytest.mark.parametrize("constrained", [True, False])
def test_sampling_params_survive_rays_block_concatenation(constrained):
    """Ray Data's own concat (it joins blocks into batches, and a stage's batch outputs into blocks) of blocks that
    differ in task types and in seeding, as a constrained and as an unconstrained dataset."""
    pytest.importorskip("ray.data")
    from ray.data._internal.arrow_ops import transform_pyarrow

    kinds = [list(zip(TYPES[i:i + 2], seeds)) for i, seeds in ((0, (1, 2)), (2, (None, None)), (4, (5, None)))]
    blocks = [_block([_req(t if constrained else None, s, tag=t) for t, s in kind]) for kind in kinds]
    for order in (blocks, blocks[::-1]):
        rows = transform_pyarrow.concat(order).to_pylist()      # (it may reorder rows: match them by content)
        got = {r["__data"]["messages"][0]["content"]: r["__data"]["sampling_params"] for r in rows}
        assert len(rows) == len(got) == len(TYPES)
        for t, seed in (k for kind in kinds for k in kind):
            assert got[t]["seed"] == seed, t
            so = got[t].get("structured_outputs")
            assert (json.loads(so["json"]) == sample_schema(t)) if constrained else so is None


def test_preprocess_names_the_model_and_keeps_engine_inputs_out_of_passthrough_columns():
    # ray.data.llm keeps the input row's columns next to the preprocess output; the engine stage reads `model`
    # (another value than the processor's model is a LoRA request) and e.g. tokenization_kwargs from the row
    row = {"model": "generator-name", "tokenization_kwargs": {"truncation": True},
           **request_columns(LLMRequest([{"role": "user", "content": "x"}]))}
    pre = Preprocess("/models/base")(row)
    assert pre["model"] == "/models/base" and pre["tokenization_kwargs"] is None
    out = postprocess({**row, **pre, "generated_text": "y", "num_generated_tokens": 1})
    assert out["model"] == "generator-name" and out["tokenization_kwargs"] == {"truncation": True}


@pytest.mark.gpu
def test_vllm_generates_on_gpu(ray_local, tmp_path):
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():      # vLLM's Python package also imports on CPU (tests/test_rehearsal_vllm.py)
        pytest.skip("needs a CUDA GPU")
    import ray

    from speed_ray.generate.ray_engines import generate_dataset
    from speed_ray.models.offline import resolve_model

    cfg = EngineConfig(kind="vllm", batch_size=8, max_model_len=2048, num_gpus_per_replica=1, enforce_eager=True)
    rows = [{"id": str(i), **request_columns(LLMRequest([{"role": "user", "content": f"Write sentence {i}."}],
                                                        max_tokens=64, json_schema=SCHEMA, seed=i))}
            for i in range(8)]
    out = generate_dataset(ray.data.from_items(rows), cfg, resolve_model("offline:smollm2")).take_all()
    assert len(out) == 8 and all(json.loads(r["text"])["S1"] for r in out if r["finish_reason"] == "stop")
