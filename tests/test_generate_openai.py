"""A generator behind an OpenAI-compatible endpoint (engine.kind: openai): the real synthesis stage on a real local
Ray, calling the fake OpenAI server (a real HTTP server) through the teacher's client; endpoint errors leave rows
unwritten and fail the stage by name, and a rerun sends exactly the missing ones."""

from __future__ import annotations

import json

import pytest

from speed_ray.config import ConfigError
from speed_ray.generate.config import EngineConfig
from speed_ray.generate.engine import StubEngine
from speed_ray.llm.metrics import TooManyFailures
from speed_ray.llm.rows import LLMRequest
from speed_ray.llm.shards import rejects_output
from speed_ray.store import RunStore
from fake_openai import FakeOpenAI, Fault
from test_generate_stages import _cfg, _ctx, _tasks_stage

_STUB = StubEngine()


def sample_responder(body: dict) -> str:
    """Answers like a generator that follows the schema it is sent (the stub's texts for that schema)."""
    req = LLMRequest(body["messages"], max_tokens=body["max_tokens"], seed=body.get("seed"),
                     response_format=body.get("response_format"))
    return _STUB.generate([req])[0].text


@pytest.fixture
def server():
    with FakeOpenAI(responder=sample_responder) as srv:
        yield srv


def _engine(url: str, **kw) -> dict:
    return {"kind": "openai", "base_url": url, "model": "fake-generator", "batch_size": 4, "max_new_tokens": 200,
            "num_cpus_per_replica": 0.5, "max_retries": 2, "timeout_s": 5.0, **kw}


def test_openai_engine_config_names_what_is_missing():
    with pytest.raises(ConfigError, match="base_url"):
        EngineConfig(kind="openai", model="m")
    with pytest.raises(ConfigError, match="model"):
        EngineConfig(kind="openai", base_url="http://127.0.0.1:1/v1")
    with pytest.raises(ConfigError, match="base_url"):
        EngineConfig(kind="hf", base_url="http://127.0.0.1:1/v1")


def test_synthesis_behind_an_openai_endpoint_fails_by_name_then_resumes(ray_local, tmp_path, server):
    from speed_ray.generate.stages import synthesis_stage

    # every classification task carries FAIL_ME: the endpoint answers its requests with 503, whatever the retries
    server.add_fault(Fault("status", status=503, match="FAIL_ME", times=None),
                     Fault("status", status=500, times=2))       # and two transient errors, retried away
    cfg = _cfg(tmp_path, synthesis={"n_samples": 24, "shard_size": 8, "engine": _engine(server.base_url)},
               mixture={"weights": {"retrieval": 1, "classification": 1}})
    store = RunStore(cfg.run.run_dir)
    ctx = _ctx(cfg, "synthesis", {"tasks": _tasks_stage(store, fail_types=("classification",))})
    with pytest.raises(TooManyFailures, match=r"^synthesis: 12 of 24 requests got no answer after retries "
                                              r"\(\{'http_503_exhausted': 12\}\); 12 are written"):
        synthesis_stage(ctx)
    rows = ctx.out.read_rows()
    assert len(rows) == 12 and {r["task_type"] for r in rows} == {"retrieval"} and all(r["valid"] for r in rows)
    assert not rejects_output(ctx.out).shard_names()            # an unanswered request is written nowhere
    r = rows[0]
    assert json.loads(r["sample"]) and r["error"] == "" and r["attempts"] >= 1 and r["engine"] == "openai"
    assert json.loads(r["lineage"])["generator"] == "openai:fake-generator"
    # what the endpoint was sent: the model name, the task type's schema as response_format, the row's seed
    bodies = list(server.bodies.values())
    assert {b["model"] for b in bodies} == {"fake-generator"} and all(b["max_tokens"] == 200 for b in bodies)
    assert {b["response_format"]["json_schema"]["name"] for b in bodies} == {"retrieval_sample",
                                                                              "classification_sample"}
    assert all(isinstance(b["seed"], int) for b in bodies)

    # the endpoint recovers: a rerun sends only the 12 missing requests and completes the stage
    server.clear_faults()
    server.reset_counts()
    man = synthesis_stage(_ctx(cfg, "synthesis", ctx.inputs))
    assert server.total == 12
    ids = [x["id"] for x in ctx.out.read_rows(columns=["id"])]
    assert len(ids) == len(set(ids)) == 24
    m = man["metrics"]
    assert m["rows"] == 24 and m["generated_this_run"] == 12 and m["parse_rate"] == 1.0
    assert man["engine"]["kind"] == "openai"
