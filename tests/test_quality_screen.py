"""The screen stage: guide scores and the false-negative verdict, decontamination, and the stage on local Ray."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from speed_ray.quality.decontam import build_index, check_texts, row_hits
from speed_ray.quality.scores import false_negative, quantiles, remine, summarize

EVAL = {"TaskA": ["A man is playing a large guitar on the stage tonight.",
                  "The committee approved the budget for the new library building after a long debate."],
        "TaskB": ["How do I reset the PIN of my debit card?"]}


# ---- pure scores --------------------------------------------------------------------------------------------
def test_false_negative_is_within_margin_or_above_and_never_without_a_negative():
    pos = np.array([0.8, 0.8, 0.8, 0.8])
    neg = np.array([0.5, 0.76, 0.9, np.nan])
    assert false_negative(pos, neg, 0.05).tolist() == [False, True, True, False]
    assert false_negative(pos, neg, 0.0).tolist() == [False, False, True, False]


def test_remine_takes_the_hardest_allowed_candidate_below_the_margin():
    pos = np.array([0.9, 0.5])
    cand = np.array([[0.9, 0.95, 0.7, 0.6],
                     [0.2, 0.5, 0.48, 0.1]])
    allowed = np.array([[False, True, True, True], [True, False, True, True]])
    # row 0: 0.95 is above its positive, 0.7 is the hardest below 0.9 - 0.1; row 1: 0.48 is within the margin
    assert remine(pos, cand, allowed, 0.1).tolist() == [2, 0]
    assert remine(pos, cand, allowed, 0.1, (1, 2)).tolist() == [3, 3]
    assert remine(pos, cand, allowed, 0.1, (2, 3)).tolist() == [-1, -1]


def test_summary_has_quantiles_per_task_type():
    s = summarize(["a", "a", "b"], {"guide_pos_score": [0.1, 0.3, 0.9], "guide_margin": [None, 0.2, 0.4]})
    assert s["all"]["rows"] == 3 and s["by_task_type"]["a"]["rows"] == 2
    assert s["by_task_type"]["a"]["guide_pos_score"]["p50"] == pytest.approx(0.2)
    assert s["by_task_type"]["a"]["guide_margin"] == quantiles([0.2])
    assert s["by_task_type"]["b"]["guide_pos_score"]["p05"] == pytest.approx(0.9)
    assert quantiles([])["n"] == 0 and quantiles([])["p50"] is None


# ---- decontamination ----------------------------------------------------------------------------------------
def test_decontamination_finds_copies_edits_and_containment_not_clean_text():
    idx = build_index(EVAL, ngram=8, shingle=1, bands=16, rows=8)
    texts = [
        "a man is playing a large guitar on the stage tonight",                      # case / punctuation
        "A man is playing a large guitar on stage tonight.",                          # one word dropped
        "Minutes: the committee approved the budget for the new library building after a long debate, "
        "then adjourned until spring, when the roof repairs come up again.",          # contained in a longer doc
        "how do i reset the pin of my debit card",
        "Photosynthesis converts light energy into chemical energy stored in glucose.",   # clean
        "A woman is slicing an onion in the kitchen.",                                   # clean
        "",
    ]
    hits = check_texts(idx, texts, ngram_threshold=0.5, minhash_threshold=0.7)
    assert [h and h["task"] for h in hits] == ["TaskA", "TaskA", "TaskA", "TaskB", None, None, None]
    assert hits[2]["method"] == "ngram" and hits[2]["text"] == EVAL["TaskA"][1]
    assert hits[1]["method"] == "minhash" and 0.7 <= hits[1]["score"] < 1
    rows = row_hits(idx, {"query": ["clean query here", "x"], "positive": ["clean doc", texts[3]],
                          "negative": [texts[0], None]}, ("query", "positive", "negative"), 0.5, 0.7)
    assert rows[0]["field"] == "negative" and rows[1]["field"] == "positive" and rows[1]["task"] == "TaskB"


def test_a_question_sharing_only_its_opening_words_is_not_contamination():
    """Two questions that share their first 8 words ask different things; at a share of 0.5 the 10-word one counted
    as a copy of the evaluation question (half its 8-grams). Quoting the evaluation question whole still is one."""
    from speed_ray.quality.config import ScreenConfig

    c = ScreenConfig()
    idx = build_index({"Banking77": ["Is there a limit on how much I can withdraw from my account without being "
                                     "charged?"]}, ngram=c.decontam_ngram, shingle=c.decontam_shingle,
                      min_ngram=c.decontam_min_ngram)
    hits = check_texts(idx, ["Is there a limit on how much I can top up?",
                             "Customers ask: is there a limit on how much I can withdraw from my account without "
                             "being charged? The answer depends on the plan."],
                       c.decontam_ngram_threshold, c.decontam_minhash_threshold)
    assert hits[0] is None
    assert hits[1] is not None and hits[1]["method"] == "ngram" and hits[1]["score"] == 1.0


def test_empty_index_finds_nothing():
    assert check_texts(build_index({}), ["anything at all"], 0.5, 0.7) == [None]


# ---- the guide ------------------------------------------------------------------------------------------------
TASK = "Given a question, retrieve a passage that answers it"


def _cols():
    return {"id": ["r0", "r1", "r2", "r3"], "task": [TASK] * 4, "task_type": ["qa"] * 4,
            "query": ["how do I bake sourdough bread at home",
                      "what causes the northern lights",
                      "how do vaccines train the immune system",
                      "why is the sky blue"],
            "positive": ["Sourdough is baked by feeding a starter, mixing dough, proofing overnight and baking hot.",
                         "Auroras happen when charged solar particles hit gases in the upper atmosphere.",
                         "Vaccines expose the immune system to a harmless antigen so it builds memory cells.",
                         "Air molecules scatter short blue wavelengths of sunlight more than red ones."],
            "negative": ["To bake sourdough bread at home, feed a starter, mix the dough, proof it overnight "
                         "and bake it in a hot oven.",                              # a paraphrase: false negative
                         "Volcanic eruptions release ash and sulfur dioxide into the stratosphere.",
                         "Antibiotics kill bacteria but have no effect on viruses.",
                         None]}


@pytest.fixture(scope="module")
def guide(minilm):
    from speed_ray.quality.guide import Guide

    return Guide(minilm, "bi_encoder", 128, threads=1)


@pytest.mark.parametrize("action", ["drop", "remove_negative", "remine"])
def test_screen_batch_flags_a_paraphrased_negative(guide, action):
    from speed_ray.quality.screen import ScreenSettings, screen_batch

    v = screen_batch(_cols(), guide, None, ScreenSettings(margin=0.05, action=action))
    assert v["pos"][0] is not None and v["pos"][3] is not None and v["neg"][3] is None
    assert v["margin"][1] == pytest.approx(v["pos"][1] - v["neg"][1])
    assert v["reason"][1:] == [None, None, None] and v["negative"][1:] == _cols()["negative"][1:]
    fn = v["detail"][0]["false_negative"]
    assert fn["neg_score"] > fn["pos_score"] - 0.05 and fn["negative"] == _cols()["negative"][0]
    if action == "drop":
        assert v["reason"][0] == "false_negative"
    elif action == "remove_negative":
        assert v["reason"][0] is None and v["negative"][0] == "" and v["neg"][0] is None
        assert fn["action"] == "removed_negative"
    else:   # another row's positive, scored below the positive by at least the margin
        assert v["reason"][0] is None and fn["action"] == "remined"
        assert v["negative"][0] in _cols()["positive"][1:] and v["neg"][0] <= v["pos"][0] - 0.05


def test_the_default_action_keeps_a_false_negatives_row_as_a_pair(guide):
    """Dropping a flagged triple throws away its query and positive, which the screen does not doubt: on STS-B,
    dropping exactly the planted 30% scored 1.3 points under clean data (benchmarks/screen_training_effect.py
    --oracle). By default the row stays, as a pair, and the lineage says so; the config and the settings agree."""
    from speed_ray.quality.config import ScreenConfig
    from speed_ray.quality.screen import ScreenSettings, screen_batch

    assert ScreenConfig().action == ScreenSettings().action == "remove_negative"
    v = screen_batch(_cols(), guide, None, ScreenSettings(margin=0.05))
    assert v["reason"] == [None] * 4 and v["negative"][0] == "" and v["negative"][1:] == _cols()["negative"][1:]
    assert v["detail"][0]["false_negative"]["action"] == "removed_negative"
    assert v["neg"][0] is None and v["margin"][0] is None and v["pos"][0] is not None


def test_cross_encoder_guide_scores_pairs(minilm):
    from speed_ray.quality.guide import Guide
    from speed_ray.quality.screen import ScreenSettings, screen_batch

    ce = Guide(minilm, "cross_encoder", 64, threads=1)   # an untrained head: only the plumbing is checked
    v = screen_batch(_cols(), ce, None, ScreenSettings(margin=1e6, action="drop"))   # every triple is within the margin
    assert v["reason"] == ["false_negative"] * 3 + [None]
    assert all(isinstance(x, float) for x in v["pos"]) and v["neg"][3] is None


# ---- the stage on local Ray -----------------------------------------------------------------------------------
def _stage_ctx(tmp_path, rows, **screen_kw):
    from speed_ray.quality.config import ScreenConfig
    from speed_ray.run_config import build_config
    from speed_ray.stage import StageContext
    from speed_ray.store import RunStore

    (tmp_path / "eval").mkdir(parents=True, exist_ok=True)
    (tmp_path / "eval" / "pairs.tsv").write_text("".join(f"{a}\t{b}\t3.0\n" for a, b in
                                                         zip(EVAL["TaskA"], EVAL["TaskB"] * 2)))
    (tmp_path / "mini.yaml").write_text(
        "name: MiniSTS\ntype: sts\nsplit: test\nfiles: [pairs.tsv]\n"
        "format: {delimiter: \"\\t\", header: false, quoting: none}\n"
        "columns: {sentence1: 0, sentence2: 1, score: 2}\nscore_range: [0, 5]\n")
    store = RunStore(str(tmp_path / "run"))
    src = store.stage("dedup", "fp-in")
    for k in range(0, len(rows), 8):
        src.write_shard(f"in-{k:04d}", rows[k:k + 8])
    cfg = build_config({"embedder": {"base_model": "offline:minilm"},
                        "evaluate": {"local_tasks": [str(tmp_path / "mini.yaml")],
                                     "data_root": str(tmp_path / "eval")}})
    cfg = dataclasses.replace(cfg, screen=ScreenConfig(batch_size=8, cpus_per_actor=0.5, **screen_kw))
    return StageContext(cfg=cfg, name="screen", out=store.stage("screen", "fp-out"), inputs={"samples": src},
                        store=store, run_name="t")


def _stage_rows():
    base = _cols()
    rows = []
    for k in range(4):   # 16 rows: the 4 samples of _cols with distinct ids and a topic word each
        for i in range(4):
            rows.append({"id": f"r{k}{i}", "task": TASK, "task_type": "qa" if k < 2 else "sts",
                         "query": f"{base['query'][i]} ({k})", "positive": base["positive"][i],
                         "negative": base["negative"][i], "lineage": json.dumps({"topic": f"t{k}"}),
                         "dedup_cluster": f"r{k}{i}"})
    rows.append(dict(rows[1], id="c0", query=EVAL["TaskB"][0].lower()))                  # contaminated query
    rows.append(dict(rows[2], id="c1", positive="Notes. " + EVAL["TaskA"][1] + " More."))   # contaminated doc
    return rows


def test_screen_stage_end_to_end(ray_local, tmp_path):
    from speed_ray.store import shards_at

    rows = _stage_rows()
    ctx = _stage_ctx(tmp_path, rows, action="drop")
    from speed_ray.quality.stage import screen_stage

    extra = screen_stage(ctx)
    kept, removed = ctx.out.read_table(), shards_at(ctx.out, "removed").read_table()
    assert sorted(kept.column("id").to_pylist() + removed.column("id").to_pylist()) == sorted(r["id"] for r in rows)
    why = dict(zip(removed.column("id").to_pylist(), removed.column("removed_reason").to_pylist()))
    assert why == {"c0": "contaminated", "c1": "contaminated", **{f"r{k}0": "false_negative" for k in range(4)}}
    detail = {i: json.loads(d) for i, d in zip(removed.column("id").to_pylist(),
                                               removed.column("removed_detail").to_pylist())}
    assert detail["c0"]["contaminated"]["task"] == "MiniSTS" and detail["c0"]["contaminated"]["field"] == "query"
    assert detail["c1"]["contaminated"]["text"] == EVAL["TaskA"][1]
    fn = detail["r00"]["false_negative"]
    assert fn["neg_score"] > fn["pos_score"] - 0.05
    s = extra["screen"]
    assert s["rows_in"] == len(rows) and s["rows_out"] == kept.num_rows == 12
    assert s["removed"] == {"contaminated": 2, "false_negative": 4}
    assert s["decontamination"]["hits_by_task"] == {"MiniSTS": 2} and s["guide"] == "offline:minilm"
    # scores: columns on every kept row, in the lineage, and summarized per task type
    by_id = {r["id"]: r for r in kept.to_pylist()}
    assert all(r["guide_pos_score"] is not None for r in by_id.values())
    assert by_id["r03"]["guide_neg_score"] is None and by_id["r01"]["guide_margin"] == pytest.approx(
        by_id["r01"]["guide_pos_score"] - by_id["r01"]["guide_neg_score"])
    lin = json.loads(by_id["r01"]["lineage"])
    assert lin["topic"] == "t0" and lin["screen"]["pos"] == pytest.approx(by_id["r01"]["guide_pos_score"])
    q = extra["quality"]
    assert q["all"]["rows"] == 12 and set(q["by_task_type"]) == {"qa", "sts"}
    assert q["by_task_type"]["qa"]["guide_margin"]["n"] == 4 and q["by_task_type"]["qa"]["rows"] == 6
    assert q["all"]["guide_pos_score"]["p05"] <= q["all"]["guide_pos_score"]["p50"] <= q["all"]["guide_pos_score"]["p95"]


@pytest.mark.slow
def test_screen_stage_keeping_nothing_is_an_error_and_pairs_are_kept(ray_local, tmp_path):
    from speed_ray.errors import DataError
    from speed_ray.quality.stage import screen_stage
    from speed_ray.store import shards_at

    rows = [r for r in _stage_rows() if r["negative"]]
    ctx = _stage_ctx(tmp_path / "a", rows, margin=10.0, margin_min_similarity=None,   # every negative within
                    decontaminate=False, action="drop")                                 # the margin
    with pytest.raises(DataError, match=r"screen kept none of the 14 rows.*false_negative: 14"):
        screen_stage(ctx)
    assert shards_at(ctx.out, "removed").num_rows() == 14    # what was written stays
    ctx = _stage_ctx(tmp_path / "b", rows, margin=10.0, margin_min_similarity=None, decontaminate=False,
                    action="remove_negative")
    extra = screen_stage(ctx)
    kept = ctx.out.read_table()
    assert kept.num_rows == 14 and set(kept.column("negative").to_pylist()) == {""}
    assert extra["screen"]["actions"] == {"removed_negative": 14} and extra["screen"]["decontamination"] == {
        "enabled": False}


def test_restates_marks_negatives_close_to_their_positive():
    from speed_ray.quality.scores import restates

    assert restates(np.array([0.95, 0.5, np.nan]), 0.8).tolist() == [True, False, False]
    assert restates(np.array([0.95]), None).tolist() == [False]


def test_a_negative_restating_its_positive_is_a_false_negative(guide):
    """The query-side margin misses a near-copy of the positive when the guide scores both low; the positive-side
    rule catches it, and the lineage says which rule did."""
    from speed_ray.quality.screen import ScreenSettings, screen_batch

    cols = {"id": ["a", "b"], "task": ["", ""], "task_type": ["retrieval"] * 2,
            "query": ["quarterly tax filing deadlines", "quarterly tax filing deadlines"],
            "positive": ["Barn owls hunt small rodents at night by sound alone.",
                         "Barn owls hunt small rodents at night by sound alone."],
            "negative": ["barn owls hunt small rodents at night by sound alone",
                         "The stock market closed higher on Friday."]}
    # the copy rule (a lexical near-copy, tested below) is off: this test is about the guide's rule
    off = screen_batch(cols, guide, None, ScreenSettings(margin=-1.0, restates=None, copies_max_dropped=None))
    assert off["reason"] == [None, None]                                                   # neither rule can fire
    v = screen_batch(cols, guide, None, ScreenSettings(margin=-1.0, restates=0.8, copies_max_dropped=None, action="drop"))
    assert v["reason"] == ["false_negative", None]
    fn = v["detail"][0]["false_negative"]
    assert fn["rule"] == "restates_positive" and fn["pos_neg_score"] >= 0.8


def test_a_short_evaluation_text_quoted_whole_is_contamination():
    """An STS or intent sentence is shorter than the 8-word n-grams: it is indexed whole (down to min_ngram words),
    so quoting it inside a longer synthetic document is caught; a shorter one is left to MinHash."""
    from speed_ray.quality.decontam import build_index, check_texts

    ev = {"STSBenchmark": ["A person is slicing some garlic.", "Dogs bark."]}
    quoted = 'Cooking tips for beginners. As one chef put it: "A person is slicing some garlic." Then saute it.'
    assert check_texts(build_index(ev, ngram=8, shingle=1), [quoted], 0.5, 0.8) == [None]     # whole-text off
    hit = check_texts(build_index(ev, ngram=8, shingle=1, min_ngram=5), [quoted, "Dogs bark at night, loudly."],
                      0.5, 0.8)
    assert hit[0]["method"] == "ngram" and hit[0]["text"] == "A person is slicing some garlic." and hit[1] is None


# ---- mining negatives from a corpus ---------------------------------------------------------------------------
def _unit(rows):
    a = np.asarray(rows, np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_mine_corpus_ranks_outside_the_margin_skips_excluded_and_scans_in_chunks():
    from speed_ray.quality.scores import mine_corpus

    q = _unit([[1, 0, 0]])
    # cosines with q: c0 1.0 (the positive itself), c1 ~0.995, c2 ~0.894, c3 ~0.707, c4 ~0.447, c5 0
    corpus = _unit([[1, 0, 0], [1, .1, 0], [1, .5, 0], [1, 1, 0], [1, 2, 0], [0, 1, 0]])
    pos = np.array([0.95])
    for chunk in (2, 65536):   # the running top-k across chunks gives what one pass gives
        idx, sc = mine_corpus(q, pos, corpus, [{0}], margin=0.05, rank_range=(0, 3), chunk=chunk)
        assert idx.tolist() == [2] and sc[0] == pytest.approx(corpus[2] @ q[0])   # c1 sits within the margin
        assert mine_corpus(q, pos, corpus, [{0}], 0.05, (1, 3), chunk=chunk)[0].tolist() == [3]
        assert mine_corpus(q, pos, corpus, [{0, 2}], 0.05, (0, 3), chunk=chunk)[0].tolist() == [3]
        assert mine_corpus(q, pos, corpus, [{0}], 0.05, (4, 6), chunk=chunk)[0].tolist() == [-1]   # 4 candidates
    picks = {int(mine_corpus(q, pos, corpus, [{0}], 0.05, (0, 4), "random", seeds=[s])[0][0]) for s in range(40)}
    assert picks == {2, 3, 4, 5}
    same = [mine_corpus(q, pos, corpus, [{0}], 0.05, (0, 4), "random", seeds=[7])[0][0] for _ in range(3)]
    assert len(set(same)) == 1   # a row's own seed: the same pick every time
    with pytest.raises(ValueError, match="rank range"):
        mine_corpus(q, pos, corpus, [set()], 0.05, (3, 3))


def test_screen_batch_mines_negatives_for_pairs_from_the_corpus(guide):
    from speed_ray.quality.screen import Corpus, ScreenSettings, screen_batch

    cols = _cols()
    cols["negative"] = [None, "", cols["negative"][2], None]     # rows 0, 1, 3 are pairs
    texts = tuple(cols["positive"]) + (
        "Bread flour has more protein than cake flour, which changes how a loaf rises.",
        "Solar panels convert sunlight into electricity using photovoltaic cells.",
        "The immune system includes the skin, white blood cells and the lymph nodes.")
    corpus = Corpus(texts, guide.embed(list(texts)).astype(np.float32))
    s = ScreenSettings(margin=0.05, restates=None, mine="pairs", mine_range=(0, 3))
    v = screen_batch(cols, guide, None, s, corpus)
    assert v["negative"][2] == cols["negative"][2] and "mined" not in (v["detail"][2] or {})   # had one
    for i in (0, 1, 3):
        mined = v["detail"][i]["mined"]
        assert mined["found"] and v["negative"][i] in texts and v["negative"][i] != cols["positive"][i]
        assert v["neg"][i] == pytest.approx(mined["score"]) and v["neg"][i] <= v["pos"][i] - 0.05
        assert v["margin"][i] == pytest.approx(v["pos"][i] - v["neg"][i])
    # "all" replaces the generated negative too, and says what it replaced
    v = screen_batch(cols, guide, None, dataclasses.replace(s, mine="all"), corpus)
    assert v["detail"][2]["mined"]["replaced"] == cols["negative"][2] and v["negative"][2] in texts
    # a rank range past the candidates leaves a pair, and says so
    v = screen_batch(cols, guide, None, dataclasses.replace(s, mine_range=(50, 60)), corpus)
    assert v["negative"][0] is None and v["detail"][0]["mined"]["found"] is False


def test_mine_flagged_replaces_only_the_false_negatives_the_action_took_away(guide):
    """mine=flagged: a row whose negative the screen removed gets a mined one; a pair that came without a negative
    (SPEED's short-long matching has none by design) stays a pair. Keeping flagged rows as pairs scored 1.45 points
    under clean data on STS-B, mining for them 0.08 (benchmarks/screen_training_effect.py, three seeds)."""
    from speed_ray.config import ConfigError
    from speed_ray.quality.config import ScreenConfig
    from speed_ray.quality.screen import Corpus, ScreenSettings, screen_batch

    cols = _cols()                       # row 0's negative paraphrases its positive; row 3 comes as a pair
    texts = tuple(cols["positive"]) + (
        "Bread flour has more protein than cake flour, which changes how a loaf rises.",
        "Solar panels convert sunlight into electricity using photovoltaic cells.")
    corpus = Corpus(texts, guide.embed(list(texts)).astype(np.float32))
    s = ScreenSettings(margin=0.05, mine="flagged", mine_range=(0, 3))
    v = screen_batch(cols, guide, None, s, corpus)
    assert v["reason"] == [None] * 4
    fn, mined = v["detail"][0]["false_negative"], v["detail"][0]["mined"]
    assert fn["action"] == "removed_negative" and mined["found"] and v["negative"][0] in texts
    assert v["negative"][0] not in (cols["positive"][0], cols["negative"][0]) and v["neg"][0] <= v["pos"][0] - 0.05
    assert v["negative"][1:3] == cols["negative"][1:3] and v["detail"][1] is None          # had a true one
    assert v["negative"][3] is None and v["detail"][3] is None                               # a pair stays a pair
    assert screen_batch(cols, guide, None, dataclasses.replace(s, mine="pairs"), corpus)["detail"][3]["mined"]["found"]
    with pytest.raises(ConfigError, match="action drop keeps none"):
        ScreenConfig(mine="flagged", action="drop")


def test_screen_stage_mines_negatives_for_pairs(ray_local, tmp_path):
    from speed_ray.config import ConfigError
    from speed_ray.quality.config import ScreenConfig
    from speed_ray.quality.stage import screen_stage

    rows = [dict(r, negative=None) for r in _stage_rows() if not r["id"].startswith("c")]   # 16 pairs
    ctx = _stage_ctx(tmp_path, rows, mine="pairs", mine_rank_min=0, mine_rank_max=5, decontaminate=False)
    extra = screen_stage(ctx)
    kept = {r["id"]: r for r in ctx.out.read_table().to_pylist()}
    assert len(kept) == 16
    docs = {r["positive"] for r in rows}
    for r in kept.values():   # every pair got a document of the input (not its own) below its positive's score
        assert r["negative"] in docs and r["negative"] != r["positive"]
        assert r["guide_neg_score"] <= r["guide_pos_score"] - ctx.cfg.screen.margin
        assert json.loads(r["lineage"])["screen"]["mined"]["found"] is True
    s = extra["screen"]
    assert s["actions"] == {"mined": 16} and s["mining"] == {"texts": 4, "contaminated_left_out": 0,
                                                              "source": "own"}
    with pytest.raises(ConfigError, match="mine_rank_max"):
        ScreenConfig(mine="pairs", mine_rank_min=3, mine_rank_max=3)
    with pytest.raises(ConfigError, match="bi_encoder"):
        ScreenConfig(mine="all", guide_kind="cross_encoder", action="drop")


def test_a_mining_corpus_file_is_read_as_it_is(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from speed_ray.errors import DataError
    from speed_ray.quality.stage import _corpus_texts

    (tmp_path / "c.jsonl").write_text('{"text": "a doc about bees"}\n{"text": "a doc about bees"}\n{"text": " "}\n'
                                      '{"text": "a doc about rivers"}\n')
    assert _corpus_texts(None, str(tmp_path / "c.jsonl")) == ["a doc about bees", "a doc about rivers"]
    pq.write_table(pa.table({"positive": ["p one", "p two"], "query": ["q", "q"]}), tmp_path / "c.parquet")
    assert _corpus_texts(None, str(tmp_path / "c.parquet")) == ["p one", "p two"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: no `text` or `positive` column"):
        _corpus_texts(None, str(tmp_path / "bad.parquet"))


def test_the_guide_sees_instructions_only_when_it_was_trained_with_them(minilm, tmp_path):
    """screen.instructions: null (the default) puts E5's instruction before the guide's query only for a guide whose
    sentence-transformers config defines a prompt; MiniLM has none, so its queries go bare (an instruction it never
    learned dilutes its query embedding). true / false force it either way."""
    import json
    import shutil

    from speed_ray.quality.guide import Guide
    from speed_ray.quality.screen import ScreenSettings, screen_batch

    class Recording(Guide):
        def embed(self, texts):
            self.seen = getattr(self, "seen", []) + list(texts)
            return super().embed(texts)

    plain = Recording(minilm, "bi_encoder", 64, threads=1)
    assert plain.instruction_tuned is False
    prompted_dir = tmp_path / "prompted"
    shutil.copytree(minilm, prompted_dir)
    cfg_path = prompted_dir / "config_sentence_transformers.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    cfg["prompts"] = {"query": "Instruct: Given a query, retrieve passages\nQuery: ", "document": ""}
    cfg_path.write_text(json.dumps(cfg))
    prompted = Recording(str(prompted_dir), "bi_encoder", 64, threads=1)
    assert prompted.instruction_tuned is True

    cols = _cols()
    for g, setting, want in ((plain, None, False), (prompted, None, True), (plain, True, True),
                             (prompted, False, False)):
        g.seen = []
        screen_batch(cols, g, None, ScreenSettings(instructions=setting))
        instructed = [t for t in g.seen if t.startswith("Instruct: ")]
        assert bool(instructed) is want, (setting, g.instruction_tuned)
        if want:   # the instruction goes before queries only
            assert {t.split("\nQuery: ", 1)[1] for t in instructed} == set(cols["query"])


def test_the_margin_rule_spares_a_hard_negative_unlike_the_positive(guide):
    """A negative the query scores as high as its positive is a false negative only if it also resembles the
    positive (screen.margin_min_similarity): one close to the query but about something else is the hard negative
    training wants. Without the floor the margin alone flags both."""
    from speed_ray.quality.scores import resembles
    from speed_ray.quality.screen import ScreenSettings, screen_batch

    assert resembles(np.array([0.7, 0.3, np.nan]), 0.6, 3).tolist() == [True, False, False]
    assert resembles(None, 0.6, 2).tolist() == [True, True] and resembles(np.array([0.1]), None, 1).tolist() == [True]
    cols = {"id": ["hard", "copy"], "task": ["", ""], "task_type": ["retrieval"] * 2,
            "query": ["bank card top up fee", "bank card top up fee"],
            "positive": ["Topping up with a bank card is free of charge.",
                         "Topping up with a bank card is free of charge."],
            "negative": ["A fee applies when you withdraw cash with your bank card abroad.",   # on the query's topic
                         "Topping up using a bank card costs nothing."]}                     # restates the positive
    alone = screen_batch(cols, guide, None, ScreenSettings(margin=1.0, margin_min_similarity=None, restates=None,
                                                            action="drop"))
    assert alone["reason"] == ["false_negative", "false_negative"]
    gated = screen_batch(cols, guide, None, ScreenSettings(margin=1.0, margin_min_similarity=0.6, restates=None,
                                                            action="drop"))
    assert gated["reason"] == [None, "false_negative"], gated["detail"]
    assert gated["detail"][1]["false_negative"]["pos_neg_score"] >= 0.6


def test_copies_positive_is_the_positive_less_a_few_words():
    from speed_ray.quality.scores import copies_positive

    pos = "A woman is slicing a leek."
    cases = {
        "a woman is a leek": True,                    # one word dropped, case and punctuation changed
        "A WOMAN IS SLICING A LEEK!": True,           # nothing dropped (dedup's exact rule sees the same)
        "a woman is a": False,                        # two of six words: above the 20% share (one word here)
        "A woman is slicing a carrot.": False,        # a substitution: a hard negative
        "A leek is slicing a woman.": False,          # reordered
        "A woman is slicing a big leek.": False,      # a word the positive lacks
        "": False, None: False,
    }
    got = copies_positive([pos] * len(cases), list(cases), 0.2)
    assert dict(zip(cases, got.tolist())) == cases
    # a dropped negation reverses the meaning: a hard negative, not a copy
    assert copies_positive(["The update is not available on Android."], ["The update is available on Android."],
                           0.2).tolist() == [False]
    # longer texts may drop the configured share; short ones (labels) are not judged; None turns the rule off
    long_pos = "one two three four five six seven eight nine ten"
    assert copies_positive([long_pos] * 2, ["one three four five six eight nine ten", "one four five six eight"],
                           0.2).tolist() == [True, False]
    assert copies_positive(["very positive"], ["positive"], 0.2).tolist() == [False]
    assert copies_positive([pos], ["a woman is a leek"], None).tolist() == [False]


def test_a_near_copy_the_guide_scores_low_is_a_false_negative(guide):
    """Dropping the verb leaves a text MiniLM scores at about 0.65 to its positive and well below it for the query,
    so neither guide rule fires; the copy rule does, the lineage names it, and turning it off keeps the row."""
    from speed_ray.quality.screen import ScreenSettings, screen_batch

    cols = {"id": ["copy", "hard"], "task": ["", ""], "task_type": ["sts"] * 2,
            "query": ["A woman slices a leek.", "A woman slices a leek."],
            "positive": ["A woman is slicing a leek.", "A woman is slicing a leek."],
            "negative": ["a woman is a leek!", "A woman is slicing a carrot."]}
    v = screen_batch(cols, guide, None, ScreenSettings(action="drop"))
    assert v["reason"] == ["false_negative", None], v["detail"]
    fn = v["detail"][0]["false_negative"]
    assert fn["rule"] == "copies_positive" and fn["pos_neg_score"] < 0.8 and fn["neg_score"] < fn["pos_score"] - 0.05
    off = screen_batch(cols, guide, None, ScreenSettings(copies_max_dropped=None))
    assert off["reason"] == [None, None]


def test_copies_max_dropped_is_checked():
    from speed_ray.config import ConfigError
    from speed_ray.quality.config import ScreenConfig

    assert ScreenConfig(copies_max_dropped=None).copies_max_dropped is None
    with pytest.raises(ConfigError, match="copies_max_dropped"):
        ScreenConfig(copies_max_dropped=1.5)


class _TableGuide:
    """A bi-encoder guide whose embeddings are given per text (unit-normed): for the rules' logic, where MiniLM's
    own scores would make the geometry hard to pin down. The MiniLM tests above cover the real guide."""

    kind = "bi_encoder"
    instruction_tuned = False

    def __init__(self, table: dict[str, list[float]]):
        self.table = {t: _unit([v])[0] for t, v in table.items()}

    def embed(self, texts):
        return np.stack([self.table[t] for t in texts]).astype(np.float32)


def test_a_replacement_negative_must_pass_the_rules_its_negative_failed():
    """remine and mining rank candidates below the query's margin; a candidate that restates the positive (guide
    similarity >= restates) or copies it less a word is a false negative too, and is passed over."""
    from speed_ray.quality.screen import Corpus, ScreenSettings, screen_batch

    q0, p0 = "cats purr when content", "A cat purrs when it is happy."
    para = "Cats make a purring sound when they are happy."         # restates p0: similarity 0.9
    copy = "A cat purrs when it is."                                 # p0 less a word: far under the guide
    other = "Dogs wag their tails when they are excited."          # a hard negative: 0.7
    g = _TableGuide({q0: [1, 0, 0], p0: [1, 0, 0], para: [0.9, 0.436, 0], copy: [0.75, 0, 0.661],
                     other: [0.7, 0.714, 0], "A CAT PURRS WHEN IT IS HAPPY": [1, 0.01, 0],
                     "q1": [0, 0, 1], "q2": [0, 1, 0], "q3": [0, 0.7, 0.714]})
    cols = {"id": ["r0", "r1", "r2", "r3"], "task": [""] * 4, "task_type": ["sts"] * 4,
            "query": [q0, "q1", "q2", "q3"], "positive": [p0, copy, para, other],
            "negative": ["A CAT PURRS WHEN IT IS HAPPY", None, None, None]}
    s = ScreenSettings(margin=0.05, action="remine")
    v = screen_batch(cols, g, None, s)
    # below the margin (0.95) the query ranks the paraphrase (0.9), the copy (0.75), then the dog sentence (0.7):
    # the first two fail the rules, the third replaces the negative
    assert v["negative"][0] == other, v["detail"][0]
    assert v["detail"][0]["false_negative"]["action"] == "remined"
    # with the rules off the paraphrase is taken, as before them
    loose = screen_batch(cols, g, None, ScreenSettings(margin=0.05, action="remine", restates=None,
                                                       copies_max_dropped=None))
    assert loose["negative"][0] == para
    # mining from a corpus passes over the same two
    pairs = dict(cols, negative=[None] * 4)
    corpus = Corpus((para, copy, other), g.embed([para, copy, other]))
    m = screen_batch(pairs, g, None, ScreenSettings(margin=0.05, mine="pairs", mine_range=(0, 3)), corpus)
    assert m["negative"][0] == other and m["detail"][0]["mined"]["found"]
    m = screen_batch(pairs, g, None, ScreenSettings(margin=0.05, mine="pairs", mine_range=(0, 3), restates=None,
                                                    copies_max_dropped=None), corpus)
    assert m["negative"][0] == para


def test_mine_corpus_skips_candidates_accept_turns_down():
    from speed_ray.quality.scores import mine_corpus

    q = _unit([[1, 0, 0]])
    corpus = _unit([[1, 0, 0], [1, .1, 0], [1, .5, 0], [1, 1, 0], [1, 2, 0], [0, 1, 0]])
    pos = np.array([0.95])
    for chunk in (2, 65536):
        assert mine_corpus(q, pos, corpus, [{0}], 0.05, (0, 1), chunk=chunk,
                           accept=lambda r, j: j != 2)[0].tolist() == [3]
        assert mine_corpus(q, pos, corpus, [{0}], 0.05, (0, 1), chunk=chunk,
                           accept=lambda r, j: False)[0].tolist() == [-1]
