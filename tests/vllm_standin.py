"""A CPU stand-in for speed_ray.generate.server.VLLMChatEngine, for the rehearsal of the vLLM chat server.

It replaces the engine and nothing else: the app is built exactly as for `--engine vllm`, and a test selects this
class explicitly (build_app/start(..., vllm_engine_class=CPUStandInVLLMEngine)); it is never a default. It takes the
real engine's constructor arguments, loads no model, and answers each request with one JSON object recording what
crossed the engine boundary, so a test can check what the ingress parsed:

    {"engine": "cpu-stand-in-for-vllm", "model_source": ..., "engine_args": {...}, "messages": [...],
     "model": ..., "sampling": vllm_sampling_kwargs(params)}    # the SamplingParams kwargs vLLM would get

tests/ is on sys.path under pytest (no __init__.py); Ray replicas get this module by value
(ray.cloudpickle.register_pickle_by_value), see tests/test_rehearsal_llm_server.py.
"""

from __future__ import annotations

import json


class CPUStandInVLLMEngine:
    """Stand-in for VLLMChatEngine(model_source, engine_args): same constructor, same `chat`, no GPU, no vllm."""

    max_model_len = 2048   # like the real engine, a prompt past the context is the caller's 400 (words as tokens)

    def __init__(self, model_source: str, engine_args: dict):
        self.model_source, self.engine_args = model_source, dict(engine_args)

    async def chat(self, p):
        from speed_ray.generate.server import ChatOutput, vllm_sampling_kwargs
        from speed_ray.serve.protocol import APIError

        prompt_tokens = sum(len(m["content"].split()) + 2 for m in p.messages)
        if prompt_tokens >= self.max_model_len:
            raise APIError(400, f"generation failed: prompt of {prompt_tokens} tokens exceeds max_model_len "
                           f"{self.max_model_len}", code="generation_failed")
        record = json.dumps({"engine": "cpu-stand-in-for-vllm", "model_source": self.model_source,
                             "engine_args": self.engine_args, "messages": p.messages, "model": p.model,
                             "sampling": vllm_sampling_kwargs(p)})
        return ChatOutput([(record, "stop")] * p.n, prompt_tokens, p.n * len(record.split()))

    async def check_health(self) -> None:
        return None
