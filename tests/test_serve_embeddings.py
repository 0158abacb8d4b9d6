"""Embeddings serving: the pure request/response core, auth, run-dir lookup, and the real Serve app via openai."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import pytest

from speed_ray.config import ConfigError
from speed_ray.serve.auth import authorized, check_bind, load_token, token_digest
from speed_ray.serve.config import ServeConfig
from speed_ray.serve.protocol import (APIError, EmbedParams, encode_vector, parse_embeddings_request, query_prefix,
                                      truncate_normalize)

PORT = 8392
TOKEN = "test-token-0123456789"


def _parse(body, max_inputs=4, max_chars=50, dim=8):
    return parse_embeddings_request(body, max_inputs, max_chars, dim)


def test_parse_accepts_string_and_list():
    assert _parse({"input": "a"}).texts == ["a"]
    p = _parse({"input": ["a", "b"], "encoding_format": "base64", "dimensions": 4, "input_type": "query"})
    assert p.texts == ["a", "b"] and p.encoding_format == "base64" and p.dimensions == 4 and p.input_type == "query"
    assert _parse({"input": "a", "instruction": "find it"}).input_type == "query"   # an instruction implies a query


@pytest.mark.parametrize("body,status", [
    ({}, 400), ({"input": []}, 400), ({"input": "   "}, 400), ({"input": ["a", ""]}, 400),
    ({"input": ["a"] * 5}, 413), ({"input": "x" * 51}, 413),
    ({"input": 3}, 422), ({"input": [[1, 2]]}, 422), ({"input": ["a", None]}, 422), ({"input": {"a": 1}}, 422),
    ({"input": "a", "encoding_format": "int8"}, 422), ({"input": "a", "dimensions": 9}, 400),
    ({"input": "a", "dimensions": 0}, 422), ({"input": "a", "dimensions": "4"}, 422),
    ({"input": "a", "input_type": "banana"}, 422), ({"input": "a", "model": 5}, 422),
    ({"input": "a", "input_type": ["query"]}, 422), ({"input": "a", "input_type": {"q": 1}}, 422),
    ({"input": "a", "encoding_format": {"f": 1}}, 422), ({"input": "a", "encoding_format": []}, 422),
])
def test_parse_rejects_bad_input(body, status):
    with pytest.raises(APIError) as e:
        _parse(body)
    assert e.value.status == status
    assert e.value.body()["error"]["message"] and e.value.body()["error"]["type"] == "invalid_request_error"


def test_parse_json_errors():
    from speed_ray.serve.protocol import parse_json

    for raw, status in ((b"{", 400), (b"\xff\xfe", 400), (b"[" * 100000, 400), (b'"s"', 422),
                        (b'{"n": ' + b"9" * 5000 + b"}", 400)):   # an int past Python's 4300-digit limit
        with pytest.raises(APIError) as e:
            parse_json(raw)
        assert e.value.status == status


@pytest.mark.parametrize("raw,param", [
    (b'{"input": "\\ud800"}', "input"),                         # the fuzzer's find: a 500 from the tokenizer
    (b'{"input": ["ok", "a\\udfffb"]}', "input[1]"),
    (b'{"input": "a", "instruction": "\\udc00"}', "instruction"),
    (b'{"input": "a", "model": "m\\ud83d"}', "model"),            # half of a surrogate pair
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages[0].content[0].text"),
    (b'{"response_format": {"json_schema": {"schema": {"properties": {"\\ud800": {}}}}}}',
     "response_format.json_schema.schema.properties.\\ud800"),
])
def test_lone_surrogates_are_a_400_naming_the_field(raw, param):
    from speed_ray.serve.protocol import parse_json

    with pytest.raises(APIError) as e:
        parse_json(raw)
    assert e.value.status == 400 and e.value.param == param and e.value.code == "invalid_unicode"
    json.dumps(e.value.body()).encode("utf-8")   # the error body itself is valid UTF-8
    # A real surrogate pair (an astral character) is valid Unicode and passes.
    assert parse_json(b'{"input": "\\ud83d\\ude00 \\u0000"}')["input"] == "\U0001F600 \x00"


def test_error_messages_are_bounded_whatever_the_value():
    deep: dict = {}
    node = deep
    for _ in range(800):
        node["a"] = {}
        node = node["a"]
    for bad in (deep, ["x" * 100000] * 3):
        with pytest.raises(APIError) as e:
            _parse({"input": "a", "input_type": bad})
        assert len(e.value.message) < 400


def test_model_routing():
    from speed_ray.serve.protocol import route_model

    served = ("speed-embedder", "alias")
    assert route_model({}, served) == "speed-embedder" and route_model({"model": ""}, served) == "speed-embedder"
    assert route_model({"model": "alias"}, served) == "alias"
    with pytest.raises(APIError) as e:
        route_model({"model": "text-embedding-3-small"}, served)
    assert e.value.status == 404 and e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(APIError) as e:
        route_model({"model": ["x"]}, served)
    assert e.value.status == 422


def test_query_prefix_uses_the_models_prompts():
    prompts = {"query": "Instruct: retrieve\nQuery: "}
    assert query_prefix(EmbedParams(["a"], input_type="query"), prompts) == prompts["query"]
    assert query_prefix(EmbedParams(["a"], input_type="document"), prompts) == ""
    assert query_prefix(EmbedParams(["a"], input_type="query", instruction="Find X"), prompts) == \
        "Instruct: Find X\nQuery: "
    assert query_prefix(EmbedParams(["a"], input_type="query"), {}) == ""


def test_truncate_normalize_and_base64():
    v = np.array([[3.0, 4.0, 12.0]], np.float32)
    t = truncate_normalize(v, 2)
    assert t.shape == (1, 2) and np.allclose(t, [[0.6, 0.8]])
    assert truncate_normalize(v, None) is not None and truncate_normalize(v, None).shape == (1, 3)
    raw = base64.b64decode(encode_vector(t[0], "base64"))
    assert np.allclose(np.frombuffer(raw, "<f4"), t[0])


def test_auth(tmp_path, monkeypatch):
    d = token_digest("s3cret")
    assert authorized("Bearer s3cret", d) and authorized("bearer  s3cret ", d)
    assert not authorized(None, d) and not authorized("Bearer nope", d) and not authorized("s3cret", d)
    assert authorized(None, None)
    f = tmp_path / "tok"
    f.write_text("from-file\n")
    monkeypatch.setenv("MY_TOK", "from-env")
    assert load_token("MY_TOK", str(f)) == "from-file" and load_token("MY_TOK", None) == "from-env"
    assert load_token("UNSET_TOKEN_VAR_XYZ", None) is None
    with pytest.raises(ConfigError, match="does not exist"):
        load_token("MY_TOK", str(tmp_path / "missing"))
    check_bind("127.0.0.1", False, False)
    check_bind("0.0.0.0", True, False)
    check_bind("0.0.0.0", False, True)
    with pytest.raises(ConfigError, match="refusing to bind"):
        check_bind("0.0.0.0", False, False)


def test_deployment_options():
    from speed_ray.serve.app import deployment_options

    fixed = deployment_options(ServeConfig(replicas_min=2, replicas_max=2, num_cpus=0.25))
    assert fixed["num_replicas"] == 2 and fixed["ray_actor_options"] == {"num_cpus": 0.25, "num_gpus": 0.0}
    auto = deployment_options(ServeConfig(replicas_min=1, replicas_max=4, num_gpus=1.0))
    assert auto["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in auto


def test_find_run_model(tmp_path):
    from speed_ray.serve.app import find_run_model, resolve_served_model

    assert find_run_model(str(tmp_path)) is None
    (tmp_path / "stages" / "train_embedder" / "aaa").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no completed train_embedder"):
        find_run_model(str(tmp_path))
    for fp, t in (("old", 1.0), ("new", 2.0)):
        d = tmp_path / "stages" / "train_embedder" / fp
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"model_path": f"/models/{fp}", "ended_at": t}))
    assert find_run_model(str(tmp_path)) == "/models/new"
    assert resolve_served_model(str(tmp_path)) == "/models/new"


@pytest.fixture(scope="module")
def prompted_minilm(minilm, tmp_path_factory) -> str:
    """all-MiniLM-L6-v2 with a saved "query" prompt, the way a trained SPEED embedder is saved."""
    d = tmp_path_factory.mktemp("minilm-prompted")
    for p in Path(minilm).iterdir():
        if p.name != "config_sentence_transformers.json":
            os.symlink(p, d / p.name)
    cfg_file = Path(minilm) / "config_sentence_transformers.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    cfg["prompts"] = {"query": "Instruct: Given a question, retrieve passages that answer it\nQuery: ", "document": ""}
    (d / "config_sentence_transformers.json").write_text(json.dumps(cfg))
    return str(d)


@pytest.fixture(scope="module")
def server(ray_local, prompted_minilm):
    from ray import serve

    from speed_ray.serve.app import APP_NAME, start

    os.environ["SPEED_RAY_TEST_TOKEN"] = TOKEN
    cfg = ServeConfig(port=PORT, num_cpus=0.5, max_inputs=8, max_input_chars=200, token_env="SPEED_RAY_TEST_TOKEN",
                      model_name="speed-embedder", torch_threads=1)
    try:
        yield start(prompted_minilm, cfg)[0]
    finally:
        os.environ.pop("SPEED_RAY_TEST_TOKEN", None)
        serve.delete(APP_NAME)
        serve.shutdown()   # leave the session's Ray without Serve for other tests


@pytest.fixture(scope="module")
def local_model(prompted_minilm):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(prompted_minilm, device="cpu")


def test_openai_client_embeddings(server, local_model):
    import openai

    client = openai.OpenAI(base_url=server, api_key=TOKEN, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["speed-embedder"]
    texts = ["the cat sat on the mat", "Ray Serve batches requests"]
    want = local_model.encode(texts, normalize_embeddings=True)
    r = client.embeddings.create(model="speed-embedder", input=texts)   # the client asks for base64 and decodes it
    got = np.array([d.embedding for d in r.data])
    assert got.shape == (2, 384) and np.allclose(got, want, atol=1e-5)
    assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens > 0
    r = client.embeddings.create(model="speed-embedder", input=texts[0], encoding_format="float", dimensions=64)
    v = np.array(r.data[0].embedding)
    assert v.shape == (64,) and np.isclose(np.linalg.norm(v), 1.0, atol=1e-5)
    assert np.allclose(v, want[0][:64] / np.linalg.norm(want[0][:64]), atol=1e-5)


def test_query_embeddings_apply_the_prompt(server, local_model):
    import openai

    client = openai.OpenAI(base_url=server, api_key=TOKEN, max_retries=0, timeout=120)
    q = "how do cats sit"
    r = client.embeddings.create(model="speed-embedder", input=[q], extra_body={"input_type": "query"})
    want = local_model.encode([q], prompt_name="query", normalize_embeddings=True)[0]
    assert np.allclose(r.data[0].embedding, want, atol=1e-5)
    plain = local_model.encode([q], normalize_embeddings=True)[0]
    assert not np.allclose(want, plain, atol=1e-3)
    r = client.embeddings.create(model="speed-embedder", input=[q], extra_body={"instruction": "Find cat facts"})
    want = local_model.encode([q], prompt="Instruct: Find cat facts\nQuery: ", normalize_embeddings=True)[0]
    assert np.allclose(r.data[0].embedding, want, atol=1e-5)


def test_auth_required(server):
    import httpx
    import openai

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server, api_key="wrong", max_retries=0).embeddings.create(model="speed-embedder",
                                                                                          input="a")
    r = httpx.post(f"{server}/embeddings", json={"input": "a"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/models", timeout=30).status_code == 401
    assert httpx.get(f"{server.removesuffix('/v1')}/openapi.json", timeout=30).status_code == 404


def test_unknown_model_is_a_404(server):
    import openai

    client = openai.OpenAI(base_url=server, api_key=TOKEN, max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="text-embedding-3-small", input="a")
    assert e.value.body["code"] == "model_not_found"


def test_bad_input_gets_4xx_and_the_replica_survives(server):
    import httpx

    h = {"Authorization": f"Bearer {TOKEN}"}
    cases = [(b"{nope", 400), (b"[1]", 422), (json.dumps({"input": []}).encode(), 400),
             (json.dumps({"input": ["a"] * 9}).encode(), 413), (json.dumps({"input": "x" * 201}).encode(), 413),
             (json.dumps({"input": [1, 2, 3]}).encode(), 422), (json.dumps({"input": "a", "dimensions": 999}).encode(),
                                                                400),
             (b'{"input": "\\ud800"}', 400)]   # was a 500: the tokenizer's TypeError on a lone surrogate
    with httpx.Client(timeout=60, headers=h) as c:
        for body, status in cases:
            r = c.post(f"{server}/embeddings", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == status, (body[:40], r.text)
            assert set(r.json()["error"]) >= {"message", "type", "code"}
        r = c.post(f"{server}/embeddings", json={"input": ["still alive"], "encoding_format": "float"})
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384


def test_start_refuses_a_public_serve_already_running_without_token(monkeypatch):
    """Serve has one HTTP address per cluster: a loopback config joining a Serve on 0.0.0.0 is public."""
    from speed_ray import raylocal
    from speed_ray.serve import app, lifecycle

    monkeypatch.delenv("SPEED_RAY_API_TOKEN", raising=False)
    monkeypatch.setattr(raylocal, "ensure_ray", lambda *a, **k: None)
    monkeypatch.setattr(lifecycle, "ensure_serve", lambda host, port: ("0.0.0.0", 8000, False))
    monkeypatch.setattr(app, "build_embeddings_app", lambda *a, **k: pytest.fail("must refuse before deploying"))
    monkeypatch.setattr(app, "resolve_served_model", lambda m: m)
    with pytest.raises(ConfigError, match="refusing to bind 0.0.0.0"):
        app.start("some-model", ServeConfig(port=PORT + 2))


def test_serve_main_refuses_public_bind_without_token(monkeypatch):
    import argparse

    from speed_ray.serve.cli import serve_main

    monkeypatch.delenv("SPEED_RAY_API_TOKEN", raising=False)
    args = argparse.Namespace(model="offline:minilm", config=None, host="0.0.0.0", port=PORT + 1,
                              allow_unauthenticated_public=False, overrides=[])
    with pytest.raises(ConfigError, match="refusing to bind 0.0.0.0"):
        serve_main(args)


def test_app_builder_for_serve_run(minilm):
    from ray.serve import Application

    from speed_ray.serve.cli import app_builder

    app = app_builder({"model": minilm, "max_inputs": "4", "serve.model_name": "mine"})
    assert isinstance(app, Application)
    with pytest.raises(ConfigError, match="max_inputs"):
        app_builder({"model": minilm, "max_inputs": "0"})


def test_fuzz_embeddings_with_token(server):
    """tests/fuzz_openai.py against this module's server (a token): never a 5xx; see tests/test_servers_fuzz.py."""
    from fuzz_openai import MAX_INPUT_CHARS, MAX_INPUTS, run_fuzz  # tests/ is on sys.path under pytest

    assert (MAX_INPUTS, MAX_INPUT_CHARS) == (8, 200)   # the fixture's limits, which the fuzz cases assume
    run_fuzz(server, "emb", "speed-embedder", token=TOKEN, app_name="speed-ray-embeddings", seed=22)
