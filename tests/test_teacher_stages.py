"""Teacher stages against the fault-injecting fake OpenAI server: faults, resume, kill mid-stage, budget cap."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from speed_ray.pipeline import StageContext, StageError, fingerprints, build_plan, run_pipeline
from speed_ray.run_config import build_config
from speed_ray.store import RunStore
from speed_ray.llm.shards import rejects_output
from fake_openai import FakeOpenAI, Fault  # tests/ is on sys.path under pytest

POISON = "POISONED"   # in every classification task: the fault plan makes requests about them fail forever


def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def responder(body: dict) -> str:
    """A well-behaved teacher: answers each SPEED prompt with the JSON its parser expects."""
    user = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
    h = _h(user)
    if user.startswith("Brainstorm"):
        topic = re.search(r"for the topic: (.+?)[.,]", user).group(1)
        poison = f" {POISON}" if "classification tasks" in user else ""
        return json.dumps([f"1. Find {topic} documents {h}{poison}.", f"- find {topic} documents {h}{poison}.",
                           f"Classify {topic} posts {h}.", f"Match {topic} titles {h}."])
    if user.startswith("A language model has been given a prompt"):
        if "Your mission is to judge" in user:
            return json.dumps({"reason": f"r{h}", "best": 0, "worst": 1})
        return json.dumps({"reason": f"fixed {h}", "revision": {"S1": f"a {h}", "S2": f"b {h}", "S3": f"c {h}"}})
    if "retrieval task" in user:
        return json.dumps({"user_query": f"q {h}", "positive_document": f"pos {h}", "hard_negative_document": f"n {h}"})
    if "classification task" in user:
        return json.dumps({"input_text": f"t {h}", "label": f"l {h}", "misleading_label": f"m {h}"})
    if "matching task" in user:
        return json.dumps({"input": f"i {h}", "positive_document": f"p {h}"})
    return json.dumps({"S1": f"s1 {h}", "S2": f"s2 {h}", "S3": f"s3 {h}"})


def make_cfg(tmp_path, url: str, **over) -> "object":
    teacher = {"base_url": url, "model": "fake-gpt", "concurrency": 4, "max_retries": 2, "backoff_base_s": 0.01,
               "backoff_max_s": 0.05, "timeout_s": 2.0, "shard_rows": 8, "request_batch_size": 8,
               **over.pop("teacher", {})}
    data = {"run": {"run_dir": str(tmp_path / "run"), "name": "t"}, "topics": {"n_topics": 6},
            "brainstorm": {"task_types": ["retrieval", "classification", "matching_short", "matching_long", "sts"]},
            "seed_data": {"n_samples": 40}, "teacher": teacher, **over}
    return build_config(data)


def stage_out(cfg, name):
    plan = build_plan(cfg.pipeline.variant)
    return RunStore(cfg.run.run_dir).stage(name, fingerprints(cfg, plan)[name])


def all_request_ids(out) -> list[str]:
    ids = out.read_table(columns=["request_id"]).column("request_id").to_pylist() if out.shard_names() else []
    rej = rejects_output(out)
    rids = rej.read_table(columns=["request_id"]).column("request_id").to_pylist() if rej.shard_names() else []
    return ids + rids


@pytest.fixture
def server():
    with FakeOpenAI(responder=responder) as srv:
        yield srv


def test_stages_survive_faults_and_rerun_sends_only_missing(ray_local, tmp_path, server):
    server.add_fault(Fault("status", status=429, retry_after="0", times=3), Fault("status", status=500, times=3),
                     Fault("hang", hang_s=5.0, times=1), Fault("truncate", match="assigned a retrieval task", times=2),
                     Fault("refusal", match="assigned a text classification task", times=2),
                     Fault("wrong_schema", match="assigned a text matching task", times=2),
                     Fault("status", status=503, match=POISON, times=None))
    cfg = make_cfg(tmp_path, server.base_url, teacher={"max_failed_fraction": 0.5})
    summary = run_pipeline(cfg, stages=["topics", "brainstorm", "seed_data"])
    assert summary["stages"]["seed_data"]["state"] == "ran"
    man = stage_out(cfg, "seed_data").manifest
    assert man["requests"] == 40
    run = man["this_run"]
    assert run["sent"] == 40 and run["answered"] + run["failed"] == run["sent"]
    assert man["valid"] + man["rejected"] == man["answered"] == run["answered"]
    assert run["failed"] > 0 and man["pending"] == run["failed"]                # the poisoned task's samples
    reasons = man["reject_reasons"]
    assert reasons.get("truncated") == 2 and reasons.get("refusal") == 2 and reasons.get("missing_key:input") == 2
    assert 0 < man["valid_rate"] < man["parse_rate"] < 1
    assert man["cost"]["calls"] >= man["answered"] and man["cost"]["prompt_tokens"] > 0

    out = stage_out(cfg, "seed_data")
    rows = out.read_rows()
    assert all(r["valid"] for r in rows) and len({r["id"] for r in rows}) == len(rows) == man["valid"]
    r = rows[0]
    lin = json.loads(r["lineage"])
    assert {"topic", "task_id", "task", "task_type", "prompt_params", "generator"} <= set(lin)
    assert lin["generator"] == "teacher:fake-gpt" == r["generator"] and json.loads(r["prompt_params"])["task_type"]
    rej = rejects_output(out).read_rows()
    assert {x["reject_reason"] for x in rej} >= {"truncated", "refusal"} and all(x["text"] for x in rej)

    # brainstorm: tasks normalized and deduped, tasks_per_topic=1, STS gets E5's fixed task without a call
    tasks = stage_out(cfg, "brainstorm").read_rows()
    assert len(tasks) == 6 * 5 and {t["task"] for t in tasks if t["task_type"] == "sts"} == {
        "Retrieve semantically similar text."}
    assert all(not t["task"].startswith(("1.", "-")) for t in tasks)

    # rerun: only the missing requests are sent
    server.clear_faults()
    server.reset_counts()
    run_pipeline(cfg, stages=["seed_data"], force=["seed_data"])
    man2 = stage_out(cfg, "seed_data").manifest
    assert server.total == run["failed"] and man2["pending"] == 0 and man2["answered"] == 40
    ids = all_request_ids(out)
    assert len(ids) == len(set(ids)) == 40


@pytest.mark.slow
def test_json_schema_mode_sends_sample_schema(ray_local, tmp_path, server):
    bodies = []
    server.responder = lambda body: bodies.append(body) or responder(body)
    cfg = make_cfg(tmp_path, server.base_url, teacher={"json_mode": "json_schema"}, seed_data={"n_samples": 8})
    run_pipeline(cfg, stages=["topics", "brainstorm", "seed_data"])
    synth = [b for b in bodies if "assigned a" in b["messages"][-1]["content"] or "triple" in
             b["messages"][-1]["content"]]
    assert synth
    for b in synth:
        rf = b["response_format"]
        assert rf["type"] == "json_schema" and rf["json_schema"]["schema"]["additionalProperties"] is False
    brain = [b for b in bodies if b["messages"][-1]["content"].startswith("Brainstorm")]
    assert brain[0]["response_format"]["json_schema"]["schema"]["required"] == ["tasks"]


@pytest.mark.slow
def test_killed_mid_stage_then_rerun_no_dup_no_loss(ray_local, tmp_path, server, monkeypatch):
    from speed_ray.teacher import stages

    # defined here so Ray pickles it by value (workers cannot import this test module)
    class _CrashAfter:
        """Wraps a stage's finish fn: the writer fails once `n` answers were handled (a crash mid-stage)."""

        def __init__(self, finish, counter: str, n: int):
            self.finish, self.counter, self.n = finish, counter, n

        def __call__(self, row):
            seen = Path(self.counter).read_text().split() if Path(self.counter).exists() else []
            if len(seen) >= self.n and row["request_id"] not in seen:
                # (os._exit would be retried forever by Ray Data as a system failure; an error ends the run)
                raise RuntimeError("simulated crash mid-stage")
            if row["request_id"] not in seen:
                with open(self.counter, "a") as f:
                    f.write(row["request_id"] + "\n")
            return self.finish(row)

    cfg = make_cfg(tmp_path, server.base_url, seed_data={"n_samples": 32},
                   teacher={"shard_rows": 4, "request_batch_size": 4})
    run_pipeline(cfg, stages=["topics", "brainstorm"])
    out = stage_out(cfg, "seed_data")
    real = stages._finish_sample
    counter = str(tmp_path / "answered.txt")
    monkeypatch.setattr(stages, "_finish_sample", lambda *a: _CrashAfter(real(*a), counter, 12))
    with pytest.raises(StageError):
        run_pipeline(cfg, stages=["seed_data"])
    assert not out.done
    partial = all_request_ids(out)
    assert 0 < len(partial) < 32 and len(partial) == len(set(partial))
    monkeypatch.setattr(stages, "_finish_sample", real)
    server.reset_counts()
    run_pipeline(cfg, stages=["seed_data"])
    ids = all_request_ids(out)
    assert len(ids) == len(set(ids)) == 32 and set(partial) <= set(ids)
    assert out.manifest["answered"] == 32 and out.manifest["pending"] == 0
    assert server.total <= 32 - len(partial)          # written answers are never asked again


@pytest.mark.slow
def test_budget_cap_stops_then_rerun_completes(ray_local, tmp_path, server):
    cfg = make_cfg(tmp_path, server.base_url, seed_data={"n_samples": 24}, teacher={"cache": False})
    run_pipeline(cfg, stages=["topics", "brainstorm"])
    capped = make_cfg(tmp_path, server.base_url, seed_data={"n_samples": 24}, teacher={"cache": False,
                                                                                       "max_calls": 10})
    server.reset_counts()
    with pytest.raises(StageError, match="budget exhausted"):
        run_pipeline(capped, stages=["seed_data"])
    out = stage_out(cfg, "seed_data")
    assert not out.done and server.total == 10 and len(all_request_ids(out)) == 10
    server.reset_counts()
    run_pipeline(cfg, stages=["seed_data"])
    assert server.total == 14
    ids = all_request_ids(out)
    assert len(ids) == len(set(ids)) == 24

    finish = make_cfg(tmp_path / "b", server.base_url, seed_data={"n_samples": 24},
                      teacher={"max_calls": 30, "on_budget_exhausted": "finish"})
    summary = run_pipeline(finish, stages=["topics", "brainstorm", "seed_data"])
    man = stage_out(finish, "seed_data").manifest
    assert summary["stages"]["seed_data"]["state"] == "ran" and man["budget_exhausted"] and man["pending"] > 0


def _root_stage(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    root = store.stage("root_data", "fp")
    prompt = json.dumps([{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": "Write a sentence triple for the topic: Pets"}])
    good = [json.dumps({"S1": f"a{i}", "S2": f"b{i}", "S3": f"c{i}"}) for i in range(3)]
    rows = []
    for i in range(10):
        outputs = [good[0], "garbage"] if i % 5 else ["junk", "more junk"]      # 2 lists with no valid output
        if i == 3:
            outputs = [good[1]]                                                 # a list of one
        samples = [o if o.startswith("{") else "" for o in outputs]
        rows.append({"id": f"root{i}", "task_type": "sts", "task": "Retrieve semantically similar text.",
                     "prompt": prompt, "prompt_params": "{}", "outputs": outputs, "samples": samples,
                     "generator": "junior", "lineage": json.dumps({"topic": "Pets"})})
    root.write_shard("part-0", rows)
    return store, root


def test_judge_and_revise_signals(ray_local, tmp_path, server):
    store, root = _root_stage(tmp_path)
    cfg = make_cfg(tmp_path, server.base_url, revise_signals={"n_samples": 12})
    ctx = StageContext(cfg=cfg, name="judge", out=store.stage("judge", "fpj"), inputs={"root": root}, store=store,
                       run_name="t")
    from speed_ray.teacher.stages import judge_stage, revise_signals_stage

    m = judge_stage(ctx)
    assert m["requests"] == 10 and m["valid"] == 7
    assert m["reject_reasons"] == {"no_valid_output": 2, "too_few_outputs": 1}
    pairs = ctx.out.read_rows()
    assert all(p["chosen"].startswith("{") and p["rejected"] == "garbage" and p["best"] == 0 for p in pairs)
    assert ctx.ledger.calls == 7
    server.reset_counts()
    assert judge_stage(StageContext(cfg=cfg, name="judge", out=ctx.out, inputs={"root": root}, store=store,
                                    run_name="t"))["answered"] == 10
    assert server.total == 0                                                # nothing left to send

    rctx = StageContext(cfg=cfg, name="revise_signals", out=store.stage("revise_signals", "fpr"),
                        inputs={"root": root}, store=store, run_name="t")
    m = revise_signals_stage(rctx)
    assert m["requests"] == 12 and m["valid"] == 12
    rows = rctx.out.read_rows()
    assert len({(json.loads(r["lineage"])["root_id"], json.loads(r["lineage"])["root_index"]) for r in rows}) == 12
    assert len({json.loads(r["lineage"])["root_id"] for r in rows}) == 10          # one per list first
    assert all(json.loads(r["revised_text"])["S1"].startswith("a ") and r["reason"] for r in rows)


def garbage_responder(body: dict) -> str:
    """A teacher that answers most sample requests with garbage: prose for classification, a refusal for matching,
    the wrong keys for STS; retrieval samples and brainstorm lists stay good."""
    user = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
    if user.startswith("Brainstorm") or "retrieval task" in user:
        return responder(body)
    if "classification task" in user:
        return "Sure! Here is a great example of a classification sample for you."
    if "matching task" in user:
        return "I'm sorry, I can't help with that."
    return json.dumps({"sentence": "not the keys the parser wants"})


def test_teacher_answering_garbage_fails_loudly_keeps_shards_and_lower_floor_reuses_them(ray_local, tmp_path,
                                                                                          server):
    server.responder = garbage_responder
    cfg = make_cfg(tmp_path, server.base_url)          # seed_data: 40 samples, 12 of them retrieval
    with pytest.raises(StageError) as err:
        run_pipeline(cfg, stages=["topics", "brainstorm", "seed_data"])
    assert ("seed_data: 12 of 40 answered requests valid (30.0%, floor 50%); top reject reasons: "
            "missing_key:S1 12, no_json 12, refusal 4. Its shards are kept") in str(err.value)
    out = stage_out(cfg, "seed_data")
    assert stage_out(cfg, "brainstorm").done and not out.done
    assert out.num_rows() == 12 and rejects_output(out).num_rows() == 28

    lowered = make_cfg(tmp_path, server.base_url, teacher={"min_valid_share": 0.25})
    assert stage_out(lowered, "seed_data").url == out.url        # the floor is not part of the fingerprint
    server.reset_counts()
    summary = run_pipeline(lowered, stages=["seed_data"])
    assert summary["stages"]["seed_data"]["state"] == "ran" and out.done
    assert server.total == 0                                        # nothing asked again
    man = out.manifest
    assert man["valid"] == 12 and man["rejected"] == 28 and man["valid_share"] == 0.3
    assert man["min_valid_share"] == 0.25 and man["this_run"] == {}


@pytest.mark.parametrize("mode,want", [("none", None), ("json_object", {"type": "json_object"}),
                                       ("json_schema", "json_schema")])
def test_sample_requests_follow_json_mode(tmp_path, mode, want):
    """paper.yaml's json_mode: json_object must reach the seed-data requests too (it used to send nothing)."""
    import pyarrow as pa

    from speed_ray.teacher.stages import _sample_requests

    cfg = make_cfg(tmp_path, "http://127.0.0.1:1/v1", teacher={"json_mode": mode})
    tasks = [{"task_type": "retrieval", "task": "Find documents.", "topic": "Science", "lineage": "{}"}]
    rows = _sample_requests(cfg, tasks)(pa.table({"id": ["s-0"], "task_index": [0]})).to_pylist()
    rf = json.loads(rows[0]["response_format"]) if rows[0]["response_format"] else None
    if want == "json_schema":
        assert rf["type"] == "json_schema" and rf["json_schema"]["schema"]["type"] == "object"
    else:
        assert rf == want


def test_dollar_budget_stops_counts_earlier_runs_and_a_higher_one_completes(ray_local, tmp_path, server):
    """teacher.budget_usd caps the dollars of the run directory's teacher calls at the pricing section's prices:
    the stage stops cleanly with what it wrote kept, a rerun at the same cap counts what earlier runs paid (it
    does not spend the cap again), and a rerun with a higher cap sends only the missing requests."""
    from speed_ray.teacher.runner import written_ledger

    price = {"pricing": {"teacher_usd_per_mtok": {"fake-gpt": [1000.0, 1000.0]}}}   # about $0.5 a call
    base = dict(seed_data={"n_samples": 24}, **price)
    cfg = make_cfg(tmp_path, server.base_url, teacher={"cache": False, "sampling": {"max_tokens": 200}}, **base)
    run_pipeline(cfg, stages=["topics", "brainstorm"])
    out = stage_out(cfg, "seed_data")

    def spent() -> float:
        c = written_ledger(out)
        return (c["prompt_tokens"] + c["completion_tokens"]) * 1000.0 / 1e6

    bs = stage_out(cfg, "brainstorm").manifest["cost"]
    already = (bs["prompt_tokens"] + bs["completion_tokens"]) * 1000.0 / 1e6    # brainstorm's calls count too
    cap = round(already + 4.0, 2)
    capped = make_cfg(tmp_path, server.base_url, teacher={"cache": False, "sampling": {"max_tokens": 200},
                                                          "budget_usd": cap}, **base)
    server.reset_counts()
    with pytest.raises(StageError, match=rf"budget exhausted.*budget_usd={cap}"):
        run_pipeline(capped, stages=["seed_data"])
    first = server.total
    assert 0 < first < 24 and not out.done and len(all_request_ids(out)) == first
    assert 0 < spent() <= 4.0
    with pytest.raises(StageError, match="budget exhausted"):
        run_pipeline(capped, stages=["seed_data"])                  # the same cap: what was paid counts
    assert already + spent() <= cap and server.total < 24
    higher = make_cfg(tmp_path, server.base_url, teacher={"cache": False, "sampling": {"max_tokens": 200},
                                                          "budget_usd": 1000.0}, **base)
    before = server.total
    run_pipeline(higher, stages=["seed_data"])
    ids = all_request_ids(out)
    assert out.done and len(ids) == len(set(ids)) == 24 and server.total - before == 24 - before
    assert out.manifest["cost"]["calls"] == 24            # the stage's cost: every call it wrote, over all runs


def test_two_requests_with_one_prompt_are_two_samples(tmp_path):
    """A topic drawn twice (SPEED's 20K topics come from a taxonomy of a few hundred) gives the same brainstorm
    prompt twice. Without a seed both requests had one response-cache key, so the second got the first's answer:
    at paper scale 39% of brainstorm's calls were such repeats. Each request now carries a seed from the run seed and
    its id (the same on a rerun, so a resumed stage still finds its answers in the cache)."""
    import pyarrow as pa

    from speed_ray.llm.cache import ResponseCache
    from speed_ray.llm.rows import requests_from_batch
    from speed_ray.teacher.stages import _request

    msgs = [{"role": "user", "content": "Brainstorm a list of potentially useful text retrieval tasks for the "
                                        "topic: Cats."}]

    def ask(cfg):
        rows = [_request(cfg, rid, msgs, "brainstorm", None) for rid in ("bs-a", "bs-b")]
        reqs = requests_from_batch(pa.Table.from_pylist(rows), "request_id")
        return [ResponseCache.key_for("fake-gpt", r) for r in reqs], [r.seed for r in reqs]

    keys, seeds = ask(make_cfg(tmp_path, "http://127.0.0.1:1/v1"))
    assert keys[0] != keys[1] and None not in seeds and seeds[0] != seeds[1]
    assert ask(make_cfg(tmp_path, "http://127.0.0.1:1/v1")) == (keys, seeds)       # a rerun asks the same
    off_keys, off_seeds = ask(make_cfg(tmp_path, "http://127.0.0.1:1/v1", teacher={"seed_requests": False}))
    assert off_keys[0] == off_keys[1] and off_seeds == [None, None]
