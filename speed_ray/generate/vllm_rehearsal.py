"""Rehearsing the vLLM path on CPU, up to vLLM's boundary.

`build_vllm_processor(..., builder_kwargs={"override_stage_config_fn": swap_engine_stage})` builds the real
ray.data.llm processor (our preprocess, its chat-template and tokenize stages, its detokenize stage, our
postprocess) with ONLY the vLLM engine stage replaced by `EngineStandInUDF`. The stand-in is not vLLM and generates
nothing: it records every row exactly as ray.data.llm hands it to the engine stage (pickled, in CAPTURE_COLUMN) and
answers with a canned JSON object for the row's schema, tokenized like a generation, so the stages after it run on
real output columns. `engine_request` then feeds a recorded row through ray.data.llm's own request preparation
(`vLLMEngineWrapper._prepare_llm_request`: vllm.SamplingParams, StructuredOutputsParams, LoRARequest) when vLLM's
Python package imports, which it does on CPU (see tests/test_rehearsal_vllm.py).

`swap_engine_stage` uses ray.data.llm's own seam, ProcessorBuilder.build's override_stage_config_fn, which is
called with each (stage name, stage) after the processor is built.
"""

from __future__ import annotations

import json
import pickle
import uuid
from typing import Any, AsyncIterator

from ray.llm._internal.batch.stages.base import StatefulStageUDF
from ray.llm._internal.batch.stages.common import maybe_convert_ndarray_to_list

ENGINE_STAGE = "vLLMEngineStage"
CAPTURE_COLUMN = "engine_stage_input"      # passes our postprocess untouched (not a ray.data.llm column)


def canned_output(sampling_params: dict[str, Any] | None) -> str:
    """What the stand-in 'generates': an object with every required key of the row's schema (else plain text)."""
    so = (sampling_params or {}).get("structured_outputs") or {}
    schema = so.get("json") if isinstance(so, dict) else None
    if isinstance(schema, str):
        schema = json.loads(schema)
    if isinstance(schema, dict) and schema.get("type") == "object":
        return json.dumps({k: "stand-in" for k in schema.get("required") or schema.get("properties") or {}})
    return "stand-in text"


class EngineStandInUDF(StatefulStageUDF):
    """CPU stand-in for ray.data.llm's vLLMEngineStageUDF (NOT vLLM). Takes the engine stage's constructor kwargs,
    records each row as the engine stage receives it, and returns vLLMOutputData-shaped columns."""

    def __init__(self, data_column: str, expected_input_keys: list[str], model: str, **engine_stage_kwargs):
        from transformers import AutoTokenizer

        super().__init__(data_column, expected_input_keys)
        self.stage = {"model": model, **{k: engine_stage_kwargs.get(k) for k in
                                         ("dynamic_lora_loading_path", "engine_kwargs", "should_continue_on_error")}}
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.request_id = 0

    async def udf(self, batch: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        batch_uuid = uuid.uuid4().hex
        for row in batch:
            captured = pickle.dumps({"row": dict(row), "stage": self.stage})
            # what vLLMEngineWrapper._prepare_llm_request takes out of the row before it reaches vLLM
            sp = row.pop("sampling_params")
            prompt_ids = maybe_convert_ndarray_to_list(row.pop("tokenized_prompt", None))
            prompt_ids = list(prompt_ids) if prompt_ids is not None else []
            tokens = self.tokenizer(canned_output(sp), add_special_tokens=False)["input_ids"]
            self.request_id += 1
            yield {self.IDX_IN_BATCH_COLUMN: row[self.IDX_IN_BATCH_COLUMN], "prompt": row.get("prompt") or "",
                   "prompt_token_ids": prompt_ids, "num_input_tokens": len(prompt_ids), "generated_tokens": tokens,
                   "generated_text": "", "num_generated_tokens": len(tokens), "embeddings": None, "metrics": None,
                   "logprobs": None, "prompt_logprobs": None, "request_id": self.request_id,
                   "batch_uuid": batch_uuid, "time_taken_llm": 0.0, "params": "", "__inference_error__": "",
                   CAPTURE_COLUMN: captured}


def swap_engine_stage(name: str, stage, num_cpus: float = 0.25) -> None:
    """override_stage_config_fn: the engine stage runs EngineStandInUDF on one CPU actor, without a GPU; every
    stage asks for `num_cpus` so the whole processor fits a 2-CPU test cluster."""
    from ray.data import ActorPoolStrategy

    if name == ENGINE_STAGE:
        stage.fn = EngineStandInUDF          # (assignment re-runs vLLMEngineStage's validator: edit kwargs after)
        kw = stage.map_batches_kwargs
        for k in ("num_gpus", "accelerator_type", "ray_remote_args_fn", "resources"):
            kw.pop(k, None)
        kw["compute"] = ActorPoolStrategy(size=1)
    stage.map_batches_kwargs["num_cpus"] = num_cpus


def captured(row: dict[str, Any]) -> dict[str, Any]:
    """{"row": the engine stage's input row, "stage": its model, dynamic_lora_loading_path, engine_kwargs}."""
    return pickle.loads(row[CAPTURE_COLUMN])


def engine_request(engine_input: dict[str, Any], model: str, dynamic_lora_loading_path: str | None = None):
    """ray.data.llm's own vLLMEngineWrapper._prepare_llm_request on a recorded engine-stage row, on a wrapper with
    no engine: the vLLMEngineRequest (vllm.SamplingParams, LoRARequest) it would pass to engine.generate.
    Needs vLLM's Python package (not its GPU kernels)."""
    import asyncio
    import copy

    import vllm.lora.request  # noqa: F401  (the stage reaches these as attributes of an already-imported vllm)
    import vllm.sampling_params  # noqa: F401
    from ray.llm._internal.batch.constants import vLLMTaskType
    from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineWrapper

    wrapper = vLLMEngineWrapper.__new__(vLLMEngineWrapper)   # the attributes __init__ sets, minus the engine
    wrapper.request_id = 0
    wrapper.idx_in_batch_column = StatefulStageUDF.IDX_IN_BATCH_COLUMN
    wrapper.task_type = vLLMTaskType.GENERATE
    wrapper.model = model
    wrapper.dynamic_lora_loading_path = dynamic_lora_loading_path
    wrapper.lora_name_to_request = {}

    async def prepare():
        wrapper.lora_lock = asyncio.Lock()
        return await wrapper._prepare_llm_request(copy.deepcopy(engine_input))

    return asyncio.run(prepare())
