"""A generator behind any OpenAI-compatible endpoint (engine.kind: openai): the same HTTP client as the teacher
(speed_ray.llm.client: retries, Retry-After, timeouts), one per replica, a batch of requests at a time."""

from __future__ import annotations

from typing import Any

from speed_ray.llm.client import ChatClient, Secret
from speed_ray.llm.rows import LLMRequest, LLMResult


class OpenAIEngine:
    name = "openai"

    def __init__(self, model: str, base_url: str, api_key_env: str = "OPENAI_API_KEY",
                 api_key: Secret | None = None, concurrency: int = 16, timeout_s: float = 120.0,
                 max_retries: int = 6, **client_kwargs: Any):
        self.client = ChatClient(base_url, model, api_key_env, concurrency=concurrency, timeout_s=timeout_s,
                                 max_retries=max_retries, api_key=api_key, **client_kwargs)

    def generate(self, requests: list[LLMRequest]) -> list[LLMResult]:
        """One result per request, in order; an endpoint failure is on its row (never raised)."""
        return self.client.complete_many_sync(requests)
