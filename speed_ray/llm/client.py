"""Async client for any OpenAI-compatible /chat/completions endpoint (the teacher, and the generators' `openai`
engine): bounded concurrency, rpm/tpm limits,
retries with backoff and Retry-After, a response cache, a budget cap, and per-request cost accounting."""

# Why aiohttp and not openai.AsyncOpenAI(max_retries=0) or httpx: this client owns retries, the total per-request
# timeout, Retry-After and error classification, so it needs the status and headers, not an SDK's exceptions; every
# error string is built here, so no exception object that carries the request (and its Authorization header)
# travels into results or logs. aiohttp because at 64 in flight httpx's connection pool costs ~5 ms CPU per request
# against ~0.4 ms for aiohttp (measured on this 2-core box: 23 vs 212 req/s at 200 ms latency; the SDK sits on httpx
# and adds a pydantic parse), and a teacher run is exactly many small concurrent requests.

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import random
import traceback
from dataclasses import dataclass, field
from typing import Any

from speed_ray.llm.cache import ResponseCache
from speed_ray.llm.ratelimit import RateLimiter, backoff_delay, parse_retry_after
from speed_ray.llm.rows import LLMRequest, LLMResult

log = logging.getLogger("speed_ray.llm")

RETRYABLE_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))


class Secret:
    """An API key that never shows itself in a repr, str, log line or traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def estimate_prompt_tokens(messages: list[dict]) -> int:
    """~4 characters per token plus a few per message for the chat template; corrected by real usage later."""
    chars = 0
    for m in messages:
        content = m.get("content") or ""
        if isinstance(content, list):  # multi-part content: count the text parts
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        chars += len(str(content))
    return chars // 4 + 4 * len(messages) + 2


async def _maybe_await(x: Any) -> Any:
    return await x if inspect.isawaitable(x) else x


@dataclass
class _Outcome:
    kind: str                                # ok | status | timeout | connection | bad_response | refusal
    status: int = 0
    retry_after: float | None = None
    message: str = ""
    data: dict = field(default_factory=dict)


def _env_proxy(url: str) -> str | None:
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.getproxies().get(parts.scheme)


class _LoopState:
    """HTTP session and semaphore bound to one event loop (asyncio objects must not cross loops)."""

    def __init__(self, client: "ChatClient"):
        import aiohttp

        headers = {"Content-Type": "application/json"}
        if client._key is not None:
            headers["Authorization"] = f"Bearer {client._key.get()}"
        # HTTPS_PROXY / NO_PROXY are honoured as the OpenAI SDK does, but resolved once here: aiohttp's trust_env
        # looks them up in a thread per request, which doubled the client's CPU per call. The total timeout is ours.
        self.proxy = _env_proxy(client.url)
        self.http = aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=None, connect=client.timeout_s),
            connector=aiohttp.TCPConnector(limit=client.concurrency, limit_per_host=client.concurrency))
        self.sem = asyncio.Semaphore(client.concurrency)


class ChatClient:
    """Sends LLMRequests to `base_url`/chat/completions. One client per process (or Ray actor)."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 64,
                 rpm: int | None = None, tpm: int | None = None, timeout_s: float = 120.0, max_retries: int = 6,
                 backoff_base_s: float = 1.0, backoff_max_s: float = 60.0, cache: ResponseCache | None = None,
                 budget: Any = None, api_key: Secret | str | None = None, rng: random.Random | None = None,
                 max_tokens_param: str = "max_tokens", usd_per_mtok: tuple[float, float] | None = None):
        if not base_url:
            raise ValueError("ChatClient needs a base_url (e.g. https://api.openai.com/v1)")
        if concurrency <= 0:
            raise ValueError(f"concurrency must be > 0, got {concurrency}")
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        if max_tokens_param not in ("max_tokens", "max_completion_tokens"):
            raise ValueError(f"max_tokens_param must be max_tokens or max_completion_tokens, got {max_tokens_param!r}")
        self.max_tokens_param = max_tokens_param
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.cache = cache
        self.budget = budget                 # Budget, or anything with (maybe async) try_acquire/settle
        self.usd_per_mtok = usd_per_mtok     # (input, output) USD per 1M tokens: the budget's dollars (None: none)
        self.limiter = RateLimiter(rpm, tpm) if (rpm or tpm) else None
        self._rng = rng or random.Random()
        if isinstance(api_key, str):
            api_key = Secret(api_key)
        if api_key is None and os.environ.get(api_key_env):
            api_key = Secret(os.environ[api_key_env])
        # No key is fine for local endpoints (vLLM, the project's Serve app): no Authorization header is sent.
        self._key: Secret | None = api_key
        self._states: dict[int, tuple[asyncio.AbstractEventLoop, _LoopState]] = {}

    def __repr__(self) -> str:
        return (f"ChatClient(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r}, "
                f"concurrency={self.concurrency})")

    def __getstate__(self):
        raise TypeError("ChatClient is not picklable (it holds a key and live connections); "
                        "build one per worker, e.g. with ChatClient.from_config")

    # ---- plumbing ----------------------------------------------------------------------------------
    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        entry = self._states.get(id(loop))
        if entry is None or entry[0] is not loop:
            entry = (loop, _LoopState(self))
            self._states[id(loop)] = entry
        return entry[1]

    async def aclose(self) -> None:
        """Close this event loop's connections."""
        entry = self._states.pop(id(asyncio.get_running_loop()), None)
        if entry is not None:
            await entry[1].http.close()

    def _redact(self, text: str) -> str:
        if self._key is not None and self._key.get():
            text = text.replace(self._key.get(), "***")
        return text

    def _body(self, req: LLMRequest) -> dict:
        body = {"model": self.model, "messages": req.messages, "temperature": req.temperature, "top_p": req.top_p,
                self.max_tokens_param: req.max_tokens}
        if req.response_format:
            body["response_format"] = req.response_format
        if req.seed is not None:
            body["seed"] = req.seed
        return body

    async def _send(self, st: _LoopState, req: LLMRequest) -> _Outcome:
        import aiohttp

        try:
            async with asyncio.timeout(self.timeout_s):  # total time for the attempt, body included
                async with st.http.post(self.url, data=json.dumps(self._body(req)).encode(), proxy=st.proxy) as resp:
                    raw = await resp.read()
                    status, headers = resp.status, resp.headers
        except TimeoutError:
            return _Outcome("timeout")
        except aiohttp.ClientError as e:  # refused, reset, cut body: the name only (messages can hold URLs)
            return _Outcome("connection", message=type(e).__name__)
        if status != 200:
            msg = raw[:500].decode("utf-8", "replace")
            try:
                err = json.loads(raw).get("error")
                msg = (err.get("message") if isinstance(err, dict) else str(err)) or msg
            except (ValueError, AttributeError):
                pass
            return _Outcome("status", status, parse_retry_after(headers), msg[:300])
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
            message = choice["message"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            # A 200 with a cut or malformed body is a proxy/transport fault, not the model's answer: retry it.
            return _Outcome("bad_response", message=f"{type(e).__name__} in response body")
        if message.get("content") is None and message.get("refusal"):
            return _Outcome("refusal", message=str(message["refusal"])[:300], data=data)
        return _Outcome("ok", data=data)

    # ---- public ------------------------------------------------------------------------------------
    async def complete(self, req: LLMRequest) -> LLMResult:
        """One request: cache, budget, rate limits, retries. Never raises for endpoint or network failures."""
        try:
            return await self._complete(req)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug must not lose the row: report it on the row, without the key
            log.error("teacher request %s failed unexpectedly:\n%s", req.request_id,
                      self._redact(traceback.format_exc()))
            return LLMResult(error=self._redact(f"client_error: {type(e).__name__}: {e}")[:300],
                             request_id=req.request_id)

    async def _complete(self, req: LLMRequest) -> LLMResult:
        key = ResponseCache.key_for(self.model, req) if self.cache is not None else None
        if key is not None:
            try:
                hit = await asyncio.to_thread(self.cache.get, key)
            except OSError as e:  # an unreachable cache (object store hiccup) is a miss, not a lost row
                log.warning("teacher cache read failed (%s); calling the endpoint", type(e).__name__)
                hit = None
            if hit is not None and isinstance(hit.get("text"), str):
                return LLMResult(hit["text"], int(hit.get("prompt_tokens", 0)), int(hit.get("completion_tokens", 0)),
                                 finish_reason=hit.get("finish_reason") or "", cached=True,
                                 request_id=req.request_id)
        st = self._state()
        est_prompt = estimate_prompt_tokens(req.messages)
        est = est_prompt + req.max_tokens
        est_usd = self._usd(est_prompt, req.max_tokens)     # the worst case: every allowed token written
        admitted, attempts = False, 0
        out = _Outcome("timeout")
        try:
            for attempt in range(self.max_retries + 1):
                async with st.sem:  # the slot is held for one attempt only, never across a backoff sleep
                    if not admitted:
                        if self.budget is not None and not await _maybe_await(self.budget.try_acquire(est, est_usd)):
                            return LLMResult(error="budget_exhausted", request_id=req.request_id)
                        admitted = True
                    if self.limiter is not None:
                        await self.limiter.acquire(est)
                    attempts += 1
                    out = await self._send(st, req)
                retryable = out.kind in ("timeout", "connection", "bad_response") or (
                    out.kind == "status" and out.status in RETRYABLE_STATUS)
                if self.limiter is not None:
                    usage = out.data.get("usage") or {}
                    used = int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
                    self.limiter.correct(est, used if out.kind == "ok" else 0)
                if not retryable or attempt == self.max_retries:
                    break
                delay = backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s, out.retry_after, self._rng)
                log.debug("teacher request %s: %s%s, retry %d/%d in %.2fs", req.request_id, out.kind,
                         f" {out.status}" if out.status else "", attempt + 1, self.max_retries, delay)
                await asyncio.sleep(delay)
            result = self._result(req, out, attempts, retryable)
            if key is not None and result.ok:  # only successful answers are cached
                entry = {"text": result.text, "prompt_tokens": result.prompt_tokens,
                         "completion_tokens": result.completion_tokens, "finish_reason": result.finish_reason,
                         "model": self.model}
                try:
                    await asyncio.to_thread(self.cache.put, key, entry)
                except OSError as e:  # the answer is paid for and still goes on the row; only a rerun would re-ask
                    log.warning("teacher cache write failed (%s) for %s", type(e).__name__, req.request_id)
            return result
        finally:
            if admitted and self.budget is not None:
                usage = out.data.get("usage") or {}
                pt, ct = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
                await _maybe_await(self.budget.settle(est, pt + ct, est_usd, self._usd(pt, ct)))

    def _usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        if self.usd_per_mtok is None:
            return 0.0
        return (prompt_tokens * self.usd_per_mtok[0] + completion_tokens * self.usd_per_mtok[1]) / 1e6

    def _result(self, req: LLMRequest, out: _Outcome, attempts: int, retryable: bool) -> LLMResult:
        usage = out.data.get("usage") or {}
        pt, ct = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        if out.kind == "ok":
            choice = out.data["choices"][0]
            text = choice["message"].get("content") or ""
            finish = choice.get("finish_reason")
            return LLMResult(text, pt, ct, finish_reason=finish or "", attempts=attempts, request_id=req.request_id)
        if out.kind == "refusal":
            error = f"refusal: {out.message}"
        elif retryable:
            error = f"http_{out.status}_exhausted" if out.kind == "status" else f"{out.kind}_exhausted"
        else:
            error = f"http_{out.status}: {out.message}"
        # no answer: finish_reason "error", as an engine's failed row
        return LLMResult("", pt, ct, finish_reason="error", error=self._redact(error), attempts=attempts,
                         request_id=req.request_id)

    async def complete_many(self, reqs: list[LLMRequest]) -> list[LLMResult]:
        """All requests, at most `concurrency` in flight; results in the order of `reqs`."""
        return list(await asyncio.gather(*(self.complete(r) for r in reqs)))

    def complete_many_sync(self, reqs: list[LLMRequest]) -> list[LLMResult]:
        """For scripts and tests (not from inside a running event loop)."""
        async def run():
            try:
                return await self.complete_many(reqs)
            finally:
                await self.aclose()

        return asyncio.run(run())
