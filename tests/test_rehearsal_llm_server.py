"""Rehearsal of `speed-ray llm-server MODEL --engine vllm` on CPU, up to the GPU boundary.

The app is built exactly as server_main builds it for --engine vllm (our OpenAI ingress, auth, model routing) and
deployed on a real local Ray Serve; only the vLLM engine is replaced, at the engine boundary, by
tests/vllm_standin.CPUStandInVLLMEngine, passed explicitly. Before the fix, --engine vllm served Ray Serve LLM's own
OpenAI app, which took no token: with a token set and a public bind, anyone got completions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

pytestmark = pytest.mark.rehearsal

PORT = 8393
TOKEN = "rehearsal-token-0123456789"
MODEL = "offline:tiny-llama"
SCHEMA = {"type": "object", "properties": {"query": {"type": "string"}, "score": {"type": "integer"}},
          "required": ["query"], "additionalProperties": False}


def _cfg(**kw):
    """The config `speed-ray llm-server offline:tiny-llama --engine vllm` builds, on CPU for the rehearsal."""
    from speed_ray.generate.server import server_config

    cfg = server_config(argparse.Namespace(model=MODEL, engine="vllm", host="127.0.0.1", port=PORT))
    assert cfg.engine == "vllm" and cfg.num_gpus == 1.0
    return dataclasses.replace(cfg, num_gpus=0.0, num_cpus=0.25, max_new_tokens=64, **kw)


@pytest.fixture(scope="module")
def vllm_server(ray_local, tiny_llama):
    import ray
    from ray import serve

    import vllm_standin
    from speed_ray.generate.server import start

    ray.cloudpickle.register_pickle_by_value(vllm_standin)   # tests/ is not importable in the replicas
    name = "speed-ray-rehearsal-vllm"
    try:
        yield start(_cfg(), TOKEN, app_name=name, vllm_engine_class=vllm_standin.CPUStandInVLLMEngine)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(vllm_standin)
        serve.delete(name)
        serve.shutdown()   # leave the session's Ray without Serve for other tests


def _client(url, key=TOKEN):
    import openai

    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def test_token_is_required(vllm_server):
    import httpx
    import openai

    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic x"}):
        for method, path, kw in (("POST", "/chat/completions", {"json": body}), ("GET", "/models", {})):
            r = httpx.request(method, f"{vllm_server}{path}", headers=headers, timeout=30, **kw)
            assert r.status_code == 401, (headers, path, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        _client(vllm_server, "wrong").chat.completions.create(**body)
    r = httpx.post(f"{vllm_server}/chat/completions", json=body, timeout=30,
                   headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    assert httpx.get(f"{vllm_server.removesuffix('/v1')}/health", timeout=30).status_code == 200


def test_public_bind_without_token_is_refused(ray_local):
    import vllm_standin
    from speed_ray.config import ConfigError
    from speed_ray.generate.server import start

    with pytest.raises(ConfigError, match="refusing to bind 0.0.0.0"):
        start(_cfg(host="0.0.0.0"), None, app_name="never-deployed",
              vllm_engine_class=vllm_standin.CPUStandInVLLMEngine)


def test_model_routing(vllm_server):
    import httpx
    import openai

    client = _client(vllm_server)
    assert [m.id for m in client.models.list().data] == [MODEL]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    err = e.value.body
    assert err["code"] == "model_not_found" and err["param"] == "model" and err["type"] == "invalid_request_error"
    assert "gpt-4o" in err["message"]
    r = httpx.post(f"{vllm_server}/chat/completions", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30,
                   json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    ok = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert ok.model == MODEL and json.loads(ok.choices[0].message.content)["engine"] == "cpu-stand-in-for-vllm"
    r = httpx.post(f"{vllm_server}/embeddings", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30,
                   json={"model": MODEL, "input": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_the_engine_gets_what_the_ingress_parsed(vllm_server):
    from speed_ray.generate.server import vllm_engine_args
    from speed_ray.models.offline import resolve_model

    r = _client(vllm_server).chat.completions.create(
        model=MODEL, temperature=0.3, top_p=0.9, max_tokens=5000, seed=11, n=2, stop=["END", ""],
        messages=[{"role": "developer", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Write "}, {"type": "text", "text": "JSON"}]}],
        response_format={"type": "json_schema", "json_schema": {"name": "row", "schema": SCHEMA}})
    assert len(r.choices) == 2 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    got = json.loads(r.choices[0].message.content)
    assert got["sampling"] == {"n": 2, "temperature": 0.3, "top_p": 0.9, "max_tokens": 64,   # capped: max_new_tokens
                               "seed": 11, "stop": ["END"], "structured_outputs": {"json": SCHEMA}}
    assert got["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write JSON"}]
    source = resolve_model(MODEL)
    assert got["model_source"] == source and got["engine_args"] == vllm_engine_args(_cfg(), source)
    r = _client(vllm_server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                     response_format={"type": "json_object"})
    assert json.loads(r.choices[0].message.content)["sampling"]["structured_outputs"] == {"json": {"type": "object"}}


def test_fuzz_the_vllm_app(vllm_server):
    """The --engine vllm app's ingress under the fuzzer (tests/fuzz_openai.py), with its token: never a 5xx."""
    from fuzz_openai import run_fuzz  # tests/ is on sys.path under pytest

    run_fuzz(vllm_server, "chat", MODEL, token=TOKEN, app_name="speed-ray-rehearsal-vllm", seed=31)
