"""Rehearsal of the vLLM generation path on CPU, up to vLLM's boundary.

The real ray.data.llm processor from `build_vllm_processor` (our preprocess, its chat-template and tokenize stages,
its detokenize stage, our postprocess) runs on a local Ray over request rows of mixed task types, with ONLY the vLLM
engine stage replaced by a stand-in (speed_ray.generate.vllm_rehearsal.EngineStandInUDF) that records what the
engine stage receives. Each recorded row is then checked the way vLLM would take it: its schema compiles with
xgrammar and is its task type's schema exactly, and, when vLLM's Python package imports, ray.data.llm's own
request preparation turns it into a vllm.SamplingParams that vLLM's xgrammar validation accepts.

vLLM on CPU: set SPEED_RAY_VLLM_SITE to directories holding the vllm wheel installed `--no-deps` and its few
import-time deps (os.pathsep-separated), e.g.
    python -m pip install --no-deps --target /tmp/vllm-site vllm-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl
    python -m pip install --no-deps --target /tmp/vllm-deps msgspec cbor2 pyzmq openai-harmony pybase64 \
        cachetools py-cpuinfo partial-json-parser "llguidance>=1.7,<1.8"
    SPEED_RAY_VLLM_SITE=/tmp/vllm-site:/tmp/vllm-deps pytest -m rehearsal tests/test_rehearsal_vllm.py
Without it the vLLM-object checks skip and the rest still runs.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from speed_ray.generate.config import EngineConfig
from speed_ray.llm.rows import LLMRequest, request_columns
from speed_ray.synth.schemas import sample_keys, sample_schema

pytestmark = pytest.mark.rehearsal

TYPES = ["retrieval", "classification", "sts", "matching_short", "bitext", "matching_long"]
N_ROWS = 15          # blocks of 3 rows: every block mixes task types; the middle block is unseeded


def _vllm():
    """vLLM's Python package (from the environment, else from SPEED_RAY_VLLM_SITE), or skip."""
    for p in filter(None, os.environ.get("SPEED_RAY_VLLM_SITE", "").split(os.pathsep)):
        if p not in sys.path:
            sys.path.append(p)     # after the venv: never shadow its torch / transformers / xgrammar
    pytest.importorskip("vllm.sampling_params", reason="vLLM's Python package does not import "
                        "(set SPEED_RAY_VLLM_SITE, see this module's docstring)")
    import vllm

    return vllm


def _request_rows() -> list[dict]:
    """Synthesis request rows as `_requests` builds them with structured_output on: every row constrained to its
    task type's schema. Seeds vary, and one whole block is unseeded (a null-typed seed next to int64 blocks)."""
    rows = []
    for i in range(N_ROWS):
        t = TYPES[i % len(TYPES)]
        req = LLMRequest([{"role": "user", "content": f"Write a {t} example, number {i}."}], temperature=0.7,
                         max_tokens=64, json_schema=sample_schema(t), seed=None if 6 <= i < 9 else 1000 + i)
        # passthrough columns as the synthesis stage has them; `prompt` collides with ray.data.llm's own column
        rows.append({"id": f"r{i}", "task_type": t, "prompt": f"[data prompt {i}]", **request_columns(req)})
    return rows


@pytest.fixture(scope="module")
def processed(ray_local, tiny_llama):
    """The processor's output rows for _request_rows(), run with the engine stage stood in for."""
    from speed_ray.generate.vllm_engine import build_vllm_processor, finalize_row
    from speed_ray.generate.vllm_rehearsal import swap_engine_stage

    cfg = EngineConfig(kind="vllm", batch_size=4, max_model_len=512)
    proc = build_vllm_processor(cfg, tiny_llama, builder_kwargs={"override_stage_config_fn": swap_engine_stage})
    assert list(proc.stages) == ["ChatTemplateStage", "TokenizeStage", "vLLMEngineStage", "DetokenizeStage"]
    ds = ray_local.data.from_items(_request_rows(), override_num_blocks=N_ROWS // 3)
    out = proc(ds).map(finalize_row, num_cpus=0.1).take_all()
    return {r["id"]: r for r in out}


def test_engine_stage_gets_each_rows_own_schema_intact(processed, tiny_llama):
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from speed_ray.generate.vllm_rehearsal import captured

    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(tiny_llama)))
    rows = {r["id"]: r for r in _request_rows()}
    assert set(processed) == set(rows)
    for rid, out in processed.items():
        src, got = rows[rid], captured(out)
        engine_row, stage = got["row"], got["stage"]
        assert stage["model"] == tiny_llama and stage["dynamic_lora_loading_path"] is None
        assert engine_row["model"] == tiny_llama                      # no LoRA request
        assert engine_row["tokenized_prompt"] is not None and engine_row["prompt"].endswith("assistant\n")
        sp = engine_row["sampling_params"]
        assert set(sp) == {"temperature", "top_p", "max_tokens", "seed", "structured_outputs"}, rid
        assert sp["seed"] == src["seed"] and sp["max_tokens"] == 64   # unseeded: null in the row and in vLLM
        schema = sp["structured_outputs"]["json"]
        assert json.loads(schema) == sample_schema(src["task_type"]), rid   # no other type's keys as null
        xgr.Grammar.from_json_schema(schema)
        compiler.compile_json_schema(schema)
        # and back through detokenize + postprocess: our columns restored, the stand-in's text as the result
        assert out["prompt"] == src["prompt"] and out["task_type"] == src["task_type"]
        assert out["finish_reason"] == "stop" and out["error"] == "" and out["engine"] == "vllm"
        assert json.loads(out["messages"]) == json.loads(src["messages"]) and out["completion_tokens"] > 0
        assert list(json.loads(out["text"])) == list(sample_keys(src["task_type"]))


def test_engine_stage_rows_become_vllm_sampling_params(processed, tiny_llama):
    vllm = _vllm()
    from vllm.v1.structured_output.backend_xgrammar import validate_xgrammar_grammar

    from speed_ray.generate.vllm_rehearsal import captured, engine_request

    rows = {r["id"]: r for r in _request_rows()}
    for rid, out in processed.items():
        src = rows[rid]
        req = engine_request(captured(out)["row"], model=tiny_llama)     # ray.data.llm's own request preparation
        params = req.params
        assert isinstance(params, vllm.SamplingParams) and req.lora_request is None
        assert req.prompt_token_ids and params.max_tokens == 64 and params.temperature == pytest.approx(0.7)
        assert params.seed == src["seed"]
        assert json.loads(params.structured_outputs.json) == sample_schema(src["task_type"])
        validate_xgrammar_grammar(params)      # what vLLM runs on a request before it is scheduled


def test_unconstrained_unseeded_row_becomes_plain_sampling_params(tiny_llama):
    """engine.structured_output off: no structured_outputs key at all, which the engine stage reads as None."""
    from speed_ray.generate.vllm_engine import Preprocess

    pre = Preprocess(tiny_llama)(request_columns(LLMRequest([{"role": "user", "content": "x"}], max_tokens=9)))
    assert "structured_outputs" not in pre["sampling_params"] and pre["sampling_params"]["seed"] is None
    vllm = _vllm()
    from speed_ray.generate.vllm_rehearsal import engine_request

    req = engine_request({**pre, "prompt": "p", "tokenized_prompt": [1, 2], "__idx_in_batch": 0}, model=tiny_llama)
    assert isinstance(req.params, vllm.SamplingParams) and req.params.structured_outputs is None
    assert req.params.seed is None and req.params.max_tokens == 9 and req.lora_request is None


def _adapter(tmp_path, base: str, r: int) -> str:
    """A real PEFT LoRA adapter for `base` (rank r), saved like the align stages save theirs."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                peft.LoraConfig(r=r, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    out = tmp_path / "stages" / "senior_dpo" / "fp" / "artifacts" / "adapter"
    model.save_pretrained(str(out))
    return str(out)


def test_local_lora_adapter_reaches_vllm_as_a_loadable_lora_request(tmp_path, tiny_llama):
    from ray.llm._internal.common.utils.lora_utils import download_lora_adapter

    from speed_ray.generate.vllm_engine import Preprocess, lora_target, processor_kwargs

    adapter = _adapter(tmp_path, tiny_llama, r=80)                 # 80 is not a rank vLLM reserves
    kw = processor_kwargs(EngineConfig(kind="vllm", use_adapter=True), tiny_llama, adapter)
    assert kw["engine_kwargs"]["max_lora_rank"] == 128 and "dynamic_lora_loading_path" not in kw
    pre = Preprocess(lora_target(adapter)[1])(request_columns(LLMRequest([{"role": "user", "content": "x"}])))
    # ray.data.llm's engine stage: a `model` other than model_source is a LoRA adapter to fetch
    assert pre["model"] != tiny_llama
    assert download_lora_adapter(pre["model"], remote_path=kw.get("dynamic_lora_loading_path")) == adapter

    vllm = _vllm()
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    from speed_ray.generate.vllm_rehearsal import engine_request

    engine_row = {**pre, "prompt": "p", "tokenized_prompt": [1, 2, 3], "__idx_in_batch": 0}
    req = engine_request(engine_row, model=tiny_llama, dynamic_lora_loading_path=kw.get("dynamic_lora_loading_path"))
    assert isinstance(req.lora_request, vllm.lora.request.LoRARequest) and req.lora_request.lora_path == adapter
    helper = PEFTHelper.from_local_dir(req.lora_request.lora_path, max_position_embeddings=None)
    helper.validate_legal(LoRAConfig(max_lora_rank=kw["engine_kwargs"]["max_lora_rank"]))
    with pytest.raises(ValueError, match="max_lora_rank"):         # what the configured 64 alone would do
        helper.validate_legal(LoRAConfig(max_lora_rank=64))


def test_s3_lora_adapter_downloads_through_rays_loader(tmp_path, tiny_llama, s3_server, monkeypatch):
    import fsspec
    import huggingface_hub.constants
    from ray.llm._internal.common.utils.lora_utils import download_lora_adapter

    from speed_ray.generate.vllm_engine import lora_target, processor_kwargs

    local = _adapter(tmp_path, tiny_llama, r=8)
    url = f"s3://{s3_server['bucket']}/run/stages/senior_dpo/fp/artifacts/adapter"
    fs = fsspec.filesystem("s3")
    fs.put(local + "/", url.removeprefix("s3://") + "/", recursive=True)
    kw = processor_kwargs(EngineConfig(kind="vllm", use_adapter=True, max_lora_rank=8), "s3://b/base", url)
    loading_path, name = lora_target(url)
    assert kw["dynamic_lora_loading_path"] == loading_path and kw["engine_kwargs"]["max_lora_rank"] == 8
    # the engine stage's download, into a private HF cache and lock dir
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    (tmp_path / "home").mkdir()
    got = download_lora_adapter(name, remote_path=loading_path)
    with open(os.path.join(got, "adapter_config.json")) as f, open(os.path.join(local, "adapter_config.json")) as g:
        assert json.load(f) == json.load(g)
    assert os.path.exists(os.path.join(got, "adapter_model.safetensors"))
