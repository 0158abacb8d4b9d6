"""Fuzzing both servers over HTTP (tests/fuzz_openai.py): never a 5xx, always an OpenAI error body, the replica
keeps serving. The four combinations are each fuzzed once:

    chat server (HF engine), no token     tests/test_llm_server.py::test_fuzz_chat_without_token
    embeddings server, with a token       tests/test_serve_embeddings.py::test_fuzz_embeddings_with_token
    chat server (HF engine), with a token here
    embeddings server, no token           here
    (and the --engine vllm app with a token, in tests/test_rehearsal_llm_server.py)

What fuzzing found, each now a 4xx decided in request parsing (speed_ray/serve/protocol.py): a lone UTF-16
surrogate ("\\ud800" as a JSON escape) in /v1/embeddings `input` was a 500 (the tokenizer's TypeError); a number
past float range (10**400) in top_p/temperature was a 500 (OverflowError); an integer of more than 4300 digits was a
500 (json's ValueError); an unhashable `input_type` ([...] or {...}) was a 500 (TypeError in a dict lookup).
"""

from __future__ import annotations

import pytest

from fuzz_openai import MAX_INPUT_CHARS, MAX_INPUTS, run_fuzz  # tests/ is on sys.path under pytest

PORT = 8394
TOKEN = "fuzz-token-0123456789"
CHAT_MODEL = "offline:tiny-llama"
EMB_MODEL = "fuzz-embedder"


@pytest.fixture(scope="module")
def servers(ray_local, tiny_llama, minilm):
    """{kind: (app name, base URL)}: the chat server with a token and the embeddings server without one, deployed
    together on one local Serve (127.0.0.1)."""
    from ray import serve

    from speed_ray.generate.config import LocalServerConfig
    from speed_ray.generate.server import build_app
    from speed_ray.serve.app import build_embeddings_app
    from speed_ray.serve.auth import token_digest
    from speed_ray.serve.config import ServeConfig
    from speed_ray.serve.lifecycle import ensure_serve, wait_healthy

    chat_cfg = LocalServerConfig(model=CHAT_MODEL, port=PORT, num_cpus=0.25, torch_threads=1, max_batch_size=4,
                                 max_new_tokens=4)
    emb_cfg = ServeConfig(port=PORT, num_cpus=0.25, torch_threads=1, max_inputs=MAX_INPUTS,
                          max_input_chars=MAX_INPUT_CHARS, model_name=EMB_MODEL)
    host, port, _ = ensure_serve("127.0.0.1", PORT)
    assert host == "127.0.0.1"
    apps = {"chat": ("fuzz-chat-token", build_app(chat_cfg, token_digest(TOKEN))),
            "emb": ("fuzz-emb-open", build_embeddings_app(minilm, emb_cfg, EMB_MODEL, None))}
    serve.run_many([serve.RunTarget(app, name=name, route_prefix=f"/{name}") for name, app in apps.values()])
    urls = {kind: (name, f"http://127.0.0.1:{port}/{name}/v1") for kind, (name, _) in apps.items()}
    try:
        wait_healthy(urls["chat"][1], 300, {"Authorization": f"Bearer {TOKEN}"})
        wait_healthy(urls["emb"][1], 300)
        yield urls
    finally:
        for name, _ in urls.values():
            serve.delete(name)
        serve.shutdown()   # leave the session's Ray without Serve for other tests


def test_fuzz_chat_with_token(servers):
    name, url = servers["chat"]
    run_fuzz(url, "chat", CHAT_MODEL, token=TOKEN, app_name=name, seed=11)


def test_fuzz_embeddings_without_token(servers):
    name, url = servers["emb"]
    run_fuzz(url, "emb", EMB_MODEL, app_name=name, seed=12)
