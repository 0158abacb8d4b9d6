"""The one row contract of every LLM call over a Ray Dataset, whatever answers it (an OpenAI-compatible endpoint,
HF, vLLM, the stub, a custom engine): request columns in, result columns out, as dataclasses and as Arrow.

Request columns (any other column passes through untouched):
  messages (JSON chat messages), temperature, top_p, max_tokens, response_format (JSON of OpenAI's
  response_format: {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema"}}; "" for
  free text), seed (null: unseeded), and an id column (request_id for the teacher, id for the generators).
Result columns (replace any of the same name):
  text ("" without an answer), error ("" when answered), attempts (HTTP calls actually sent; 0: cached, never sent,
  or a local engine),
  prompt_tokens, completion_tokens, cached, finish_reason ("stop" | "length" | "error" | what the endpoint said).

An error is either "no answer" (`no_answer`: the endpoint never answered: retries exhausted, a budget cap, an HTTP
error, a client bug): the row is not written, so a rerun sends it again; or the engine's answer for that row (a
refusal, a malformed request row, an engine that failed on its batch): the row is rejected with that reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import pyarrow as pa

REQUEST_COLUMNS = ("messages", "temperature", "top_p", "max_tokens", "response_format", "seed")
RESULT_SCHEMA = pa.schema([("text", pa.string()), ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
                           ("cached", pa.bool_()), ("error", pa.string()), ("attempts", pa.int64()),
                           ("finish_reason", pa.string())])
RESULT_COLUMNS = tuple(RESULT_SCHEMA.names)
# Errors that mean the endpoint gave no answer (speed_ray.llm.client): never written, a rerun retries them.
NO_ANSWER = ("http_", "timeout_", "connection_", "bad_response_", "budget_exhausted", "client_error")


@dataclass
class LLMRequest:
    """One chat prompt and its sampling parameters (OpenAI chat-completions semantics).

    Structured output is said once, as `response_format`; `json_schema` is its schema (set either: the other
    follows)."""

    messages: list[dict]
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    response_format: dict | None = None
    seed: int | None = None                  # part of the response cache key: k samples of a prompt need k seeds
    request_id: str = ""
    json_schema: dict | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.json_schema is not None and self.response_format is None:
            self.response_format = {"type": "json_schema",
                                    "json_schema": {"name": "output", "schema": self.json_schema}}
        elif self.response_format is not None and self.json_schema is None:
            self.json_schema = schema_of(self.response_format)


@dataclass
class LLMResult:
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    error: str = ""
    cached: bool = False
    attempts: int = 0
    request_id: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def error_result(reason: str, request_id: str = "") -> LLMResult:
    """An engine's answer that is an error (the row is rejected with it)."""
    return LLMResult(finish_reason="error", error=reason, request_id=request_id)


def no_answer(error: str | None) -> bool:
    """True when `error` says the endpoint never answered (retry on a rerun), not that it answered with an error."""
    return bool(error) and str(error).startswith(NO_ANSWER)


def schema_of(response_format: dict | None) -> dict | None:
    """The JSON schema a response_format constrains to (None for json_object, text or none)."""
    if not response_format or response_format.get("type") != "json_schema":
        return None
    js = response_format.get("json_schema") or {}
    return js.get("schema") if isinstance(js, dict) else None


def request_columns(req: LLMRequest, id_col: str | None = None) -> dict[str, Any]:
    """A request as flat Parquet-friendly columns (JSON-in-string for nested values)."""
    cols = {"messages": json.dumps(req.messages, ensure_ascii=False), "temperature": float(req.temperature),
            "top_p": float(req.top_p), "max_tokens": int(req.max_tokens),
            "response_format": json.dumps(req.response_format) if req.response_format else "",
            "seed": None if req.seed is None else int(req.seed)}
    if id_col:
        cols[id_col] = req.request_id
    return cols


def requests_from_batch(batch: pa.Table | dict[str, Any], id_col: str = "request_id") -> list[LLMRequest | str]:
    """Column batch -> requests; a row that cannot be decoded becomes its error ("bad_request: ...") instead.
    A batch without a messages column is a wiring bug: ValueError naming the columns it has."""
    names = batch.column_names if isinstance(batch, pa.Table) else list(batch)
    if "messages" not in names:
        raise ValueError(f"LLM request rows need a messages column; the batch has {sorted(names)}")
    # only the request's columns to Python: the rows may carry wide samples
    cols = (batch.select([c for c in dict.fromkeys((*REQUEST_COLUMNS, id_col)) if c in names]).to_pydict()
            if isinstance(batch, pa.Table) else batch)
    out: list[LLMRequest | str] = []
    for i in range(len(cols["messages"])):
        try:
            messages = cols["messages"][i]
            messages = json.loads(messages) if isinstance(messages, str) else list(messages)
            if not isinstance(messages, list) or not messages or \
                    not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
                raise ValueError("messages must be a non-empty JSON list of {role, content} objects")
            rf = _col(cols, "response_format", i, "")
            rf = _parsed(rf) if isinstance(rf, str) and rf else (rf or None)
            if rf is not None and not isinstance(rf, dict):
                raise ValueError("response_format must be a JSON object or empty")
            seed = _col(cols, "seed", i, None)
            out.append(LLMRequest(messages, temperature=float(_col(cols, "temperature", i, 1.0)),
                                  top_p=float(_col(cols, "top_p", i, 1.0)),
                                  max_tokens=int(_col(cols, "max_tokens", i, 1024)), response_format=rf,
                                  seed=None if seed is None or int(seed) < 0 else int(seed),
                                  request_id=str(_col(cols, id_col, i, ""))))
        except (ValueError, TypeError, AttributeError) as e:  # one bad row must not fail its batch
            out.append(f"bad_request: {e}"[:300])
    return out


@lru_cache(maxsize=256)
def _parsed(text: str) -> dict:
    """A response_format parsed once per distinct string: rows of a task type share one (read-only) dict, so
    engines may cache per schema object."""
    return json.loads(text)


def _col(cols: dict, name: str, i: int, default: Any) -> Any:
    col = cols.get(name)
    if col is None:
        return default
    v = col[i]
    return default if v is None else v


def result_columns(results: list[LLMResult]) -> dict[str, pa.Array]:
    return {
        "text": pa.array([r.text or "" for r in results], pa.string()),
        "prompt_tokens": pa.array([int(r.prompt_tokens or 0) for r in results], pa.int64()),
        "completion_tokens": pa.array([int(r.completion_tokens or 0) for r in results], pa.int64()),
        "cached": pa.array([bool(r.cached) for r in results], pa.bool_()),
        "error": pa.array([r.error or "" for r in results], pa.string()),
        "attempts": pa.array([int(r.attempts or 0) for r in results], pa.int64()),
        "finish_reason": pa.array([r.finish_reason or "" for r in results], pa.string()),
    }


def with_results(batch: pa.Table, results: list[LLMResult], **extra: pa.Array) -> pa.Table:
    """`batch` with the result columns (and `extra` ones) set: a column of the same name is replaced, so running
    a dataset through an engine twice keeps only the last answers."""
    out = batch
    for name, arr in {**result_columns(results), **extra}.items():
        if name in out.column_names:
            out = out.drop_columns([name])
        out = out.append_column(name, arr)
    return out


def merge_results(parsed: list[LLMRequest | str], answers: list[LLMResult]) -> list[LLMResult]:
    """One result per parsed row: the answers of the good requests in order, a bad_request error for the rest."""
    done = iter(answers)
    return [next(done) if isinstance(r, LLMRequest) else error_result(r) for r in parsed]
