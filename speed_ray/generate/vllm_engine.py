"""The GPU engine: vLLM through ray.data.llm's build_processor, mapped onto the shared generation row contract.

Everything here but `build_vllm_processor` is plain data in, plain data out, so it is tested without vLLM.
"""

from __future__ import annotations

import json
import os
from typing import Any

from speed_ray.generate.config import EngineConfig

# Columns ray.data.llm's stages read or write; ours are moved aside before and restored after.
_VLLM_COLUMNS = ("prompt", "model", "sampling_params", "tokenized_prompt", "generated_text", "generated_tokens",
                 "num_input_tokens", "num_generated_tokens", "prompt_token_ids", "metrics", "embeddings",
                 "logprobs", "prompt_logprobs", "request_id", "time_taken_llm", "params", "batch_uuid")
_STASH = "__sr_"


def lora_target(adapter_path: str | None) -> tuple[str, str] | None:
    """(dynamic_lora_loading_path, lora name) for a local adapter directory, or None."""
    if not adapter_path:
        return None
    adapter_path = adapter_path.rstrip("/")
    return os.path.dirname(adapter_path), os.path.basename(adapter_path)


def processor_kwargs(cfg: EngineConfig, model_source: str, adapter_path: str | None = None) -> dict[str, Any]:
    """kwargs for ray.data.llm.vLLMEngineProcessorConfig: replicas autoscale between replicas_min and _max."""
    engine_kwargs: dict[str, Any] = {
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "max_model_len": cfg.max_model_len,
        "enforce_eager": cfg.enforce_eager,
        "enable_prefix_caching": True,      # every synthesis prompt shares a long template prefix
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
    }
    if cfg.dtype != "auto":
        engine_kwargs["dtype"] = cfg.dtype
    kwargs: dict[str, Any] = {
        "model_source": model_source,
        "engine_kwargs": engine_kwargs,
        "concurrency": (cfg.replicas_min, cfg.replicas_max),
        "batch_size": cfg.batch_size,
        # chat template, tokenize and detokenize stages are on by default (chat_template_stage=... etc.)
        # a row that vLLM rejects (too long, bad schema) becomes an error row instead of failing the stage
        "should_continue_on_error": True,
    }
    if cfg.accelerator_type:
        kwargs["accelerator_type"] = cfg.accelerator_type
    lora = lora_target(adapter_path)
    if lora:
        engine_kwargs.update(enable_lora=True, max_lora_rank=cfg.max_lora_rank, max_loras=1)
        kwargs["dynamic_lora_loading_path"] = lora[0]
    return kwargs


def sampling_params(row: dict[str, Any]) -> dict[str, Any]:
    """vLLM SamplingParams kwargs for one request row (structured outputs as ray.data.llm expects them)."""
    sp: dict[str, Any] = {"temperature": float(row.get("temperature", 1.0)), "top_p": float(row.get("top_p", 1.0)),
                          "max_tokens": int(row.get("max_tokens", 800))}
    seed = row.get("seed")
    if seed is not None and int(seed) >= 0:
        sp["seed"] = int(seed)
    schema = row.get("json_schema") or ""
    if schema:
        # vLLM >= 0.11: SamplingParams(structured_outputs=StructuredOutputsParams(json=...)); ray.data.llm builds it
        sp["structured_outputs"] = {"json": json.loads(schema) if isinstance(schema, str) else schema}
    return sp


class Preprocess:
    """Row -> ray.data.llm input: chat messages, per-row sampling params, optional LoRA name."""

    def __init__(self, lora_name: str | None = None):
        self.lora_name = lora_name

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        out = {(_STASH + k if k in _VLLM_COLUMNS else k): v for k, v in row.items()}
        msgs = row["messages"]
        out["messages"] = json.loads(msgs) if isinstance(msgs, str) else msgs
        out["__sr_messages_json"] = msgs if isinstance(msgs, str) else json.dumps(list(msgs))
        out["sampling_params"] = sampling_params(row)
        if self.lora_name:
            out["model"] = self.lora_name
        return out


def postprocess(row: dict[str, Any]) -> dict[str, Any]:
    """ray.data.llm output -> our result columns; finish_reason is inferred from the token budget."""
    err = row.get("__inference_error__") or ""
    out = {k: v for k, v in row.items() if k not in _VLLM_COLUMNS and k not in ("messages", "__inference_error__")
           and not k.startswith(_STASH)}
    for k, v in row.items():
        if k.startswith(_STASH) and k != "__sr_messages_json":
            out[k[len(_STASH):]] = v
    out["messages"] = row.get("__sr_messages_json", "")
    n_gen = int(row.get("num_generated_tokens") or 0)
    max_tokens = int(row.get("max_tokens") or 0)
    out["text"] = "" if err else (row.get("generated_text") or "")
    out["prompt_tokens"] = int(row.get("num_input_tokens") or 0)
    out["completion_tokens"] = n_gen
    out["finish_reason"] = "error" if err else ("length" if max_tokens and n_gen >= max_tokens else "stop")
    out["gen_error"] = str(err)
    out["engine"] = "vllm"
    return out


def finalize_row(row: dict[str, Any]) -> dict[str, Any]:
    """After the processor: ray.data.llm returns error rows raw (they bypass postprocess); map them too."""
    if row.get("__inference_error__"):
        return postprocess(row)
    row = dict(row)
    row.pop("__inference_error__", None)
    return row


def build_vllm_processor(cfg: EngineConfig, model_source: str, adapter_path: str | None = None):
    """A ray.data.llm Processor; `generate_vllm` applies it. Needs vLLM on the GPU nodes."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    lora = lora_target(adapter_path)
    config = vLLMEngineProcessorConfig(**processor_kwargs(cfg, model_source, adapter_path))
    return build_processor(config, preprocess=Preprocess(lora[1] if lora else None), postprocess=postprocess,
                           preprocess_map_kwargs={"num_cpus": 0.25}, postprocess_map_kwargs={"num_cpus": 0.25})


def generate_vllm(ds, cfg: EngineConfig, model_source: str, adapter_path: str | None = None):
    """ds of request rows -> ds with the result columns, on a vLLM actor pool of replicas_min..replicas_max."""
    processor = build_vllm_processor(cfg, model_source, adapter_path)
    return processor(ds).map(finalize_row, num_cpus=0.1)
