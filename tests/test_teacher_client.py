"""Teacher client: pacing maths, retries, limits, cache, budget, accounting, key redaction, and teacher_map on Ray."""

from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import time
from pathlib import Path

import pyarrow as pa
import pytest

from speed_ray.llm.cache import ResponseCache
from speed_ray.llm.client import ChatClient, Secret
from speed_ray.llm.metrics import ledger_from_table
from speed_ray.llm.ratelimit import Budget, RateLimiter, TokenBucket, backoff_delay, parse_retry_after
from speed_ray.llm.rows import LLMRequest, result_columns
from speed_ray.teacher.config import TeacherConfig
from speed_ray.teacher.requests_ray import client_from_config
from fake_openai import REFUSAL, FakeOpenAI, Fault, request_hash

KEY = "sk-test-REDACTME-7f3a9c1e5b2d4086"


@pytest.fixture
def srv():
    with FakeOpenAI() as s:
        yield s


def req(i, text: str = "", **kw) -> LLMRequest:
    return LLMRequest([{"role": "system", "content": "be brief"}, {"role": "user", "content": f"question {i} {text}"}],
                      max_tokens=64, request_id=f"r{i}", **kw)


def client(srv, **kw) -> ChatClient:
    kw.setdefault("backoff_base_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    kw.setdefault("max_retries", 2)
    kw.setdefault("timeout_s", 10.0)
    return ChatClient(srv.base_url, "fake-model", api_key_env="SPEED_RAY_TEST_KEY", **kw)


def arrivals(srv, h: str) -> list[float]:
    return [t for t, hh, _ in srv.log if hh == h]


def hash_of(c: ChatClient, r: LLMRequest) -> str:
    return request_hash(c._body(r))


# ---- pure pacing ---------------------------------------------------------------------------------------
def test_token_bucket_reserves_in_order_and_allows_debt():
    b = TokenBucket(rate_per_s=2.0, burst=2.0, clock=lambda: 0.0)
    assert [b.reserve(1, now=0.0) for _ in range(4)] == [0.0, 0.0, 0.5, 1.0]
    assert b.reserve(1, now=10.0) == 0.0            # refilled, capped at the burst
    assert b.reserve(5, now=10.0) == pytest.approx(2.0)  # bigger than the burst: passes after its deficit
    b.adjust(-5, now=10.0)                           # refund: real usage was lower than booked
    assert b.reserve(1, now=10.0) == 0.0


def test_rate_limiter_rpm_and_tpm():
    t = [0.0]
    lim = RateLimiter(rpm=120, tpm=600, clock=lambda: t[0])   # 2 req/s, 10 tok/s
    assert lim.reserve(5) == 0.0
    assert lim.reserve(5) == 0.0
    assert lim.reserve(5) == pytest.approx(0.5)      # both buckets in debt: the tighter (0.5 s) wins
    lim.correct(est_tokens=5, actual_tokens=25)      # real usage was higher: the tpm bucket owes more
    assert lim.reserve(0) == pytest.approx(2.5)


def test_parse_retry_after_forms():
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 7, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=now) == pytest.approx(7.0)
    assert parse_retry_after({"retry-after": email.utils.formatdate(now - 60, usegmt=True)}, now=now) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


def test_backoff_full_jitter_bounds_and_retry_after_floor():
    rng = random.Random(0)
    for attempt in range(8):
        cap = min(4.0, 0.5 * 2 ** attempt)
        ds = [backoff_delay(attempt, 0.5, 4.0, None, rng) for _ in range(200)]
        assert all(0.0 <= d <= cap for d in ds)
        assert max(ds) > 0.5 * cap                   # full jitter spans the range, not a fixed delay
    assert all(backoff_delay(0, 0.5, 4.0, 3.0, rng) >= 3.0 for _ in range(50))


def test_budget_caps_calls_and_tokens():
    b = Budget(max_calls=2)
    assert b.try_acquire(10) and b.try_acquire(10) and not b.try_acquire(10)
    b = Budget(max_tokens=100)
    assert b.try_acquire(60)
    assert not b.try_acquire(60)                     # 60 reserved + 60 > 100: never overshoot
    b.settle(60, 20)                                 # real usage 20: room again
    assert b.try_acquire(60) and b.snapshot()["tokens_spent"] == 20


# ---- against the fake server ---------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["seconds", "http_date"])
def test_429_retry_after_is_honoured(srv, form):
    c = client(srv)
    r = req(1)
    value = "1" if form == "seconds" else email.utils.formatdate(time.time() + 3, usegmt=True)
    srv.add_fault(Fault("status", status=429, retry_after=value, times=1))
    [res] = c.complete_many_sync([r])
    assert res.error == "" and res.attempts == 2 and res.text
    t = arrivals(srv, hash_of(c, r))
    # backoff alone would be <= 0.01 s; the retry waited for the server's window (an HTTP date has 1 s resolution)
    assert len(t) == 2 and t[1] - t[0] >= 0.9


def test_5xx_retried_then_exhausted_and_4xx_not_retried(srv):
    c = client(srv, max_retries=2)
    srv.add_fault(Fault("status", status=500, match="doomed", times=None),
                  Fault("status", status=503, match="flaky", times=1),
                  Fault("status", status=400, match="invalid", times=None, message="bad field 'x'"),
                  Fault("status", status=404, match="missing", times=None))
    reqs = [req(0, "doomed"), req(1, "flaky"), req(2, "invalid"), req(3, "missing"), req(4)]
    res = c.complete_many_sync(reqs)
    assert [r.request_id for r in res] == [r.request_id for r in reqs]   # order preserved
    assert (res[0].error, res[0].attempts, res[0].text) == ("http_500_exhausted", 3, "")
    assert (res[1].error, res[1].attempts) == ("", 2)
    assert (res[2].error, res[2].attempts) == ("http_400: bad field 'x'", 1)
    assert res[3].error.startswith("http_404") and res[3].attempts == 1
    assert (res[4].error, res[4].attempts) == ("", 1)
    assert srv.received[hash_of(c, reqs[0])] == 3 and srv.received[hash_of(c, reqs[2])] == 1
    assert srv.total == sum(r.attempts for r in res)


def test_timeouts_dropped_connections_and_garbage_bodies_are_retried(srv):
    c = client(srv, timeout_s=0.3, max_retries=1)
    srv.add_fault(Fault("hang", match="slow-once", times=1, hang_s=5),
                  Fault("hang", match="slow-always", times=None, hang_s=5),
                  Fault("garbage_body", match="garbled", times=1),
                  Fault("disconnect", match="dropped", times=1),
                  Fault("disconnect", match="gone", times=None))
    res = c.complete_many_sync([req(0, "slow-once"), req(1, "slow-always"), req(2, "garbled"), req(3, "dropped"),
                                req(4, "gone")])
    assert (res[0].error, res[0].attempts) == ("", 2)
    assert (res[1].error, res[1].attempts) == ("timeout_exhausted", 2)
    assert (res[2].error, res[2].attempts) == ("", 2)
    assert (res[3].error, res[3].attempts) == ("", 2)
    assert (res[4].error, res[4].attempts) == ("connection_exhausted", 2)


def test_content_faults_are_answers_for_the_parser(srv, tmp_path):
    """Truncated JSON, refusal sentences and wrong-schema JSON are the model's answer: returned (and cached) for
    the stage's parser to reject; a structured-output refusal (content null) is an error and is not cached."""
    cache = ResponseCache(str(tmp_path / "cache"))
    c = client(srv, cache=cache)
    srv.add_fault(Fault("truncate", match="cut"), Fault("refusal", match="nope"),
                  Fault("wrong_schema", match="odd"), Fault("refusal_field", match="structured"))
    res = c.complete_many_sync([req(0, "cut"), req(1, "nope"), req(2, "odd"), req(3, "structured")])
    with pytest.raises(json.JSONDecodeError):
        json.loads(res[0].text)
    assert res[0].finish_reason == "length"
    assert res[1].text == REFUSAL
    assert "unexpected_field" in json.loads(res[2].text)
    assert res[3].text == "" and res[3].error == f"refusal: {REFUSAL}"
    assert len(cache) == 3


def test_custom_responder_and_cache_outage_keep_answers(tmp_path):
    class BrokenCache(ResponseCache):
        def put(self, key, value):
            raise OSError("bucket unreachable")

    def responder(body):
        q = body["messages"][-1]["content"]
        return {"content": json.dumps({"query": q.upper()}), "finish_reason": "stop",
                "usage": {"prompt_tokens": 11, "completion_tokens": 7}}

    with FakeOpenAI(responder=responder) as srv:
        [res] = client(srv, cache=BrokenCache(str(tmp_path))).complete_many_sync([req(1)])
    assert res.error == "" and json.loads(res.text) == {"query": "QUESTION 1 "}
    assert (res.prompt_tokens, res.completion_tokens) == (11, 7)


def test_concurrency_bound_is_respected():
    with FakeOpenAI(latency_s=0.1) as srv:
        c = client(srv, concurrency=4)
        res = c.complete_many_sync([req(i) for i in range(24)])
        assert all(r.error == "" for r in res)
        assert 2 <= srv.max_inflight <= 4


def test_rpm_limit_spreads_requests(srv):
    c = client(srv, rpm=600)                         # 10/s with a burst of 10
    t0 = time.monotonic()
    res = c.complete_many_sync([req(i) for i in range(25)])
    assert all(r.error == "" for r in res)
    # 15 requests beyond the burst need 1.5 s at 10/s: the last cannot reach the server sooner (a lower bound,
    # which a slow machine cannot break)
    assert max(t for t, _, _ in srv.log) - t0 >= 1.45


def test_cache_rerun_sends_only_what_failed(srv, tmp_path):
    cache_url = str(tmp_path / "cache")
    reqs = [req(i, "doomed" if i % 5 == 0 else "") for i in range(20)]
    srv.add_fault(Fault("status", status=500, match="doomed", times=None))
    c1 = client(srv, cache=ResponseCache(cache_url), max_retries=1)
    first = c1.complete_many_sync(reqs)
    failed = {hash_of(c1, r) for r, x in zip(reqs, first) if x.error}
    assert len(failed) == 4 and all(x.error == "http_500_exhausted" for x in first if x.error)
    srv.clear_faults()
    srv.reset_counts()
    c2 = client(srv, cache=ResponseCache(cache_url))   # a fresh process would build a fresh client
    second = c2.complete_many_sync(reqs)
    assert set(srv.received) == failed and srv.total == 4
    assert all(x.error == "" for x in second)
    assert sum(x.cached for x in second) == 16
    assert [x.text for x, y in zip(second, first) if y.error == ""] == [y.text for y in first if y.error == ""]
    srv.reset_counts()
    third = c2.complete_many_sync(reqs)
    assert srv.total == 0 and all(x.cached for x in third)


def test_cache_key_covers_the_request_not_the_auth():
    base = req(1)
    k = ResponseCache.key_for("m", base)
    assert k == ResponseCache.key_for("m", req(1))
    assert k == ResponseCache.key_for("m", LLMRequest(base.messages, max_tokens=64, request_id="another-id"))
    for other in (ResponseCache.key_for("m2", base), ResponseCache.key_for("m", req(2)),
                  ResponseCache.key_for("m", req(1, temperature=0.0)), ResponseCache.key_for("m", req(1, seed=3)),
                  ResponseCache.key_for("m", req(1, response_format={"type": "json_object"}))):
        assert other != k


def test_budget_stops_at_cap_and_every_request_is_accounted(srv, tmp_path):
    srv.add_fault(Fault("status", status=500, match="doomed", times=None),
                  Fault("status", status=429, retry_after="0", per_request=True, times=1))
    c = client(srv, concurrency=3, budget=Budget(max_calls=10), max_retries=1, cache=ResponseCache(str(tmp_path)))
    reqs = [req(i, "doomed" if i in (2, 7) else "") for i in range(16)]
    res = c.complete_many_sync(reqs)
    ok = [r for r in res if r.error == ""]
    failed = [r for r in res if r.error and r.error != "budget_exhausted"]
    skipped = [r for r in res if r.error == "budget_exhausted"]
    assert len(ok) + len(failed) + len(skipped) == len(reqs)
    assert len(ok) + len(failed) == 10 and len(skipped) == 6
    assert all(r.attempts == 0 and r.text == "" for r in skipped)
    assert len(srv.received) == 10                   # nothing past the cap reached the server
    assert srv.total == sum(r.attempts for r in res)
    ledger = ledger_from_table(pa.table(result_columns(res)))
    assert ledger["calls"] == 10 and ledger["budget_exhausted"] == 6 and ledger["cached_calls"] == 0
    assert ledger["failed_calls"] == len(failed)
    assert ledger["completion_tokens"] == sum(r.completion_tokens for r in ok) > 0
    # a rerun with a fresh budget pays only for what is missing
    srv.clear_faults()
    srv.reset_counts()
    again = client(srv, budget=Budget(max_calls=10), cache=ResponseCache(str(tmp_path))).complete_many_sync(reqs)
    assert srv.total == len(failed) + len(skipped) and all(r.error == "" for r in again)
    assert ledger_from_table(pa.table(result_columns(again)))["cached_calls"] == len(ok)


def test_token_budget_never_overshoots(srv):
    budget = Budget(max_tokens=1000)
    res = client(srv, budget=budget, concurrency=4).complete_many_sync([req(i) for i in range(40)])
    spent = sum(r.prompt_tokens + r.completion_tokens for r in res)
    assert spent <= 1000 and budget.tokens_spent == spent and budget.tokens_reserved == 0
    assert any(r.error == "budget_exhausted" for r in res) and any(r.error == "" for r in res)


def test_api_key_never_leaks(srv, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SPEED_RAY_TEST_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    # a server that echoes the key in its error message (some proxies do)
    srv.add_fault(Fault("status", status=401, match="auth", times=None, message=f"invalid key {KEY}"),
                  Fault("status", status=500, match="doomed", times=None, message=f"upstream saw {KEY}"),
                  Fault("hang", match="slow", times=None, hang_s=5))
    cache = ResponseCache(str(tmp_path / "cache"))
    c = client(srv, cache=cache, timeout_s=0.3, max_retries=1)
    res = c.complete_many_sync([req(0, "auth"), req(1, "doomed"), req(2, "slow"), req(3)])
    assert srv.auth_headers[f"Bearer {KEY}"] == srv.total > 0   # the key was really sent
    assert res[0].error.startswith("http_401") and "***" in res[0].error
    from speed_ray.store import StageOutput

    out = StageOutput(str(tmp_path / "run"), "teacher", "fp")
    out.write_shard("part-0", pa.table(result_columns(res)))
    out.write_manifest({"cost": ledger_from_table(out.read_table()), "results": [repr(r) for r in res]})
    texts = [caplog.text, repr(c), str(c.__dict__), repr(Secret(KEY)), str(Secret(KEY)), *map(repr, res)]
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(c)
    for p in Path(tmp_path).rglob("*"):
        if p.is_file():
            texts.append(p.read_bytes().decode("utf-8", "replace"))
    assert not [t for t in texts if KEY in t]


# ---- Ray Data ------------------------------------------------------------------------------------------
def _rows(n: int, doomed_every: int = 0) -> list[dict]:
    return [{"request_id": f"r{i:04d}",
             "messages": json.dumps([{"role": "user", "content": f"q{i}" + (" doomed" if doomed_every and
                                                                             i % doomed_every == 0 else "")}]),
             "temperature": 1.0, "top_p": 1.0, "max_tokens": 32,
             "response_format": json.dumps({"type": "json_object"}) if i % 2 else ""} for i in range(n)]


def test_teacher_map_end_to_end_with_faults_and_resume(ray_local, tmp_path, monkeypatch):
    import ray

    from speed_ray.store import StageOutput
    from speed_ray.streaming import done_ids, filter_pending, write_stream
    from speed_ray.teacher.requests_ray import teacher_map

    monkeypatch.setenv("SPEED_RAY_TEST_KEY", KEY)
    rows = _rows(60, doomed_every=10)
    rows[5]["messages"] = "not json"                 # bad input: an error on its row, the rest goes on
    cfg = TeacherConfig(model="fake-model", api_key_env="SPEED_RAY_TEST_KEY", concurrency=16, max_retries=1,
                        backoff_base_s=0.01, backoff_max_s=0.05, timeout_s=5.0)
    cache_url = str(tmp_path / "cache")
    with FakeOpenAI(latency_s=0.02) as srv:
        srv.add_fault(Fault("status", status=500, match="doomed", times=None),
                      Fault("status", status=429, retry_after="0.05", per_request=True, times=1, match="q3"),
                      Fault("truncate", match="q7", times=None))
        # run 1, "killed" after the first 30 rows: only they were written
        out = StageOutput(str(tmp_path / "run"), "teacher", "fp1")
        ds = ray.data.from_items(rows[:30], override_num_blocks=3)
        n = write_stream(teacher_map(ds, cfg, srv.base_url, cache_url, batch_size=8), out,
                         rows_per_shard=10, id_col="request_id")
        assert n == 30
        first = out.read_table()
        errs = dict(zip(first.column("request_id").to_pylist(), first.column("error").to_pylist()))
        assert errs["r0005"].startswith("bad_request:")
        assert {k for k, v in errs.items() if v == "http_500_exhausted"} == {f"r{i:04d}" for i in range(0, 30, 10)}
        assert srv.total == sum(first.column("attempts").to_pylist())
        assert srv.auth_headers[f"Bearer {KEY}"] == srv.total
        sent_first = set(srv.received)

        # run 2 resumes: rows already written are skipped; new rows are sent, nothing written is re-sent
        srv.reset_counts()
        pending = filter_pending(ray.data.from_items(rows, override_num_blocks=4), done_ids(out, "request_id"),
                                 "request_id")
        n2 = write_stream(teacher_map(pending, cfg, srv.base_url, cache_url, batch_size=8), out,
                          rows_per_shard=10, id_col="request_id")
        assert n2 == 30 and out.num_rows() == 60
        assert not set(srv.received) & sent_first
        table = out.read_table()
        ids = table.column("request_id").to_pylist()
        assert sorted(ids) == sorted(r["request_id"] for r in rows)
        led = ledger_from_table(table)
        assert led["calls"] == 59 and led["failed_calls"] == 6 and led["budget_exhausted"] == 0

        # run 3 re-asks everything with the faults gone: the cache answers all but the 6 failures
        srv.clear_faults()
        srv.reset_counts()
        fresh = StageOutput(str(tmp_path / "run"), "teacher", "fp2")
        write_stream(teacher_map(ray.data.from_items(rows, override_num_blocks=4), cfg, srv.base_url, cache_url,
                                 batch_size=8), fresh, rows_per_shard=30, id_col="request_id")
        third = fresh.read_table()
        assert srv.total == 6
        led3 = ledger_from_table(third)
        assert (led3["calls"], led3["cached_calls"], led3["failed_calls"]) == (6, 53, 0)

    # nothing written (stage files, cache) and no Ray log (driver, workers, Ray Data) holds the key
    ray_logs = Path(os.environ["RAY_TMPDIR"]).glob("session_*/logs/**/*")
    for p in [*Path(tmp_path).rglob("*"), *ray_logs]:
        if p.is_file() and p.stat().st_size < 50_000_000:
            assert KEY.encode() not in p.read_bytes(), p


def test_teacher_map_budget_is_shared_across_actors(ray_local, tmp_path):
    import ray

    from speed_ray.teacher.requests_ray import teacher_map

    cfg = TeacherConfig(model="fake-model", api_key_env="SPEED_RAY_TEST_KEY", concurrency=8, max_calls=25,
                        max_retries=0)
    with FakeOpenAI(latency_s=0.01) as srv:
        ds = teacher_map(ray.data.from_items(_rows(60), override_num_blocks=6), cfg, srv.base_url, None,
                         num_actors=2, batch_size=5)
        table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
        led = ledger_from_table(table)
        assert table.num_rows == 60
        assert (led["calls"], led["budget_exhausted"]) == (25, 35)
        assert srv.total == 25


def test_teacher_answers_leave_in_small_blocks_from_one_large_input_block(ray_local):
    """One input block of 200 requests (a whole input file) must not come back as one output block: a map task's
    answers reach the shard writer only when the task ends, so a block of a whole file held every answer back (and
    a crash lost them; seen at paper scale: brainstorm ran 6 minutes without writing a shard). Blocks of the
    batches a task runs at once (4 x batch_size rows) instead."""
    import ray

    from speed_ray.teacher.requests_ray import ASYNC_BATCHES_PER_TASK, teacher_map

    cfg = TeacherConfig(model="fake-model", api_key_env="SPEED_RAY_TEST_KEY", concurrency=8, max_retries=0)
    with FakeOpenAI(latency_s=0.0) as srv:
        ds = teacher_map(ray.data.from_items(_rows(200), override_num_blocks=1), cfg, srv.base_url, None,
                         batch_size=8)
        tables = ray.get(ds.to_arrow_refs())
    assert sum(t.num_rows for t in tables) == 200
    assert max(t.num_rows for t in tables) <= ASYNC_BATCHES_PER_TASK * 8 and len(tables) >= 200 // 32, \
        [t.num_rows for t in tables]


def test_one_slow_request_does_not_idle_the_teachers_other_slots(ray_local):
    """A map task ends with its slowest request (a 429's Retry-After, a 5xx backoff). When an actor ran one task at
    a time, one straggler held back every other block: no request went out until it came back, with 7 of the 8
    slots idle (at paper scale: 172 requests/s from 128 slots at 300 ms). Other blocks' requests must go out while
    it hangs."""
    import ray

    from speed_ray.teacher.requests_ray import teacher_map

    hang_s = 3.0
    rows = _rows(64)
    rows[0]["messages"] = json.dumps([{"role": "user", "content": "q0 slow"}])
    cfg = TeacherConfig(model="fake-model", api_key_env="SPEED_RAY_TEST_KEY", concurrency=8, max_retries=0,
                        timeout_s=30.0)
    with FakeOpenAI(latency_s=0.05) as srv:
        srv.add_fault(Fault("hang", match="slow", hang_s=hang_s, times=None))
        ds = teacher_map(ray.data.from_items(rows, override_num_blocks=1), cfg, srv.base_url, None, batch_size=2)
        table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
        log = list(srv.log)
    assert table.num_rows == 64 and not [e for e in table.column("error").to_pylist() if e]
    slow_t = next(t for t, h, outcome in log if outcome == "hang")     # log: (arrival, hash, outcome)
    during = [t for t, _, outcome in log if outcome != "hang" and slow_t <= t < slow_t + hang_s - 0.2]
    # its own block is 8 rows (4 batches of 2): one task at a time sent at most those 7 others while it hung
    assert len(during) >= 16, f"{len(during)} requests went out while one slow request hung: its task held the actor"


def test_max_completion_tokens_for_newer_models(srv):
    """o-series / gpt-5 endpoints reject max_tokens: the config names the field the request carries."""
    from speed_ray.config import ConfigError
    from speed_ray.run_config import build_config

    cfg = build_config({"teacher": {"base_url": srv.base_url, "max_tokens_param": "max_completion_tokens"}}).teacher
    body = client_from_config(cfg, None, None)._body(req(0))
    assert body["max_completion_tokens"] == 64 and "max_tokens" not in body
    assert client(srv)._body(req(0))["max_tokens"] == 64
    with pytest.raises(ConfigError, match="max_tokens_param"):
        build_config({"teacher": {"max_tokens_param": "max_output_tokens"}})
