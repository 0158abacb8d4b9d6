"""The one LLM row contract (speed_ray.llm): request/result rows and the split sink, without Ray."""

from __future__ import annotations

import json

import pyarrow as pa

from speed_ray.llm.metrics import collect, written_summary
from speed_ray.llm.rows import (LLMRequest, LLMResult, no_answer, request_columns, requests_from_batch,
                                with_results)
from speed_ray.llm.shards import rejects_output
from speed_ray.llm.sink import SplitSink
from speed_ray.store import StageOutput

SCHEMA = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}


def test_request_row_roundtrip_and_one_way_to_say_structure():
    r = LLMRequest([{"role": "user", "content": "hi"}], temperature=0.5, json_schema=SCHEMA, seed=3, request_id="a")
    assert r.response_format["type"] == "json_schema" and r.response_format["json_schema"]["schema"] == SCHEMA
    back = requests_from_batch(pa.Table.from_pylist([request_columns(r, "request_id")]))[0]
    assert back == r and back.json_schema == SCHEMA and back.seed == 3 and back.request_id == "a"
    free = LLMRequest([{"role": "user", "content": "hi"}], response_format={"type": "json_object"})
    assert free.json_schema is None


def test_malformed_rows_are_named_not_raised():
    good = request_columns(LLMRequest([{"role": "user", "content": "x"}]))
    rows = [good, {**good, "messages": "{not json"}, {**good, "messages": json.dumps([{"content": "no role"}])},
            {**good, "response_format": json.dumps([1])}]
    out = requests_from_batch(pa.Table.from_pylist(rows))
    assert isinstance(out[0], LLMRequest)
    assert all(isinstance(e, str) and e.startswith("bad_request: ") for e in out[1:])
    assert "role" in out[2] and "response_format" in out[3]


def test_sink_writes_answers_and_rejects_and_leaves_unanswered_rows_for_the_rerun(tmp_path):
    out = StageOutput(str(tmp_path / "run"), "s", "fp")
    rows = [request_columns(LLMRequest([{"role": "user", "content": f"q{i}"}], request_id=f"r{i}"), "request_id")
            for i in range(5)]
    results = [LLMResult('{"q": "ok"}', 3, 4, "stop"), LLMResult('{"bad": 1}', 3, 4, "stop"),
               LLMResult(error="refusal: no", finish_reason="error", attempts=1),
               LLMResult(error="bad_request: messages must be a list", finish_reason="error"),
               LLMResult(error="http_503_exhausted", finish_reason="error", attempts=3)]
    batch = with_results(pa.Table.from_pylist(rows), results)

    def finish(row):
        ok = "q" in json.loads(row["text"])
        r = {"request_id": row["request_id"], "text": row["text"], "valid": ok, "reject_reason": "" if ok else "x"}
        return ([r], []) if ok else ([], [r])

    run = collect(SplitSink(out, "request_id", finish).__call__(batch).to_pylist())
    assert (run["sent"], run["answered"], run["valid"], run["rejected"], run["failed"]) == (5, 4, 1, 3, 1)
    assert run["errors"] == {"http_503_exhausted": 1} and run["failed_ledger"]["failed_calls"] == 1
    assert run["reject_reasons"] == {"x": 1, "refusal": 1, "bad_request": 1}
    rej = {r["request_id"]: r for r in rejects_output(out).read_rows()}
    assert set(rej) == {"r1", "r2", "r3"} and rej["r3"]["error"].startswith("bad_request: messages")
    assert [r["request_id"] for r in out.read_rows()] == ["r0"]          # r4 is written nowhere: a rerun resends it
    w = written_summary(out, "request_id")
    assert (w["requests"], w["rejected"], w["answered"]) == (1, 3, 4) and no_answer("http_503_exhausted")
