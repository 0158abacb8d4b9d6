"""The local teacher server: the OpenAI wire format (pure) and the real Ray Serve app called with the openai client."""

from __future__ import annotations

import json

import pytest

from speed_ray.generate.config import LocalServerConfig
from speed_ray.serve.protocol import APIError, apply_stop, parse_chat_request

PORT = 8391


def _msgs(text="hi"):
    return [{"role": "user", "content": text}]


def test_parse_chat_request_maps_response_format_and_caps_tokens():
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    p = parse_chat_request({"messages": _msgs(), "max_tokens": 5000, "temperature": 0.5, "seed": 3,
                            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
                           max_new_tokens=64)
    assert p.max_tokens == 64 and p.temperature == 0.5 and p.seed == 3 and p.json_schema == schema
    assert parse_chat_request({"messages": _msgs(), "response_format": {"type": "json_object"}}, 8).json_schema == \
        {"type": "object"}
    assert parse_chat_request({"messages": _msgs(), "response_format": {"type": "text"}}, 8).json_schema is None
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert parse_chat_request({"messages": [{"role": "user", "content": parts}]}, 8).messages[0]["content"] == "ab"


@pytest.mark.parametrize("body,status,param", [
    ({}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": "hi"}, 422, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 422, "messages[0].role"),
    ({"messages": _msgs(), "temperature": "hot"}, 422, "temperature"),
    ({"messages": _msgs(), "temperature": 3}, 422, "temperature"),
    ({"messages": _msgs(), "max_tokens": 0}, 422, "max_tokens"),
    ({"messages": _msgs(), "stream": True}, 400, "stream"),
    ({"messages": _msgs(), "response_format": {"type": "json_schema", "json_schema": {}}}, 422,
     "response_format.json_schema.schema"),
    ({"messages": _msgs(), "n": 100}, 422, "n"),
    ({"messages": _msgs(), "seed": 2 ** 64}, 422, "seed"),
    ({"messages": _msgs(), "top_p": 10 ** 400}, 422, "top_p"),   # was a 500: OverflowError in math.isfinite
    ({"messages": [{"role": {"a": 1}, "content": "x"}]}, 422, "messages[0].role"),
    ({"messages": _msgs(), "response_format": {"type": ["json"]}}, 422, "response_format"),
])
def test_parse_chat_request_rejects_bad_bodies(body, status, param):
    with pytest.raises(APIError) as e:
        parse_chat_request(body, 64)
    assert e.value.status == status and e.value.param == param
    assert set(e.value.body()["error"]) >= {"message", "type", "code"}


def test_apply_stop():
    assert apply_stop("hello END world", "length", ("END",)) == ("hello ", "stop")
    assert apply_stop("hello", "length", ("END",)) == ("hello", "length")


def test_vllm_engine_and_sampling_args_need_no_vllm():
    from speed_ray.generate.server import vllm_engine_args, vllm_sampling_kwargs

    cfg = LocalServerConfig(model="Qwen/Qwen2.5-0.5B-Instruct", engine="vllm", replicas=2, num_gpus=1.0,
                            max_batch_size=32)
    kw = vllm_engine_args(cfg, "/models/qwen")
    assert kw["model"] == "/models/qwen" and kw["served_model_name"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert kw["max_num_seqs"] == 32 and kw["tensor_parallel_size"] == 1
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    rf = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}
    p = parse_chat_request({"messages": _msgs(), "temperature": 0.2, "top_p": 0.5, "max_tokens": 9, "seed": 4, "n": 3,
                            "stop": ["X", ""], "response_format": rf}, 64)
    assert vllm_sampling_kwargs(p) == {"n": 3, "temperature": 0.2, "top_p": 0.5, "max_tokens": 9, "seed": 4,
                                       "stop": ["X"], "structured_outputs": {"json": schema}}
    assert vllm_sampling_kwargs(parse_chat_request({"messages": _msgs()}, 8)) == \
        {"n": 1, "temperature": 1.0, "top_p": 1.0, "max_tokens": 8}


def test_vllm_engine_is_the_default_and_says_it_needs_vllm(monkeypatch):
    """Without vllm the default vLLM engine fails loudly in the replica; nothing silently stands in for it."""
    import functools
    import importlib.util

    from speed_ray.generate import server

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    with pytest.raises(RuntimeError, match="needs vllm"):
        server.VLLMChatEngine("/models/x", {})
    made = []
    monkeypatch.setattr(server, "_build", lambda cfg, factory, digest, aliases: made.append(factory) or "app")
    assert server.build_vllm_app(LocalServerConfig(model="m", engine="vllm", num_gpus=1.0), "/models/m") == "app"
    assert isinstance(made[0], functools.partial) and made[0].func is server.VLLMChatEngine


def test_both_engines_get_the_token_digest(monkeypatch):
    """The vLLM app used to be Ray Serve LLM's, which took no token: --engine vllm served everyone."""
    from speed_ray.generate import server
    from speed_ray.serve.auth import token_digest

    built = []
    monkeypatch.setattr(server, "_build", lambda cfg, factory, digest, aliases: built.append((cfg.engine, digest)))
    monkeypatch.setattr("speed_ray.models.offline.resolve_model", lambda name: "/models/x")
    for engine in ("hf", "vllm"):
        server.build_app(LocalServerConfig(model="m", engine=engine, num_gpus=1.0), "d1g3st")
    monkeypatch.setenv("SPEED_RAY_API_TOKEN", "t0k")
    server.app_builder({"model": "m", "engine": "vllm", "num_gpus": "1"})   # `serve run ...:app_builder`
    assert built == [("hf", "d1g3st"), ("vllm", "d1g3st"), ("vllm", token_digest("t0k"))]


def _fake_vllm(monkeypatch, outputs, raise_in_generate=None, max_model_len=64):
    """Just enough of vllm's modules (names checked against vllm's source: AsyncLLM.from_engine_args/.generate/
    .get_tokenizer/.check_health, SamplingParams, StructuredOutputsParams, RequestOutputKind, TokensPrompt) to run
    VLLMChatEngine on CPU; records what the adapter passes to vLLM."""
    import sys
    import types
    from types import SimpleNamespace as NS

    seen: dict = {}

    class AsyncLLM:
        model_config = NS(max_model_len=max_model_len)

        @classmethod
        def from_engine_args(cls, args):
            seen["engine_args"] = args
            return cls()

        def get_tokenizer(self):
            return NS(apply_chat_template=lambda msgs, add_generation_prompt, tokenize: list(range(3 * len(msgs))))

        async def generate(self, prompt, params, request_id):
            seen.update(prompt=prompt, params=params)
            if raise_in_generate:
                raise raise_in_generate
            yield NS(outputs=outputs, prompt_token_ids=prompt["prompt_token_ids"])

        async def check_health(self):
            seen["health"] = True

    mods = {"vllm": dict(TokensPrompt=dict), "vllm.engine": {}, "vllm.engine.arg_utils": dict(AsyncEngineArgs=dict),
            "vllm.sampling_params": dict(RequestOutputKind=NS(FINAL_ONLY="FINAL_ONLY"),
                                         SamplingParams=lambda **kw: kw, StructuredOutputsParams=lambda **kw: kw),
            "vllm.v1": {}, "vllm.v1.engine": {}, "vllm.v1.engine.async_llm": dict(AsyncLLM=AsyncLLM)}
    for name, attrs in mods.items():
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)
    return seen


def test_vllm_adapter_against_vllm_api_shapes(monkeypatch):
    import asyncio
    from types import SimpleNamespace as NS

    from speed_ray.generate.server import VLLMChatEngine, vllm_engine_args

    cfg = LocalServerConfig(model="m", engine="vllm", num_gpus=1.0)
    outs = [NS(index=1, text="b", token_ids=[5, 6], finish_reason="length"),
            NS(index=0, text="a", token_ids=[7], finish_reason="stop")]
    seen = _fake_vllm(monkeypatch, outs)
    eng = VLLMChatEngine("/models/m", vllm_engine_args(cfg, "/models/m"))
    assert seen["engine_args"]["model"] == "/models/m" and seen["engine_args"]["served_model_name"] == "m"
    schema = {"type": "object"}
    p = parse_chat_request({"messages": _msgs(), "n": 2, "seed": 3, "stop": "Z", "max_tokens": 500,
                            "response_format": {"type": "json_object"}}, 1000)
    out = asyncio.run(eng.chat(p))
    assert out.choices == [("a", "stop"), ("b", "length")] and out.prompt_tokens == 3 and out.completion_tokens == 3
    assert seen["prompt"] == {"prompt_token_ids": [0, 1, 2]}
    assert seen["params"] == {"n": 2, "temperature": 1.0, "top_p": 1.0, "max_tokens": 64 - 3, "seed": 3,
                              "stop": ["Z"], "output_kind": "FINAL_ONLY", "structured_outputs": {"json": schema}}
    asyncio.run(eng.check_health())
    assert seen["health"]
    # vLLM's validation errors are the caller's 400; a prompt past the context never reaches vLLM.
    _fake_vllm(monkeypatch, outs, raise_in_generate=ValueError("bad schema"))
    with pytest.raises(APIError) as e:
        asyncio.run(VLLMChatEngine("/models/m", {}).chat(p))
    assert e.value.status == 400 and "bad schema" in e.value.message
    seen = _fake_vllm(monkeypatch, outs, max_model_len=3)
    with pytest.raises(APIError) as e:
        asyncio.run(VLLMChatEngine("/models/m", {}).chat(p))
    assert e.value.status == 400 and "max_model_len" in e.value.message and "params" not in seen
    _fake_vllm(monkeypatch, [NS(index=0, text="", token_ids=[], finish_reason="abort")])
    with pytest.raises(RuntimeError, match="aborted"):
        asyncio.run(VLLMChatEngine("/models/m", {}).chat(p))


def test_refuses_public_bind_without_token():
    from speed_ray.config import ConfigError
    from speed_ray.generate.server import start

    with pytest.raises(ConfigError, match="refusing to bind 0.0.0.0"):
        start(LocalServerConfig(model="offline:tiny-llama", host="0.0.0.0", port=PORT))
    with pytest.raises(ConfigError, match="refusing to bind 0.0.0.0"):
        start(LocalServerConfig(model="offline:tiny-llama", engine="vllm", host="0.0.0.0", port=PORT))


def test_refuses_a_public_serve_already_running_without_token(monkeypatch):
    """Serve has one HTTP address per cluster: a loopback config joining a Serve on 0.0.0.0 is public."""
    from speed_ray.config import ConfigError
    from speed_ray.generate import server
    from speed_ray.serve import lifecycle

    monkeypatch.setattr(lifecycle, "ensure_serve", lambda host, port: ("0.0.0.0", 8000, False))
    monkeypatch.setattr(server, "build_app", lambda *a, **k: pytest.fail("must refuse before deploying"))
    monkeypatch.setattr(server, "_STATE", {})
    with pytest.raises(ConfigError, match="refusing to bind 0.0.0.0"):
        server.start(LocalServerConfig(model="offline:tiny-llama", port=PORT))


@pytest.fixture(scope="module")
def server(ray_local, tiny_llama):
    from ray import serve

    from speed_ray.generate.server import start_local_server, stop_local_server
    from speed_ray.run_config import RunSection

    cfg = LocalServerConfig(model="offline:tiny-llama", port=PORT, num_cpus=0.5, max_batch_size=4,
                            max_new_tokens=24)
    url = start_local_server(cfg, RunSection())
    assert start_local_server(cfg, RunSection()) == url   # idempotent
    yield url
    stop_local_server()
    serve.shutdown()   # leave the session's Ray without Serve for other tests


def test_chat_with_openai_client(server):
    import openai

    client = openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["offline:tiny-llama"]
    r = client.chat.completions.create(model="offline:tiny-llama", messages=_msgs("Say something."), max_tokens=8,
                                       temperature=1.0, seed=1)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and len(r.choices) == 1
    assert r.choices[0].finish_reason in ("stop", "length") and isinstance(r.choices[0].message.content, str)
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_json_schema_response_parses(server):
    import openai

    schema = {"type": "object", "properties": {"q": {"type": "string", "maxLength": 6}}, "required": ["q"],
              "additionalProperties": False}
    client = openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=120)
    r = client.chat.completions.create(
        model="offline:tiny-llama", messages=_msgs("JSON please"), max_tokens=24, n=2, temperature=1.0,
        response_format={"type": "json_schema", "json_schema": {"name": "row", "schema": schema}})
    assert len(r.choices) == 2
    for c in r.choices:
        if c.finish_reason == "stop":   # a random tiny model may run out of tokens; a finished one must be valid
            # strict=False: the tiny tokenizer's byte tokens can put raw control characters inside strings, which
            # xgrammar lets through for it (SmolLM2's tokenizer gives strict JSON); the schema's shape is what we check.
            assert set(json.loads(c.message.content, strict=False)) == {"q"}


def test_bad_requests_get_openai_errors(server):
    import httpx
    import openai

    client = openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model="offline:tiny-llama", messages=_msgs(), temperature=9)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as e:   # model routing: only the served model answers
        client.chat.completions.create(model="gpt-4o", messages=_msgs(), max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    r = httpx.post(f"{server}/chat/completions", content=b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"
    r = httpx.post(f"{server}/embeddings", json={"input": "a"}, timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.post(f"{server}/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{server}/chat/completions", json=[1, 2], timeout=30)
    assert r.status_code == 422 and "message" in r.json()["error"]
    r = httpx.get(f"{server}/nope", timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    # The replica survived all of that; a request naming no model gets the served one.
    ok = httpx.post(f"{server}/chat/completions", json={"messages": _msgs(), "max_tokens": 2}, timeout=60).json()
    assert ok["model"] == "offline:tiny-llama" and ok["usage"]["completion_tokens"] > 0
    ok = client.chat.completions.create(model="offline:tiny-llama", messages=_msgs(), max_tokens=2)
    assert ok.usage.completion_tokens > 0


def test_fuzz_chat_without_token(server):
    """tests/fuzz_openai.py against this module's server (no token): never a 5xx; see tests/test_servers_fuzz.py."""
    from fuzz_openai import run_fuzz  # tests/ is on sys.path under pytest

    run_fuzz(server, "chat", "offline:tiny-llama", app_name="speed-ray-teacher", seed=21)
