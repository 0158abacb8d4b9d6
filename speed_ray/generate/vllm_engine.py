"""The GPU engine: vLLM through ray.data.llm's build_processor, mapped onto the shared generation row contract.

Everything here but `build_vllm_processor` is plain data in, plain data out, so it is tested without vLLM.
`speed_ray.generate.vllm_rehearsal` runs the real processor on CPU with only the engine stage stood in for.

Two facts about ray.data.llm (ray/llm/_internal/batch) shape the row contract:
- the preprocess output, our whole row included, travels between its stages as ONE Arrow struct column per block
  (`Processor.DATA_COLUMN`), so a nested dict is stored as a struct whose fields are the union over the block's
  rows: a key present on some rows only reappears as null on the others. A per-row JSON schema as a dict would
  gain every other task type's properties as null (xgrammar: "Schema should be an object or bool, but got null"),
  so it travels as a JSON string (taken from the row's response_format) (vLLM's StructuredOutputsParams(json=...) takes a str or a dict and passes a str
  to the grammar backend unchanged). See `sampling_params` for the other keys.
- the engine stage reads `model` from the row: a value other than the processor's model_source is a LoRA request,
  so every row carries `model` explicitly.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from speed_ray.generate.config import EngineConfig
from speed_ray.llm.rows import schema_of

log = logging.getLogger("speed_ray.generate")

# Columns ray.data.llm's stages read or write; ours are moved aside before and restored after.
_VLLM_COLUMNS = ("prompt", "model", "sampling_params", "tokenized_prompt", "generated_text", "generated_tokens",
                 "num_input_tokens", "num_generated_tokens", "prompt_token_ids", "metrics", "embeddings",
                 "logprobs", "prompt_logprobs", "request_id", "time_taken_llm", "params", "batch_uuid",
                 "multimodal_data", "mm_processor_kwargs", "multimodal_uuids", "tokenization_kwargs", "pooling_params")
# Of those, the ones the engine stage reads that no earlier stage overwrites: ray.data.llm keeps the input row's own
# columns next to the preprocess output, so a passthrough column of that name would reach the engine; Preprocess
# sets them (model) or blanks them (the rest).
_ENGINE_READS = ("multimodal_data", "mm_processor_kwargs", "multimodal_uuids", "tokenization_kwargs", "pooling_params")
_STASH = "__sr_"

# The adapter locations ray.data.llm downloads from (ray.llm._internal.common.utils.cloud_utils.is_remote_path and
# CloudFileSystem._get_provider_fs); any other URL scheme cannot be a dynamic_lora_loading_path.
RAY_LORA_SCHEMES = ("s3://", "gs://", "abfss://", "azure://")
# vLLM's LoRAConfig.max_lora_rank must be one of these (vllm/config/lora.py MaxLoRARanks, vLLM 0.32).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_target(adapter_path: str | None) -> tuple[str | None, str] | None:
    """(dynamic_lora_loading_path, value of the rows' `model` column) for a LoRA adapter directory, or None.

    ray.data.llm's engine stage turns a row whose `model` differs from the processor's model into
    `download_lora_adapter(model, remote_path=dynamic_lora_loading_path)`: with a remote path it downloads
    `<remote_path>/<model>` (only s3/gs/abfss/azure URLs validate), without one it loads `model` as a local adapter
    directory. So a local adapter is named by its absolute path with no loading path, a remote one by its folder
    name under its parent URL."""
    if not adapter_path:
        return None
    ref = str(adapter_path).rstrip("/")
    for local in ("file://", "local://"):
        if ref.startswith(local):
            ref = ref[len(local):]
    if ref.startswith("gcs://"):
        ref = "gs://" + ref[len("gcs://"):]
    scheme, sep, _ = ref.partition("://")
    if not sep:
        return None, os.path.abspath(ref)
    if not ref.startswith(RAY_LORA_SCHEMES):
        raise ValueError(f"LoRA adapter {adapter_path!r}: ray.data.llm loads adapters from a local directory or from "
                         f"{', '.join(RAY_LORA_SCHEMES)} URLs, not {scheme}://; put the run directory there or set "
                         "engine.use_adapter: false to load the merged checkpoint")
    parent, name = ref.rsplit("/", 1)
    if "://" not in parent or not parent.split("://", 1)[1]:
        raise ValueError(f"LoRA adapter {adapter_path!r}: need a folder under a bucket (scheme://bucket/.../adapter)")
    return parent, name


def adapter_rank(adapter_path: str) -> int | None:
    """The largest LoRA rank in an adapter's adapter_config.json (r and rank_pattern), or None if unreadable."""
    import fsspec

    try:
        with fsspec.open(str(adapter_path).rstrip("/") + "/adapter_config.json", "r") as f:
            conf = json.load(f)
        return max([int(conf["r"]), *(int(v) for v in (conf.get("rank_pattern") or {}).values())])
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        log.warning("could not read the LoRA rank of %s (%s); reserving engine.max_lora_rank", adapter_path, e)
        return None


def vllm_lora_rank(configured: int, adapter: int | None = None) -> int:
    """The max_lora_rank to give vLLM: the smallest rank it accepts that holds both the configured rank and the
    adapter's (vLLM refuses an adapter above max_lora_rank, and any max_lora_rank outside VLLM_LORA_RANKS)."""
    need = max(int(configured), int(adapter or 0))
    for r in VLLM_LORA_RANKS:
        if r >= need:
            if adapter and adapter > configured:
                log.warning("LoRA adapter rank %d > engine.max_lora_rank %d: reserving %d", adapter, configured, r)
            return r
    raise ValueError(f"LoRA rank {need} exceeds vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


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
        rank = vllm_lora_rank(cfg.max_lora_rank, adapter_rank(adapter_path))
        engine_kwargs.update(enable_lora=True, max_lora_rank=rank, max_loras=1)
        if lora[0]:
            kwargs["dynamic_lora_loading_path"] = lora[0]
    return kwargs


def sampling_params(row: dict[str, Any]) -> dict[str, Any]:
    """vLLM SamplingParams kwargs for one request row, as ray.data.llm's engine stage takes them: it builds
    SamplingParams(**rest, structured_outputs=StructuredOutputsParams(**structured_outputs)) when that is set.

    ray.data.llm carries this dict in an Arrow struct per block (see the module docstring), so: the schema is a
    JSON string, never a nested dict; seed is on every row (None when unseeded). structured_outputs is left out
    when the row is unconstrained (a missing key reads as None in the engine stage): Ray Data (2.60) fills a
    missing struct field when it concatenates blocks, but fails on a null-typed one (an all-None batch) next to a
    struct-typed one. A dataset whose rows are all constrained or all unconstrained, as the stages build them,
    is safe; mixing both in one processor run can still hit that Ray Data failure in a later stage."""
    seed = row.get("seed")
    rf = row.get("response_format") or ""
    rf = json.loads(rf) if isinstance(rf, str) and rf else (rf or None)
    schema = schema_of(rf)
    if schema is not None:
        schema = json.dumps(schema)
    sp: dict[str, Any] = {"temperature": float(row.get("temperature", 1.0)), "top_p": float(row.get("top_p", 1.0)),
                          "max_tokens": int(row.get("max_tokens", 800)),
                          "seed": None if seed is None or int(seed) < 0 else int(seed)}
    if schema:
        sp["structured_outputs"] = {"json": schema}
    elif rf and rf.get("type") == "json_object":
        sp["structured_outputs"] = {"json_object": True}
    return sp


class Preprocess:
    """Row -> ray.data.llm input: chat messages, per-row sampling params, and the `model` the engine serves it with
    (the processor's model_source, or the LoRA adapter's name from `lora_target`)."""

    def __init__(self, model: str):
        self.model = model

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        out = {(_STASH + k if k in _VLLM_COLUMNS else k): v for k, v in row.items()}
        out.update({k: None for k in _ENGINE_READS if k in row})
        msgs = row["messages"]
        out["messages"] = json.loads(msgs) if isinstance(msgs, str) else msgs
        out["__sr_messages_json"] = msgs if isinstance(msgs, str) else json.dumps(list(msgs))
        out["sampling_params"] = sampling_params(row)
        out["model"] = self.model
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
    out["error"] = str(err)
    out["cached"], out["attempts"] = False, 0
    out["engine"] = "vllm"
    return out


def finalize_row(row: dict[str, Any]) -> dict[str, Any]:
    """After the processor: ray.data.llm returns error rows raw (they bypass postprocess); map them too."""
    if row.get("__inference_error__"):
        return postprocess(row)
    row = dict(row)
    row.pop("__inference_error__", None)
    return row


def build_vllm_processor(cfg: EngineConfig, model_source: str, adapter_path: str | None = None,
                         builder_kwargs: dict[str, Any] | None = None):
    """A ray.data.llm Processor; `generate_vllm` applies it. Needs vLLM on the GPU nodes.
    builder_kwargs go to ray.data.llm.build_processor (e.g. override_stage_config_fn, as the rehearsal uses)."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    lora = lora_target(adapter_path)
    config = vLLMEngineProcessorConfig(**processor_kwargs(cfg, model_source, adapter_path))
    return build_processor(config, preprocess=Preprocess(lora[1] if lora else model_source), postprocess=postprocess,
                           preprocess_map_kwargs={"num_cpus": 0.25}, postprocess_map_kwargs={"num_cpus": 0.25},
                           builder_kwargs=builder_kwargs)


def generate_vllm(ds, cfg: EngineConfig, model_source: str, adapter_path: str | None = None):
    """ds of request rows -> ds with the result columns, on a vLLM actor pool of replicas_min..replicas_max."""
    processor = build_vllm_processor(cfg, model_source, adapter_path)
    return processor(ds).map(finalize_row, num_cpus=0.1)
