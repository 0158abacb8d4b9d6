"""Fuzzing the OpenAI-compatible servers over HTTP (a helper, like fake_openai.py; tests/ is on sys.path).

Whatever a client sends, the answer must be a 4xx with an OpenAI error body (or a 200 for a request that happens to
be valid), never a 5xx, and the replica keeps serving without being restarted. Traffic: a hand-written list of known
nasty requests plus seeded random mutations of a valid body, to 127.0.0.1 only.

Embeddings servers under fuzz must use max_inputs=MAX_INPUTS and max_input_chars=MAX_INPUT_CHARS.
"""

from __future__ import annotations

import copy
import json
import random

MAX_INPUTS = 8
MAX_INPUT_CHARS = 200
SURROGATES = ["\ud800", "\udfff", "a\udc00b", "\ud83d", "x" * 50 + "\udbff"]
NASTY_STRINGS = SURROGATES + ["", " ", "\x00", "a\x00b", "\u2028\u202e", "\U0001F600" * 50, "x" * 20000,
                              "{{ 7*7 }}{% raw %}", "</s><|im_start|>system", "%s%n%x", "\\", "\ufeff"]
GARBAGE = [None, True, False, 0, -1, 1.5, -1e308, 1e308, 10 ** 30, -(10 ** 30), 2 ** 63, [], {}, [[]], [None],
           [1, 2], {"a": {"b": [None, {}]}}, [[[[[[["deep"]]]]]]], "x", ["x"], {"type": "text"}]
NUMBERS_AS_TEXT = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-0", b"9" * 5000, b"1" + b"0" * 400]


def base_body(kind: str, model: str) -> dict:
    """A valid request (the embeddings one within MAX_INPUTS / MAX_INPUT_CHARS)."""
    if kind == "chat":
        return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0.0}
    return {"model": model, "input": ["a cat"], "encoding_format": "float"}


# Field paths the random mutator aims at (a list index as int); the servers read all of these.
CHAT_PATHS = [("model",), ("messages",), ("messages", 0), ("messages", 0, "role"), ("messages", 0, "content"),
              ("temperature",), ("top_p",), ("max_tokens",), ("max_completion_tokens",), ("n",), ("seed",),
              ("stop",), ("response_format",), ("stream",), ("tools",), ("user",)]
EMB_PATHS = [("model",), ("input",), ("input", 0), ("encoding_format",), ("dimensions",), ("input_type",),
             ("instruction",), ("user",)]


def _set(body: dict, path: tuple, value) -> None:
    node = body
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value


def hand_written(kind: str, model: str) -> list[tuple[str, bytes, dict]]:
    """(label, raw body, extra headers): requests every server must refuse with a 4xx."""
    base = base_body(kind, model)
    dumps = lambda b: json.dumps(b).encode()   # noqa: E731  (ensure_ascii: surrogates travel as \\ud800 escapes)
    cases = [("empty", b"", {}), ("space", b" ", {}), ("open brace", b"{", {}), ("null", b"null", {}),
             ("list", b"[]", {}), ("string", b'"s"', {}), ("number", b"123", {}), ("true", b"true", {}),
             ("empty object", b"{}", {}), ("deep list", b"[" * 5000, {}), ("deep object", b'{"a":' * 3000, {}),
             ("deep valid", b"[" * 900 + b"]" * 900, {}), ("bad utf-8", b"\xff\xfe\xfd", {}),
             ("utf-16 body", json.dumps(base).encode("utf-16"), {}),
             ("nul bytes", b"\x00" * 64, {}), ("trailing junk", dumps(base) + b"}", {}),
             ("form body", b"messages=hi&input=hi", {"Content-Type": "application/x-www-form-urlencoded"}),
             ("text body", b"hello", {"Content-Type": "text/plain"}),
             ("surrogate encoded in utf-8", b'{"model": "\xed\xa0\x80", "input": "a", "messages": []}', {}),
             ("lone surrogate as a key", b'{"\\ud800": 1, ' + dumps(base)[1:], {}),
             ("unknown model", dumps({**base, "model": "gpt-4o"}), {}),
             ("model as list", dumps({**base, "model": ["x"]}), {})]
    for raw in NUMBERS_AS_TEXT:   # numbers json accepts that no field does
        field = "top_p" if kind == "chat" else "dimensions"
        cases.append((f"{field}={raw[:12]!r}", dumps(base)[:-1] + b', "' + field.encode() + b'": ' + raw + b"}", {}))
    paths = CHAT_PATHS if kind == "chat" else EMB_PATHS
    text_paths = [p for p in paths if p[-1] in ("model", "content", "role", "input", "instruction", "encoding_format",
                                                "input_type", 0)]
    for s in SURROGATES[:3]:   # lone surrogates in every string field
        for path in text_paths:
            body = json.loads(json.dumps(base))
            _set(body, path, s)
            cases.append((f"surrogate in {path}", dumps(body), {}))
    if kind == "chat":
        msg = lambda content: {**base, "messages": [{"role": "user", "content": content}]}   # noqa: E731
        cases += [("surrogate in stop", dumps({**base, "stop": ["ok", "\ud800"]}), {}),
                  ("surrogate in a text part", dumps(msg([{"type": "text", "text": "\udfff"}])), {}),
                  ("surrogate in a schema", dumps({**base, "response_format": {
                      "type": "json_schema", "json_schema": {"name": "\ud800", "schema": {
                          "type": "object", "properties": {"k\ud800": {"type": "string"}}}}}}), {}),
                  ("surrogate in an ignored field", dumps({**base, "user": "\ud800", "metadata": {"\udc00": 1}}), {}),
                  ("no messages", dumps({**base, "messages": []}), {}), ("null messages", dumps(msg(None)), {}),
                  ("image part", dumps(msg([{"type": "image_url", "image_url": {"url": "x"}}])), {}),
                  ("role wizard", dumps({**base, "messages": [{"role": "wizard", "content": "x"}]}), {}),
                  ("role list", dumps({**base, "messages": [{"role": ["user"], "content": "x"}]}), {}),
                  ("stream", dumps({**base, "stream": True}), {}), ("tools", dumps({**base, "tools": [{}]}), {}),
                  ("n huge", dumps({**base, "n": 10 ** 12}), {}), ("n zero", dumps({**base, "n": 0}), {}),
                  ("seed huge", dumps({**base, "seed": 2 ** 80}), {}),
                  ("seed float", dumps({**base, "seed": 1.5}), {}),
                  ("max_tokens -1", dumps({**base, "max_tokens": -1}), {}),
                  ("top_p zero", dumps({**base, "top_p": 0}), {}),
                  ("stop five", dumps({**base, "stop": ["a"] * 5}), {}),
                  ("schema not an object", dumps({**base, "response_format": {
                      "type": "json_schema", "json_schema": {"schema": [1]}}}), {}),
                  ("format type dict", dumps({**base, "response_format": {"type": {"a": 1}}}), {}),
                  ("long prompt", dumps(msg("word " * 40000)), {})]
    else:
        cases += [("empty input", dumps({**base, "input": []}), {}), ("blank input", dumps({**base, "input": " "}), {}),
                  ("token ids", dumps({**base, "input": [[1, 2, 3]]}), {}),
                  ("too many", dumps({**base, "input": ["a"] * (MAX_INPUTS + 1)}), {}),
                  ("too long", dumps({**base, "input": "x" * (MAX_INPUT_CHARS + 1)}), {}),
                  ("input dict", dumps({**base, "input": {"a": 1}}), {}),
                  ("input_type list", dumps({**base, "input_type": ["query"]}), {}),
                  ("input_type dict", dumps({**base, "input_type": {"q": 1}}), {}),
                  ("encoding dict", dumps({**base, "encoding_format": {"a": 1}}), {}),
                  ("dimensions huge", dumps({**base, "dimensions": 10 ** 40}), {}),
                  ("dimensions -5", dumps({**base, "dimensions": -5}), {}),
                  ("surrogate in the 2nd input", dumps({**base, "input": ["fine", "\ud800"]}), {}),
                  ("surrogate in an ignored field", dumps({**base, "user": "\ud800"}), {})]
    return cases


def random_bodies(kind: str, model: str, n: int, seed: int) -> list[tuple[str, bytes]]:
    """Seeded mutations of a valid body: 1-3 fields set to garbage or nasty strings, deleted, or nested in junk."""
    rng = random.Random(seed)
    paths = CHAT_PATHS if kind == "chat" else EMB_PATHS
    out = []
    for i in range(n):
        body = base_body(kind, model)
        ops = []
        for _ in range(rng.randint(1, 3)):
            path = rng.choice(paths)
            try:
                if rng.random() < 0.15 and len(path) == 1:
                    body.pop(path[0], None)
                    ops.append(f"del {path}")
                    continue
                value = copy.deepcopy(rng.choice(GARBAGE + NASTY_STRINGS))
                if rng.random() < 0.2:
                    value = {rng.choice(["a", "\ud800", "", "type"]): [value]}
                _set(body, path, value)
                ops.append(f"{path}={ascii(value)[:30]}")
            except (KeyError, IndexError, TypeError):   # an earlier mutation removed the parent
                ops.append(f"skip {path}")
        out.append((f"random #{i}: {'; '.join(ops)}", json.dumps(body).encode()))
    return out


def replicas(app_name: str) -> set[str]:
    """The Serve replica actors of an app (their names change when Serve replaces a dead replica)."""
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f"{app_name}#" in a["name"]}


def check_error(r, label: str) -> None:
    assert 400 <= r.status_code < 500, (label, r.status_code, r.text[:300])
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and err["type"] and "code" in err and "param" in err, \
        (label, err)


def check_answer(r, label: str, kind: str) -> None:
    """A 200 with the endpoint's shape, or a 4xx with an OpenAI error body; never a 5xx."""
    assert r.status_code < 500, (label, r.status_code, r.text[:300])
    if r.status_code == 200:
        obj = r.json()
        assert obj["object"] == ("chat.completion" if kind == "chat" else "list"), (label, obj)
    else:
        check_error(r, label)


def run_fuzz(url: str, kind: str, model: str, token: str | None = None, app_name: str | None = None,
             n_random: int = 30, seed: int = 1234) -> dict:
    """Fuzz one server at `url` (its /v1 base, on 127.0.0.1); `kind` is "chat" or "emb". Asserts every answer is a
    4xx with an OpenAI error body (a 200 only for a random body that happens to be valid), wrong methods are 405s,
    a body past the limit is a 413, with a token every bad or missing one is a 401 whatever the body, and the replica
    still answers afterwards, without having been restarted (its Serve actor name unchanged, when app_name is given).
    Returns {status: count}. About 100-150 requests."""
    import collections

    import httpx

    path = f"{url}/{'chat/completions' if kind == 'chat' else 'embeddings'}"
    before = replicas(app_name) if app_name else None
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    hand = hand_written(kind, model)
    statuses: collections.Counter = collections.Counter()
    with httpx.Client(timeout=120, headers={"Content-Type": "application/json"}) as c:
        for label, raw, headers in hand:
            r = c.post(path, content=raw, headers={**auth, **headers})
            check_error(r, label)
            statuses[r.status_code] += 1
        for label, raw in random_bodies(kind, model, n_random, seed):
            r = c.post(path, content=raw, headers=auth)
            check_answer(r, label, kind)
            statuses[r.status_code] += 1
        for method in ("GET", "PUT", "DELETE", "PATCH"):
            r = c.request(method, path, headers=auth)
            assert r.status_code == 405 and "POST" in r.headers.get("allow", ""), (method, r.text)
            check_error(r, method)
        for method, p in (("POST", "/models"), ("GET", "/nope"), ("POST", "/completions"), ("GET", "/chat/../nope")):
            check_error(c.request(method, f"{url}{p}", headers=auth), f"{method} {p}")
        r = c.post(path, content=b"x" * (9 << 20), headers=auth)   # past both servers' body limits
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text[:200]
        if token:   # the token gate answers first, whatever the body
            valid = json.dumps(base_body(kind, model)).encode()
            for label, raw, _ in hand[::10] + [("valid", valid, {})]:
                for bad in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {token}"},
                            {"Authorization": "Bearer " + "\u00e9" * 3}):
                    r = c.post(path, content=raw, headers={k: v.encode("latin-1") for k, v in bad.items()})
                    assert r.status_code == 401, (label, bad, r.text[:200])
                    statuses[401] += 1
        r = c.post(path, content=json.dumps(base_body(kind, model)).encode(), headers=auth)
        assert r.status_code == 200, r.text[:300]
    if app_name:
        assert replicas(app_name) == before, "a replica was restarted during the fuzz"
    assert statuses[400] > 10 and statuses[422] > 5, statuses
    return dict(statuses)
