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
])
def test_parse_chat_request_rejects_bad_bodies(body, status, param):
    with pytest.raises(APIError) as e:
        parse_chat_request(body, 64)
    assert e.value.status == status and e.value.param == param
    assert set(e.value.body()["error"]) >= {"message", "type", "code"}


def test_apply_stop():
    assert apply_stop("hello END world", "length", ("END",)) == ("hello ", "stop")
    assert apply_stop("hello", "length", ("END",)) == ("hello", "length")


def test_vllm_config_building_needs_no_vllm():
    from speed_ray.generate.server import vllm_llm_config

    cfg = LocalServerConfig(model="Qwen/Qwen2.5-0.5B-Instruct", engine="vllm", replicas=2, num_gpus=1.0)
    kw = vllm_llm_config(cfg, "/models/qwen")
    assert kw["model_loading_config"] == {"model_id": "Qwen/Qwen2.5-0.5B-Instruct", "model_source": "/models/qwen"}
    assert kw["deployment_config"]["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 2}


def test_refuses_public_bind_without_token():
    from speed_ray.config import ConfigError
    from speed_ray.generate.server import start

    with pytest.raises(ConfigError, match="refusing to bind 0.0.0.0"):
        start(LocalServerConfig(model="offline:tiny-llama", host="0.0.0.0", port=PORT))


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
        client.chat.completions.create(model="m", messages=_msgs(), temperature=9)
    assert e.value.body["param"] == "temperature"
    r = httpx.post(f"{server}/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{server}/chat/completions", json=[1, 2], timeout=30)
    assert r.status_code == 422 and "message" in r.json()["error"]
    r = httpx.get(f"{server}/nope", timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    # The replica survived all of that.
    ok = client.chat.completions.create(model="m", messages=_msgs(), max_tokens=2)
    assert ok.usage.completion_tokens > 0
