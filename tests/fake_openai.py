"""A real OpenAI-compatible HTTP server on 127.0.0.1 with a scriptable fault plan, for teacher tests and benchmarks.

Usage (in-process; the server runs on its own event loop in a daemon thread):

    from fake_openai import FakeOpenAI, Fault      # tests/ is on sys.path under pytest (no __init__.py)
    with FakeOpenAI(latency_s=0.0) as srv:            # srv.base_url == "http://127.0.0.1:<port>/v1"
        srv.add_fault(Fault("status", status=429, retry_after="1", times=1))
        ... point a TeacherClient at srv.base_url ...
        srv.received                                 # Counter: request hash -> times received
        srv.total, srv.max_inflight, srv.log         # counts, peak concurrency, (arrival monotonic t, hash, outcome)

Random faults (a realistic endpoint): `Fault(..., times=None, probability=p)` fires on a share p of the requests
it matches, rolled per arrival from FakeOpenAI(seed=...), the request and how often it came, so a retry rolls again
and a run is reproducible whatever the arrival order:

    FakeOpenAI(latency_s=0.3, seed=0, keep_bodies=False).add_fault(
        Fault("status", status=429, retry_after="1", times=None, probability=0.02),
        Fault("status", status=500, times=None, probability=0.01))

Default answer: a deterministic function of the request, always a valid JSON object as the message content:
    {"request_hash": <12 hex>, "model": ..., "n_messages": ..., "last_user": <first 200 chars>}

Custom answers: pass `responder=fn` where fn(body: dict) -> str | dict. A str is the message content; a dict may
set "content", "finish_reason" and "usage" ({"prompt_tokens", "completion_tokens"}). E.g. a stage test can parse
the prompt in `body["messages"]` and return the JSON its parser expects. Faults fire before the responder.

Out of process (for benchmarks, so the server does not share the client's GIL):
    python tests/fake_openai.py --latency 0.2     # prints "READY http://127.0.0.1:<port>/v1" then serves
    python tests/fake_openai.py --latency 0.3 --p429 0.02 --p5xx 0.01 --seed 0   # with random 429s and 500s
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import threading
import time
from dataclasses import dataclass
from typing import Callable, Literal

from aiohttp import web

REFUSAL = "I'm sorry, I can't help with that."

FaultKind = Literal["status", "hang", "truncate", "refusal", "wrong_schema", "garbage_body", "refusal_field",
                    "disconnect"]


@dataclass
class Fault:
    """One scripted fault. The first active fault whose `match` is in the request's messages fires.

    kind: status (HTTP `status`, optional Retry-After header), hang (sleep `hang_s` then answer normally),
    truncate (content is the normal JSON cut in half, finish_reason=length), refusal (content is a refusal
    sentence), refusal_field (content null + message.refusal, as OpenAI structured outputs do), wrong_schema
    (valid JSON, wrong keys), garbage_body (HTTP 200 with a non-JSON body), disconnect (the connection is
    dropped without an answer).
    times: how often it fires in total (None: forever); with per_request=True, how often per distinct request.
    probability: the share of matching arrivals it fires on (1.0: every one until `times` is used up); each arrival
    rolls independently (seeded by FakeOpenAI(seed=...), the request and its arrival count), and when several
    faults would fire the first one listed does."""

    kind: FaultKind
    status: int = 500
    retry_after: str | None = None
    match: str | None = None
    times: int | None = 1
    per_request: bool = False
    hang_s: float = 30.0
    message: str = "injected fault"
    probability: float = 1.0


def request_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def default_responder(body: dict) -> str:
    msgs = body.get("messages") or []
    last_user = next((m.get("content") for m in reversed(msgs) if m.get("role") == "user"), "") or ""
    return json.dumps({"request_hash": request_hash(body)[:12], "model": body.get("model"),
                       "n_messages": len(msgs), "last_user": str(last_user)[:200]})


class FakeOpenAI:
    def __init__(self, latency_s: float = 0.0, responder: Callable[[dict], str | dict] | None = None,
                 host: str = "127.0.0.1", port: int = 0, seed: int = 0, keep_bodies: bool = True):
        """seed: rolls the probabilistic faults; keep_bodies=False: `bodies` stays empty (a long benchmark run
        would otherwise hold every request it served)."""
        self.latency_s = latency_s
        self.seed, self.keep_bodies = seed, keep_bodies
        self.responder = responder or default_responder
        self.host, self.port = host, port
        self._lock = threading.Lock()
        self._faults: list[list] = []            # [fault, fired_total, Counter per hash]
        self.received: collections.Counter[str] = collections.Counter()
        self.log: list[tuple[float, str, str]] = []
        self.auth_headers: collections.Counter[str] = collections.Counter()
        self.bodies: dict[str, dict] = {}
        self.total = 0
        self.inflight = 0
        self.max_inflight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # ---- scripting ---------------------------------------------------------------------------------
    def add_fault(self, *faults: Fault) -> "FakeOpenAI":
        with self._lock:
            self._faults.extend([f, 0, collections.Counter()] for f in faults)
        return self

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def reset_counts(self) -> None:
        with self._lock:
            self.received.clear()
            self.log.clear()
            self.total = 0
            self.max_inflight = self.inflight

    def _roll(self, i: int, h: str, nth: int) -> float:
        """A uniform draw in [0, 1) for fault i on the nth arrival of request h."""
        d = hashlib.blake2b(f"{self.seed}:{i}:{h}:{nth}".encode(), digest_size=8).digest()
        return int.from_bytes(d, "big") / 2 ** 64

    def _pick_fault(self, body: dict, h: str) -> Fault | None:
        text = json.dumps(body.get("messages"), ensure_ascii=False)
        with self._lock:
            for i, entry in enumerate(self._faults):
                f, fired, per = entry
                if f.match is not None and f.match not in text:
                    continue
                if f.times is not None and (per[h] if f.per_request else fired) >= f.times:
                    continue
                if f.probability < 1.0 and self._roll(i, h, self.received[h]) >= f.probability:
                    continue
                entry[1] += 1
                per[h] += 1
                return f
        return None

    # ---- serving -----------------------------------------------------------------------------------
    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response({"error": {"message": "body is not JSON", "type": "invalid_request_error"}},
                                     status=400)
        h = request_hash(body)
        arrived = time.monotonic()
        with self._lock:
            self.total += 1
            self.received[h] += 1
            if self.keep_bodies:
                self.bodies[h] = body
            self.auth_headers[request.headers.get("Authorization", "")] += 1
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        outcome = "ok"
        try:
            if not isinstance(body.get("messages"), list) or not body.get("model"):
                outcome = "400"
                return web.json_response({"error": {"message": "model and messages are required",
                                                    "type": "invalid_request_error"}}, status=400)
            fault = self._pick_fault(body, h)
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            if fault is not None:
                outcome = fault.kind if fault.kind != "status" else str(fault.status)
            if fault is not None and fault.kind == "status":
                headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
                return web.json_response({"error": {"message": fault.message, "type": "fault", "code": fault.status}},
                                         status=fault.status, headers=headers)
            if fault is not None and fault.kind == "hang":
                await asyncio.sleep(fault.hang_s)
            if fault is not None and fault.kind == "disconnect":
                request.transport.close()
                raise asyncio.CancelledError  # nothing more to send on a closed connection
            if fault is not None and fault.kind == "garbage_body":
                return web.Response(text='{"id": "chatcmpl-x", "choices": [{"mess', content_type="application/json")
            return web.json_response(self._completion(body, h, fault))
        finally:
            with self._lock:
                self.inflight -= 1
                self.log.append((arrived, h, outcome))

    def _completion(self, body: dict, h: str, fault: Fault | None) -> dict:
        out = self.responder(body)
        out = {"content": out} if isinstance(out, str) else dict(out)
        content, finish = out.get("content"), out.get("finish_reason", "stop")
        message: dict = {"role": "assistant", "content": content}
        if fault is not None:
            if fault.kind == "truncate":
                content, finish = content[: max(1, len(content) // 2)], "length"
            elif fault.kind == "refusal":
                content = REFUSAL
            elif fault.kind == "wrong_schema":
                content = json.dumps({"unexpected_field": True, "note": "not the schema you asked for"})
            elif fault.kind == "refusal_field":
                content = None
                message["refusal"] = REFUSAL
            message["content"] = content
        prompt_chars = sum(len(str(m.get("content") or "")) for m in body.get("messages", []))
        usage = out.get("usage") or {"prompt_tokens": max(1, prompt_chars // 4),
                                     "completion_tokens": _tokens(content or "")}
        usage = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
        return {"id": f"chatcmpl-{h[:16]}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model"), "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": usage}

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        return app

    async def _start(self) -> None:
        # handler_cancellation: a hung handler stops when its client gives up (as a real server's would)
        self._runner = web.AppRunner(self._app(), access_log=None, handle_signals=False, handler_cancellation=True,
                                    shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def start(self) -> "FakeOpenAI":
        ready = threading.Event()
        errors: list[BaseException] = []

        def run():
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._start())
            except BaseException as e:  # surface bind errors in the caller
                errors.append(e)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=run, name="fake-openai", daemon=True)
        self._thread.start()
        ready.wait(30)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(15)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = self._thread = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--p429", type=float, default=0.0, help="share of requests answered 429 (Retry-After: 1)")
    p.add_argument("--p5xx", type=float, default=0.0, help="share of requests answered 500")
    p.add_argument("--seed", type=int, default=0, help="seeds the random faults")
    args = p.parse_args()
    srv = FakeOpenAI(latency_s=args.latency, port=args.port, seed=args.seed, keep_bodies=False)
    if args.p429:
        srv.add_fault(Fault("status", status=429, retry_after="1", times=None, probability=args.p429))
    if args.p5xx:
        srv.add_fault(Fault("status", status=500, times=None, probability=args.p5xx))
    loop = asyncio.new_event_loop()
    loop.run_until_complete(srv._start())
    print(f"READY {srv.base_url}", flush=True)
    try:
        loop.run_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
