"""The generation row contract shared by every engine: requests in, results out, as dataclasses and as columns."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("speed_ray.generate")

FINISH_REASONS = ("stop", "length", "error")


@dataclass
class GenRequest:
    """One chat prompt plus its sampling parameters (OpenAI chat-completions semantics)."""

    messages: list[dict]
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 800
    json_schema: dict | None = None           # constrain the output to this JSON schema when the engine can
    seed: int | None = None


@dataclass
class GenResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str                        # "stop" | "length" | "error"
    error: str = ""                           # why, when finish_reason == "error"


class Engine(Protocol):
    def generate(self, requests: list[GenRequest]) -> list[GenResult]: ...


def error_result(reason: str) -> GenResult:
    return GenResult(text="", prompt_tokens=0, completion_tokens=0, finish_reason="error", error=reason)


# ---- the Ray Data row contract ------------------------------------------------------------------------
# Input columns a generation batch must have; every other column passes through untouched.
REQUEST_COLUMNS = ("messages", "temperature", "top_p", "max_tokens", "json_schema", "seed")
# Columns an engine adds to each row.
RESULT_COLUMNS = ("text", "prompt_tokens", "completion_tokens", "finish_reason", "gen_error", "engine")


def request_columns(req: GenRequest) -> dict[str, Any]:
    """A request as flat Parquet-friendly columns (JSON-in-string for nested values; -1 for no seed)."""
    return {"messages": json.dumps(req.messages, ensure_ascii=False), "temperature": float(req.temperature),
            "top_p": float(req.top_p), "max_tokens": int(req.max_tokens),
            "json_schema": json.dumps(req.json_schema) if req.json_schema else "",
            "seed": -1 if req.seed is None else int(req.seed)}


def requests_from_batch(batch: dict[str, Any]) -> list[GenRequest | str]:
    """Column batch -> requests; a row that cannot be decoded becomes its error message instead."""
    n = len(batch["messages"])
    out: list[GenRequest | str] = []
    for i in range(n):
        try:
            messages = batch["messages"][i]
            messages = json.loads(messages) if isinstance(messages, str) else list(messages)
            if not isinstance(messages, list) or not all(isinstance(m, dict) and "content" in m for m in messages):
                raise ValueError("messages must be a JSON list of {role, content} objects")
            schema = _col(batch, "json_schema", i, "")
            seed = int(_col(batch, "seed", i, -1))
            out.append(GenRequest(messages=messages, temperature=float(_col(batch, "temperature", i, 1.0)),
                                  top_p=float(_col(batch, "top_p", i, 1.0)),
                                  max_tokens=int(_col(batch, "max_tokens", i, 800)),
                                  json_schema=json.loads(schema) if schema else None,
                                  seed=None if seed < 0 else seed))
        except Exception as e:  # one bad row must not fail its batch
            out.append(f"bad request row: {type(e).__name__}: {e}")
    return out


def _col(batch: dict, name: str, i: int, default: Any) -> Any:
    col = batch.get(name)
    if col is None:
        return default
    v = col[i]
    return default if v is None else v


def generate_batch(engine: Engine, batch: dict[str, Any], engine_name: str) -> dict[str, Any]:
    """Run one column batch through an engine and append the result columns. Never raises for bad rows."""
    parsed = requests_from_batch(batch)
    good = [(i, r) for i, r in enumerate(parsed) if isinstance(r, GenRequest)]
    results: list[GenResult] = [error_result(r) if isinstance(r, str) else None for r in parsed]  # type: ignore
    if good:
        try:
            outs = engine.generate([r for _, r in good])
        except Exception as e:  # the engine itself failed on this batch: mark rows, keep going
            log.exception("engine %s failed on a batch of %d", engine_name, len(good))
            outs = [error_result(f"{type(e).__name__}: {e}")] * len(good)
        for (i, _), res in zip(good, outs):
            results[i] = res
    out = {k: list(v) if not isinstance(v, list) else v for k, v in batch.items()}
    out["text"] = [r.text for r in results]
    out["prompt_tokens"] = [int(r.prompt_tokens) for r in results]
    out["completion_tokens"] = [int(r.completion_tokens) for r in results]
    out["finish_reason"] = [r.finish_reason for r in results]
    out["gen_error"] = [r.error for r in results]
    out["engine"] = [engine_name] * len(results)
    return out


def batch_seed(requests: list[GenRequest]) -> int | None:
    """One seed for a batch of seeded requests: reproducible for the same batch, different across batches."""
    seeds = [r.seed for r in requests if r.seed is not None]
    if not seeds:
        return None
    return int.from_bytes(hashlib.sha256(",".join(map(str, seeds)).encode()).digest()[:4], "little")


class StubEngine:
    """A deterministic, model-free engine for tests and benchmarks: echoes a valid JSON object per schema.

    Texts depend only on the request (messages + seed), so reruns reproduce them. A user message containing
    `STUB_FAIL` fails that request, to test that one bad prompt never fails a stage. The model string may carry
    test options: "stub:delay=0.2" sleeps per batch (to kill a stage mid-way).
    """

    name = "stub"

    def __init__(self, model: str | None = None, **_: Any):
        self.model = model or "stub"
        self.options = stub_options(self.model)

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        if "delay" in self.options:
            import time

            time.sleep(float(self.options["delay"]))
        out = []
        for r in requests:
            content = " ".join(str(m.get("content", "")) for m in r.messages)
            if "STUB_FAIL" in content:
                out.append(error_result("stub engine asked to fail"))
                continue
            h = hashlib.sha256(f"{content}|{r.seed}".encode()).hexdigest()[:12]
            obj = _stub_object(r.json_schema, h) if r.json_schema else {"query": f"q {h}", "positive": f"p {h}",
                                                                         "hard_negative": f"n {h}"}
            text = json.dumps(obj)
            words = text.split()
            n = min(len(words), r.max_tokens)
            out.append(GenResult(text=" ".join(words[:n]), prompt_tokens=len(content.split()),
                                 completion_tokens=n, finish_reason="stop" if n == len(words) else "length"))
        return out


def stub_options(model: str) -> dict[str, str]:
    """'stub:delay=0.2,crash_once=/tmp/x' -> {'delay': '0.2', 'crash_once': '/tmp/x'}."""
    _, _, opts = model.partition(":")
    return dict(kv.split("=", 1) for kv in opts.split(",") if "=" in kv)


def _stub_object(schema: dict, h: str) -> Any:
    """A minimal instance of a JSON schema (objects, strings, enums, numbers, arrays)."""
    if "enum" in schema:
        return schema["enum"][0]
    t = schema.get("type")
    if t == "object" or "properties" in schema:
        props = schema.get("properties", {})
        return {k: _stub_object(v, f"{h} {k}") for k, v in props.items()}
    if t == "array":
        return [_stub_object(schema.get("items", {"type": "string"}), h)]
    if t in ("integer", "number"):
        return schema.get("minimum", 1)
    if t == "boolean":
        return True
    return f"{h} text"
