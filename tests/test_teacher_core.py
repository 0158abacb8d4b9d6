"""Teacher pure core: topics, prompts, schemas, parsing, sample rows, mixtures (no Ray, no HTTP)."""

from __future__ import annotations

import collections
import json
import random

import pytest

from speed_ray.config import ConfigError
from speed_ray.synth import prompts, schemas
from speed_ray.synth.mixture import allocate, normalize_mixture
from speed_ray.synth.parsing import (ParseError, extract_json, parse_judge, parse_revision, parse_sample,
                                       parse_task_list, sample_texts)
from speed_ray.synth.samples import lineage_extend, sample_row, stable_id
from speed_ray.teacher.taxonomy import load_taxonomy, odp_paths, with_ancestors
from speed_ray.teacher.topics import sample_topics, truncate_topic

RETRIEVAL = {"user_query": "best golf clubs", "positive_document": "A guide to golf clubs ...",
             "hard_negative_document": "Tennis rackets reviewed ..."}


# ---- topics -------------------------------------------------------------------------------------------------
def test_truncate_topic_paper_example():
    assert truncate_topic("Arts/Movies/Titles/3/36_Hours_-_1964/Cast_and_Crew") == \
        "Arts/Movies/36_Hours_-_1964/Cast_and_Crew"
    assert truncate_topic("Arts/Movies/Titles") == "Arts/Movies/Titles"
    assert truncate_topic("A/B/C/D") == "A/B/C/D"
    assert truncate_topic("A/B/C/D/E", max_depth=3) == "A/B/E"


def test_iab_taxonomy_all_tiers():
    nodes = load_taxonomy("iab")
    assert len(nodes) > 500
    depths = collections.Counter(n.count("/") + 1 for n in nodes)
    assert depths[1] > 20 and depths[2] > 100 and depths[4] > 10   # every tier, not just leaves
    assert all("//" not in n and not n.endswith("/") for n in nodes)


def test_sample_topics_balanced_multi_grained_and_seeded():
    nodes = load_taxonomy("iab")
    rows = sample_topics(nodes, 200, seed=7)
    counts = collections.Counter(r["top_level"] for r in rows)
    sizes = collections.Counter(n.split("/")[0] for n in nodes)
    # max-min fair: a category below the max count was exhausted
    top = max(counts.values())
    assert all(counts[c] >= top - 1 or counts[c] == sizes[c] for c in sizes)
    assert len({r["topic"] for r in rows}) == 200
    assert len({r["topic"].count("/") for r in rows}) >= 3            # several depths
    assert rows == sample_topics(nodes, 200, seed=7)
    assert rows != sample_topics(nodes, 200, seed=8)
    lin = json.loads(rows[0]["lineage"])
    assert lin["topic"] == rows[0]["topic"] and "raw_topic" in lin


def test_sample_topics_truncates_and_repeats_rounds():
    nodes = with_ancestors(["Arts/Movies/Titles/3/36_Hours_-_1964/Cast_and_Crew", "Sports/Golf"])
    rows = sample_topics(nodes, 20, seed=0, max_depth=4)
    assert "Arts/Movies/36_Hours_-_1964/Cast_and_Crew" in {r["topic"] for r in rows}
    assert all(r["topic"].count("/") <= 3 for r in rows)
    assert len({r["id"] for r in rows}) == 20                       # later rounds get their own ids
    raw = {r["topic"]: r["raw_topic"] for r in rows}
    assert raw["Arts/Movies/36_Hours_-_1964/Cast_and_Crew"] == "Arts/Movies/Titles/3/36_Hours_-_1964/Cast_and_Crew"


def test_odp_list_and_rdf(tmp_path):
    lst = tmp_path / "odp.txt"
    lst.write_text("Top/Arts/Movies\nTop/Sports/Golf/Courses\n\n# comment\n")
    assert odp_paths(str(lst)) == ["Arts/Movies", "Sports/Golf/Courses"]
    rdf = tmp_path / "structure.rdf.u8"
    rdf.write_text('<?xml version="1.0"?>\n<RDF>\n<Topic r:id="Top">\n</Topic>\n<Topic r:id="Top/Arts/Movies">\n'
                   '<catid>2</catid></Topic><Topic r:id="Top/Science/Biology">\n</Topic>\n</RDF>\n')
    assert odp_paths(str(rdf)) == ["Arts/Movies", "Science/Biology"]
    assert "Science" in load_taxonomy("odp", str(rdf))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no category paths"):
        odp_paths(str(tmp_path / "empty.txt"))


# ---- prompts ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tt", ["retrieval", "classification", "matching_short", "matching_long"])
def test_brainstorm_prompts_are_topic_conditioned(tt):
    msgs = prompts.brainstorm_messages(tt, "Sports/Golf", 5, random.Random(0))
    assert msgs[0]["role"] == "system" and msgs[1]["role"] == "user"
    assert "for the topic: Sports/Golf" in msgs[1]["content"]
    assert "python list of strings only, with about 5 elements" in msgs[1]["content"]
    if tt == "retrieval":
        assert msgs[1]["content"].startswith(
            "Brainstorm a list of potentially useful text retrieval tasks for the topic: Sports/Golf.")


def test_brainstorm_fixed_types_raise():
    with pytest.raises(ValueError, match="no brainstormed tasks"):
        prompts.brainstorm_messages("sts", "x", 5)


def test_synthesis_slots_recorded_and_seeded():
    msgs, p = prompts.synthesis_messages("retrieval", "Find golf course reviews.", random.Random(3))
    text = msgs[1]["content"]
    assert text.startswith("You have been assigned a retrieval task: Find golf course reviews.")
    for k in ("query_type", "query_length", "clarity", "num_words", "difficulty"):
        assert k in p
    assert f'The "user_query" should be {p["query_type"]}, {p["query_length"]}, {p["clarity"]}' in text
    assert f"at least {p['num_words']} words long" in text
    assert (f"require {p['difficulty']} level education" in text) == p["with_difficulty"]
    assert (msgs, p) == prompts.synthesis_messages("retrieval", "Find golf course reviews.", random.Random(3))
    seen = {prompts.synthesis_messages("retrieval", "t", random.Random(i))[1]["query_type"] for i in range(50)}
    assert seen == {"extremely long-tail", "long-tail", "common"}


def test_sts_prompt_topic_and_scores():
    for i in range(30):
        msgs, p = prompts.synthesis_messages("sts", prompts.FIXED_TASKS["sts"], random.Random(i), topic="Pets/Dogs")
        text = msgs[1]["content"]
        assert p["unit"] in ("sentence", "phrase", "passage") and p["high_score"] in (4, 4.5, 5)
        assert p["low_score"] in (2.5, 3, 3.5)
        assert text.startswith(f"Write a {p['unit']} triple for the topic: Pets/Dogs with varying semantic")
        assert f"between S1 and S2 should be {p['high_score']}." in text
        assert p["topic"] == "Pets/Dogs"


def test_classification_matching_bitext_prompts():
    m, p = prompts.synthesis_messages("classification", "Classify tee times.", random.Random(0))
    assert '"misleading_label"' in m[1]["content"] and "num_words" in p
    m, p = prompts.synthesis_messages("matching_long", "Match briefs.", random.Random(0))
    assert "long documents (at least 300 words)" in m[1]["content"]
    m, p = prompts.synthesis_messages("bitext", prompts.FIXED_TASKS["bitext"], random.Random(0), topic="Travel")
    assert p["src_lang"] != p["tgt_lang"] and "translation quality" in m[1]["content"]


def test_judge_and_revise_prompts_verbatim():
    data = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "WRITE IT"}]
    j = prompts.judge_messages(json.dumps(data), ["a", "b"])[1]["content"]
    assert j.startswith("A language model has been given a prompt: WRITE IT\n\nThe output list of it is: ['a', 'b']")
    assert "Your mission is to judge which data this language model generate fits the prompt most" in j
    assert "(indice start from 0)" in j
    r = prompts.revise_messages(data, '{"x": 1}')[1]["content"]
    assert "The output generated by the model is: {\"x\": 1}" in r and "1. Relevance:" in r and '"revision"' in r
    rv = prompts.revisor_messages(data, "{}")[1]["content"]
    assert "revised JSON object only" in rv and '"reason"' not in rv


# ---- schemas ------------------------------------------------------------------------------------------------
def test_sample_schema_shape():
    s = schemas.sample_schema("retrieval")
    assert s["required"] == ["user_query", "positive_document", "hard_negative_document"]
    assert s["additionalProperties"] is False and s["properties"]["user_query"]["minLength"] == 1
    assert schemas.sample_schema("matching_short")["required"] == ["input", "positive_document"]
    assert schemas.JUDGE_SCHEMA["required"] == ["reason", "best", "worst"]
    rf = schemas.response_format("json_schema", "retrieval_sample", s)
    assert rf == {"type": "json_schema", "json_schema": {"name": "retrieval_sample", "schema": s}}
    assert schemas.response_format("json_object", "b", schemas.BRAINSTORM_LIST_SCHEMA) is None
    assert schemas.response_format("none", "x", s) is None
    with pytest.raises(ValueError):
        schemas.sample_schema("nope")


def test_schema_validates_with_xgrammar():
    xgr = pytest.importorskip("xgrammar")
    # the schemas we send must compile for constrained decoding
    for tt in schemas.SAMPLE_KEYS:
        xgr.Grammar.from_json_schema(json.dumps(schemas.sample_schema(tt)))
    xgr.Grammar.from_json_schema(json.dumps(schemas.JUDGE_SCHEMA))
    xgr.Grammar.from_json_schema(json.dumps(schemas.revise_schema("sts")))
    xgr.Grammar.from_json_schema(json.dumps(schemas.BRAINSTORM_SCHEMA))


def test_judge_schema_admits_only_distinct_in_range_indices():
    """A small constrained judge otherwise answers best == worst (no DPO pair): the schema rules it out."""
    xgr = pytest.importorskip("xgrammar")
    from xgrammar.testing import _is_grammar_accept_string as accepts

    g = xgr.Grammar.from_json_schema(json.dumps(schemas.judge_schema(3)), any_whitespace=False)
    answer = lambda b, w: json.dumps({"reason": "r", "best": b, "worst": w})  # noqa: E731
    assert all(accepts(g, answer(b, w)) for b in range(3) for w in range(3) if b != w)
    assert not any(accepts(g, answer(i, i)) for i in range(3))
    assert not accepts(g, answer(3, 0)) and not accepts(g, answer(0, -1))
    assert not accepts(g, json.dumps({"best": 0, "worst": 1, "reason": "r"}))     # App. C.2 key order
    assert not accepts(g, answer(0, 1).replace('"r"', '"' + "x" * (schemas.REASON_MAX_CHARS + 1) + '"'))
    one = xgr.Grammar.from_json_schema(json.dumps(schemas.judge_schema(1)), any_whitespace=False)
    assert accepts(one, answer(0, 0))        # a one-output list still parses (the stage rejects it as no pair)


# ---- parsing ------------------------------------------------------------------------------------------------
def test_extract_json_tolerates_fences_prose_trailing_commas():
    assert extract_json('```json\n{"a": 1}\n```') == {"a": 1}
    assert extract_json('Sure! Here it is:\n{"a": "b"}\nHope that helps.') == {"a": "b"}
    assert extract_json('{"a": [1, 2,], "b": {"c": 3,},}') == {"a": [1, 2], "b": {"c": 3}}
    assert extract_json("['task one', \"task two\"]") == ["task one", "task two"]
    assert extract_json('{"a": "it\'s {tricky}, really"}') == {"a": "it's {tricky}, really"}
    assert extract_json('{"a": 1} {"b": 2}') == {"a": 1}


@pytest.mark.parametrize("text,reason", [
    ("", "empty_output"), ("   ", "empty_output"), ("no braces here", "no_json"),
    ('{"user_query": "q", "positive_document": "p', "truncated"), ('```json\n{"a": [1, 2', "truncated"),
    ("{'a': nope}", "invalid_json"), ("I'm sorry, I can't help with that.", "refusal"),
])
def test_extract_json_reasons(text, reason):
    with pytest.raises(ParseError) as e:
        extract_json(text)
    assert e.value.reason == reason


@pytest.mark.parametrize("obj,reason", [
    ({"positive_document": "p", "hard_negative_document": "n"}, "missing_key:user_query"),
    ({**RETRIEVAL, "user_query": "  "}, "empty:user_query"),
    ({**RETRIEVAL, "user_query": ["x"]}, "wrong_type:user_query"),
    ({**RETRIEVAL, "hard_negative_document": " a guide to  GOLF clubs ... "}, "positive_equals_negative"),
    ({**RETRIEVAL, "positive_document": "x" * 30}, "too_long:positive_document"),
    ([RETRIEVAL, RETRIEVAL], "not_object"),
])
def test_parse_sample_reasons(obj, reason):
    p = parse_sample(json.dumps(obj), "retrieval", max_chars=28)
    assert not p.ok and p.reason == reason and p.sample is None


def test_parse_sample_ok_and_triples():
    p = parse_sample("```json\n" + json.dumps({**RETRIEVAL, "extra": 1}) + "\n```", "retrieval")
    assert p.ok and p.sample == RETRIEVAL and list(p.sample) == list(RETRIEVAL)
    assert (p.query, p.positive, p.negative) == tuple(RETRIEVAL.values())
    assert parse_sample('{"input_text": "Great clubs", "label": 5, "misleading_label": "4"}', "classification").ok
    assert sample_texts("classification", {"input_text": "t", "label": "l", "misleading_label": "m"}) == ("t", "l", "m")
    assert sample_texts("sts", {"S1": "a", "S2": "b", "S3": "c"}) == ("a", "b", "c")
    assert sample_texts("matching_short", {"input": "a", "positive_document": "b"}) == ("a", "b", "")
    assert parse_sample("I cannot do that.", "sts").reason == "refusal"
    assert parse_sample('{"S1": "a b", "S2": "a b", "S3": "c"}', "sts").reason == "query_equals_positive"


def test_parse_judge_edge_cases():
    assert parse_judge('{"reason": "r", "best": 2, "worst": 0}', 3) == (2, 0, "r")
    assert parse_judge('```json\n{"reason": "r", "best": "1", "worst": 0.0}\n```', 2) == (1, 0, "r")
    for text, reason in [('{"best": 3, "worst": 0}', "out_of_range:best"), ('{"best": 1, "worst": -1}',
                         "out_of_range:worst"), ('{"best": 1, "worst": 1}', "best_equals_worst"),
                         ('{"worst": 1}', "missing_key:best"), ('{"best": true, "worst": 0}', "wrong_type:best"),
                         ('{"best": "first", "worst": 0}', "wrong_type:best"), ("[1, 2]", "not_object"),
                         ('{"best": 1, "worst', "truncated")]:
        with pytest.raises(ParseError) as e:
            parse_judge(text, 3)
        assert e.value.reason == reason, text
    with pytest.raises(ValueError):
        parse_judge('{"best": 0, "worst": 1}', 1)


def test_parse_revision_object_or_string():
    s = {"S1": "a", "S2": "b", "S3": "c"}
    p = parse_revision(json.dumps({"reason": "fine", "revision": s}), "sts")
    assert p.ok and p.sample == s and p.explanation == "fine"
    p = parse_revision(json.dumps({"reason": "fine", "revision": json.dumps(s)}), "sts")
    assert p.ok and p.sample == s
    assert parse_revision(json.dumps({"reason": "x"}), "sts").reason == "missing_key:revision"
    assert parse_revision(json.dumps({"reason": "x", "revision": "no json"}), "sts").reason == "revision_no_json"
    assert parse_revision(json.dumps({"reason": "x", "revision": {"S1": "a"}}), "sts").reason == "missing_key:S2"


def test_parse_task_list_normalizes_and_dedupes():
    text = ('["1. Retrieve  golf course\\nreviews.", "- retrieve golf course reviews.", "2) Classify swings.", '
            '"", 3]')
    assert parse_task_list(text) == ["Retrieve golf course reviews.", "Classify swings."]
    assert parse_task_list('{"tasks": ["a task"]}') == ["a task"]
    assert parse_task_list("Here:\n- First task.\n* Second task.\n") == ["First task.", "Second task."]
    with pytest.raises(ParseError):
        parse_task_list("nothing useful")


# ---- samples ------------------------------------------------------------------------------------------------
def test_sample_row_and_lineage():
    base = {"id": "s1", "task_type": "retrieval", "task": "Find clubs.", "prompt": [{"role": "user", "content": "x"}],
            "prompt_params": {"num_words": 50}, "lineage": json.dumps({"topic": "Sports/Golf"})}
    row = sample_row(base, json.dumps(RETRIEVAL), "retrieval", "teacher:gpt")
    assert row["valid"] and row["reject_reason"] == "" and json.loads(row["sample"]) == RETRIEVAL
    assert json.loads(row["prompt"])[0]["content"] == "x" and json.loads(row["prompt_params"]) == {"num_words": 50}
    lin = json.loads(row["lineage"])
    assert lin == {"topic": "Sports/Golf", "generator": "teacher:gpt"}
    bad = sample_row(base, "oops", "retrieval", "teacher:gpt")
    assert not bad["valid"] and bad["reject_reason"] == "no_json" and bad["sample"] == "" and bad["text"] == "oops"
    grown = json.loads(lineage_extend(row["lineage"], generator="revisor", revision=True))
    assert grown["generator"] == "revisor" and grown["generator@prev"] == "teacher:gpt" and grown["topic"]
    assert stable_id("a", 1) == stable_id("a", 1) != stable_id("a", "1")


# ---- mixtures -----------------------------------------------------------------------------------------------
def test_mixtures():
    speed = normalize_mixture({"classification": 7, "sts": 7, "retrieval": 7, "matching": 2})
    assert speed["matching_short"] == pytest.approx(1 / 23) and speed["retrieval"] == pytest.approx(7 / 23)
    seed002 = normalize_mixture({"short-short": 1, "short-long": 1, "long-short": 1, "long-long": 1, "bitext": 1,
                                 "sts": 1})
    assert set(seed002) == {"matching_short", "retrieval", "classification", "matching_long", "bitext", "sts"}
    counts = allocate(25000, speed)
    assert sum(counts.values()) == 25000 and counts["sts"] in (7608, 7609)
    with pytest.raises(ConfigError, match="unknown task type"):
        normalize_mixture({"poems": 1})


def test_brainstormed_tasks_without_words_are_dropped_before_any_data_is_made_for_them():
    text = '[",]{", "x@y.com", "Retrieve golf course reviews.", "Classify"]'
    assert parse_task_list(text) == [",]{", "x@y.com", "Retrieve golf course reviews.", "Classify"]
    assert parse_task_list(text, min_words=2) == ["Retrieve golf course reviews."]
    with pytest.raises(ParseError, match="degenerate_tasks"):
        parse_task_list('[",]{", "https://example.com/a"]', min_words=2)
    from speed_ray.teacher.stages import _finish_brainstorm

    row = {"text": '[",]{", "Find recipes for bread."]', "request_id": "r", "topic": "food", "task_type": "retrieval",
           "lineage": "{}"}
    kept, rejects = _finish_brainstorm(1, "teacher", 2)(row)
    assert [k["task"] for k in kept] == ["Find recipes for bread."] and not rejects
    kept, rejects = _finish_brainstorm(1, "teacher", 2)(dict(row, text='[",]{"]'))
    assert not kept and rejects[0]["reject_reason"] == "degenerate_tasks"
