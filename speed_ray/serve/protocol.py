"""The OpenAI wire format, pure: request validation with OpenAI-style errors, response bodies (no Ray, no torch)."""

from __future__ import annotations

import base64
import json
import math
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Request fields we read; the rest of the OpenAI schema (user, logit_bias, ...) is accepted and ignored, the way
# vLLM's server does, so stock clients work unchanged.
_MAX_N = 16
_INT64 = (-(2 ** 63), 2 ** 63 - 1)


class APIError(Exception):
    """A request the server refuses: an HTTP status plus an OpenAI-style error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_body(status: int, message: str, type: str = "invalid_request_error", code: str | None = None) -> dict:
    return APIError(status, message, type, code).body()


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object whose strings are all valid Unicode, or a 4xx naming what is wrong.

    The bytes must be UTF-8 (RFC 8259 section 8.1; a leading BOM is ignored): json.loads alone would also take UTF-16
    and UTF-32.
    """
    try:
        text = raw.decode("utf-8-sig")
        body = json.loads(text)
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 JSON: {e.reason} at byte {e.start}",
                       code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply", code="invalid_json") from None
    except ValueError as e:   # JSONDecodeError, or an integer of more than 4300 digits
        raise APIError(400, f"request body is not valid JSON: {_safe_text(str(e), 200)}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(422, f"request body must be a JSON object, got {type(body).__name__}", code="invalid_type")
    if _SURROGATE_ESCAPE.search(text):   # strict UTF-8 carries no surrogate: only a \\uD800-\\uDFFF escape can
        check_unicode(body)
    return body


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def _is_valid_unicode(s: str) -> bool:
    """Whether a str is a sequence of Unicode scalar values: JSON's \\ud800 escapes decode to lone surrogates, which
    no tokenizer or UTF-8 encoder accepts."""
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _safe_text(s: str, limit: int) -> str:
    """s cut to `limit` characters, lone surrogates escaped, for echoing in an error message."""
    s = s[:limit]
    return s if _is_valid_unicode(s) else s.encode("utf-8", "backslashreplace").decode("utf-8")


def check_unicode(body: Any, root: str = "") -> None:
    """400 naming the first field (keys included) holding a string that is not valid Unicode (a lone surrogate).

    Iterative, so a deeply nested body costs no recursion; json.loads bounds the depth anyway.
    """
    stack: list[tuple[str, Any]] = [(root, body)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if not _is_valid_unicode(v):
                raise APIError(400, f"'{path or 'body'}' is not a valid Unicode string (it contains a lone UTF-16 "
                               "surrogate, e.g. an unpaired \\ud800 escape)", code="invalid_unicode",
                               param=path or None)
        elif isinstance(v, dict):
            for k, x in reversed(list(v.items())):
                key_path = f"{path}.{_safe_text(k, 80)}" if path else _safe_text(k, 80)
                if not _is_valid_unicode(k):
                    raise APIError(400, f"the key '{key_path}' is not a valid Unicode string (it contains a lone "
                                   "UTF-16 surrogate)", code="invalid_unicode", param=key_path)
                stack.append((key_path, x))
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", x) for i, x in reversed(list(enumerate(v))))


_PREVIEW = reprlib.Repr()
_PREVIEW.maxlevel, _PREVIEW.maxstring, _PREVIEW.maxother, _PREVIEW.maxlong = 2, 60, 60, 40
_PREVIEW.maxlist = _PREVIEW.maxdict = _PREVIEW.maxtuple = 4


def preview(v: Any) -> str:
    """A short repr of a request value for an error message: bounded in length and depth, whatever the value."""
    return _safe_text(_PREVIEW.repr(v), 200)


def _bad_type(param: str, want: str, got: Any) -> APIError:
    return APIError(422, f"'{param}' must be {want}, got {type(got).__name__} {preview(got)}",
                    code="invalid_type", param=param)


def _number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        raise _bad_type(key, "a number", v)
    # int-float comparisons are exact in Python, so an integer too large for a float is compared, not converted.
    if v < lo or v > hi or (lo_open and v == lo):
        raise APIError(422, f"'{key}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {preview(v)}",
                       code="invalid_value", param=key)
    return float(v)


def _int(body: dict, key: str, default: int | None, lo: int = 1) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad_type(key, "an integer", v)
    if v < lo:
        raise APIError(422, f"'{key}' must be >= {lo}, got {v}", code="invalid_value", param=key)
    return v


# ---------------------------------------------------------------- chat completions

@dataclass(frozen=True)
class ChatParams:
    messages: list[dict]
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 512
    json_schema: dict | None = None
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    model: str = ""


# JSON mode without a schema: any JSON object.
JSON_OBJECT_SCHEMA = {"type": "object"}


def _content_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text is supported by a text-only model
        out = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(422, f"messages[{i}].content: only text parts are supported", code="invalid_type",
                               param=f"messages[{i}].content")
            out.append(part["text"])
        return "".join(out)
    raise _bad_type(f"messages[{i}].content", "a string or a list of text parts", content)


def _response_schema(rf: Any) -> dict | None:
    if rf is None:
        return None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise _bad_type("response_format", 'an object with a "type"', rf)
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return dict(JSON_OBJECT_SCHEMA)
    if kind == "json_schema":
        js = rf.get("json_schema")
        schema = js.get("schema") if isinstance(js, dict) else None
        if not isinstance(schema, dict):
            raise APIError(422, "response_format.json_schema.schema must be a JSON Schema object",
                           code="invalid_type", param="response_format.json_schema.schema")
        return schema
    raise APIError(422, f"response_format.type must be text, json_object or json_schema, got {preview(kind)}",
                   code="invalid_value", param="response_format.type")


def parse_chat_request(body: dict, max_new_tokens: int) -> ChatParams:
    """A /v1/chat/completions body -> ChatParams; APIError (400/422) for anything the server cannot honour."""
    msgs = body.get("messages")
    if msgs is None:
        raise APIError(400, "'messages' is required", code="missing_required_parameter", param="messages")
    if not isinstance(msgs, list):
        raise _bad_type("messages", "a list of messages", msgs)
    if not msgs:
        raise APIError(400, "'messages' must not be empty", code="invalid_value", param="messages")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad_type(f"messages[{i}]", "an object", m)
        role = m.get("role")
        if not isinstance(role, str) or role not in ("system", "developer", "user", "assistant"):
            raise APIError(422, f"messages[{i}].role must be system, user or assistant, got {preview(role)}",
                           code="invalid_value", param=f"messages[{i}].role")
        messages.append({"role": "system" if role == "developer" else role,
                         "content": _content_text(m.get("content"), i)})
    if body.get("stream"):
        raise APIError(400, "stream=true is not supported by this server", code="unsupported_parameter",
                       param="stream")
    if body.get("tools") or body.get("functions"):
        raise APIError(400, "tools are not supported by this server", code="unsupported_parameter", param="tools")
    # max_completion_tokens is the newer name; requests above the server's cap are clipped (finish_reason "length").
    want = _int(body, "max_completion_tokens", None) or _int(body, "max_tokens", None) or max_new_tokens
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = tuple(stop)
    else:
        raise _bad_type("stop", "a string or a list of up to 4 strings", stop)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad_type("seed", "an integer", seed)
    if seed is not None and not _INT64[0] <= seed <= _INT64[1]:   # OpenAI's range; engines seed 64-bit generators
        raise APIError(422, f"'seed' must be a 64-bit integer, got {preview(seed)}", code="invalid_value",
                       param="seed")
    model = body.get("model", "")
    if not isinstance(model, str):
        raise _bad_type("model", "a string", model)
    n = _int(body, "n", 1)
    if n > _MAX_N:
        raise APIError(422, f"'n' must be <= {_MAX_N}, got {n}", code="invalid_value", param="n")
    return ChatParams(messages=messages, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                      top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
                      max_tokens=min(want, max_new_tokens), json_schema=_response_schema(body.get("response_format")),
                      seed=seed, n=n, stop=tuple(s for s in stops if s), model=model)


def apply_stop(text: str, finish_reason: str, stops: tuple[str, ...]) -> tuple[str, str]:
    """Cut the text at the first stop string (OpenAI leaves the stop string out)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], "stop") if cut >= 0 else (text, finish_reason)


def chat_response(request_id: str, created: int, model: str, choices: list[tuple[str, str]], prompt_tokens: int,
                  completion_tokens: int) -> dict:
    """The chat.completion object; choices are (text, finish_reason)."""
    return {
        "id": request_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": reason} for i, (text, reason) in enumerate(choices)],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def models_response(models: str | tuple[str, ...] | list[str], created: int, owned_by: str = "speed-ray") -> dict:
    names = [models] if isinstance(models, str) else list(models)
    return {"object": "list",
            "data": [{"id": m, "object": "model", "created": created, "owned_by": owned_by} for m in names]}


def route_model(body: dict, served: tuple[str, ...]) -> str:
    """The served model a request names: its `model` when this server serves it, the default (the first served name)
    when it names none; 404 model_not_found (OpenAI's answer) for any other name."""
    model = body.get("model")
    if model is None or model == "":
        return served[0]
    if not isinstance(model, str):
        raise _bad_type("model", "a string", model)
    if model not in served:
        raise APIError(404, f"The model '{_safe_text(model, 100)}' does not exist; this server serves "
                       f"{', '.join(repr(m) for m in served)}", code="model_not_found", param="model")
    return model


# ---------------------------------------------------------------- embeddings

@dataclass(frozen=True)
class EmbedParams:
    texts: list[str]
    model: str = ""
    encoding_format: str = "float"
    dimensions: int | None = None
    input_type: str = "document"              # query: apply the model's query instruction
    instruction: str | None = None            # a task instruction for queries (E5-mistral / SPEED format)
    extra: dict = field(default_factory=dict)


INPUT_TYPES = {"query": "query", "document": "document", "passage": "document", "search_query": "query",
               "search_document": "document"}


def parse_embeddings_request(body: dict, max_inputs: int, max_input_chars: int, dim: int) -> EmbedParams:
    """A /v1/embeddings body -> EmbedParams; 400 empty, 413 too many/too long, 422 wrong types or values."""
    if "input" not in body or body["input"] is None:
        raise APIError(400, "'input' is required", code="missing_required_parameter", param="input")
    raw = body["input"]
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list):
        texts = raw
    else:
        raise _bad_type("input", "a string or a list of strings", raw)
    if not texts:
        raise APIError(400, "'input' must not be empty", code="invalid_value", param="input")
    if len(texts) > max_inputs:
        raise APIError(413, f"'input' has {len(texts)} items; this server accepts at most {max_inputs} per request",
                       code="too_many_inputs", param="input")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            hint = " (token arrays are not supported: send strings)" if isinstance(t, (int, list)) else ""
            raise APIError(422, f"input[{i}] must be a string, got {type(t).__name__}{hint}", code="invalid_type",
                           param="input")
        if not t.strip():
            raise APIError(400, f"input[{i}] is empty", code="invalid_value", param="input")
        if len(t) > max_input_chars:
            raise APIError(413, f"input[{i}] has {len(t)} characters; the limit is {max_input_chars}",
                           code="input_too_long", param="input")
    fmt = body.get("encoding_format")
    fmt = "float" if fmt is None else fmt
    if not isinstance(fmt, str) or fmt not in ("float", "base64"):
        raise APIError(422, f"'encoding_format' must be float or base64, got {preview(fmt)}", code="invalid_value",
                       param="encoding_format")
    dims = _int(body, "dimensions", None)
    if dims is not None and dims > dim:
        raise APIError(400, f"'dimensions' is {dims} but this model's embeddings have {dim}", code="invalid_value",
                       param="dimensions")
    model = body.get("model", "")
    if not isinstance(model, str):
        raise _bad_type("model", "a string", model)
    instruction = body.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise _bad_type("instruction", "a string", instruction)
    itype = body.get("input_type")
    if itype is None:
        itype = "query" if instruction else "document"
    if not isinstance(itype, str) or itype not in INPUT_TYPES:
        raise APIError(422, f"'input_type' must be one of {sorted(INPUT_TYPES)}, got {preview(itype)}",
                       code="invalid_value", param="input_type")
    return EmbedParams(texts=list(texts), model=model, encoding_format=fmt, dimensions=dims,
                       input_type=INPUT_TYPES[itype], instruction=instruction or None)


def query_prefix(params: EmbedParams, prompts: dict[str, str]) -> str:
    """The text prepended to each input: the request's instruction, the model's saved query/document prompt, or ""."""
    if params.input_type == "query":
        if params.instruction:
            from speed_ray.e5 import e5_prefix   # the format the embedder was trained with

            return e5_prefix(params.instruction)
        return prompts.get("query", "")
    return prompts.get("document", prompts.get("passage", ""))


def truncate_normalize(vectors: np.ndarray, dims: int | None) -> np.ndarray:
    """Matryoshka-style truncation to `dims` and L2 re-normalisation (https://arxiv.org/abs/2205.13147)."""
    v = np.asarray(vectors, dtype=np.float32)
    if dims is not None and dims < v.shape[1]:
        v = v[:, :dims]
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return v


def encode_vector(v: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":  # what the openai client decodes: little-endian float32 bytes
        return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")
    return np.asarray(v, dtype=np.float32).tolist()


def embeddings_response(vectors: np.ndarray, model: str, fmt: str, prompt_tokens: int) -> dict:
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode_vector(v, fmt)}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
