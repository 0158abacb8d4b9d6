"""Dedup core: datasketch-equal signatures, banding, components, exact/near dedup, quality filters."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from datasketch import MinHash
from datasketch.lsh import _optimal_param

from speed_ray.dedup.components import clusters, find_duplicates, min_labels
from speed_ray.dedup.filters import filter_reasons, quality_reason
from speed_ray.dedup.lsh import band_layout, bucket_edges, bucket_rows, optimal_bands
from speed_ray.dedup.minhash import exact_hashes, shingles, signatures, signatures_from_tokens
from speed_ray.config import ConfigError, to_dict
from speed_ray.dedup.config import DedupConfig, FiltersConfig

VOCAB = [f"w{i}" for i in range(3000)] + ["héllo", "日本語", "naïve", "Straße", "emoji🙂", "ＦＵＬＬ"]


def _texts(n: int, seed: int = 0, lo: int = 0, hi: int = 60) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(VOCAB, size=rng.integers(lo, hi))) for _ in range(n)]


def _datasketch(tokens: list[bytes], num_perm: int, seed: int) -> np.ndarray:
    m = MinHash(num_perm=num_perm, seed=seed)
    for t in tokens:
        m.update(t)
    return m.hashvalues


@pytest.mark.parametrize("num_perm,seed", [(128, 1), (64, 7), (256, 42), (16, 0), (1, 3)])
def test_signatures_equal_datasketch(num_perm, seed):
    texts = _texts(300, seed) + ["", "   ", "one", "two words", "Ünïcödé ТЕКСТ 中文 字符 テスト 🙂🙂"]
    sig = signatures(texts, num_perm, seed, ngram=3)
    assert sig.shape == (len(texts), num_perm) and sig.dtype == np.uint32
    for i, t in enumerate(texts):
        expect = _datasketch([s.encode("utf-8") for s in shingles(t, 3)], num_perm, seed)
        assert np.array_equal(sig[i], expect), (i, t)


def test_signatures_from_tokens_bulk_and_blocks():
    docs = [[f"tok{j}-{i}".encode() for j in range(i % 50)] for i in range(200)]
    sig = signatures_from_tokens(docs, 64, 5)
    bulk = MinHash.bulk(docs, num_perm=64, seed=5)
    assert all(np.array_equal(s, m.hashvalues) for s, m in zip(sig, bulk))


def test_shingles():
    assert shingles("The  Cat, sat on  THE mat!", 3) == ["the cat sat", "cat sat on", "sat on the", "on the mat"]
    assert shingles("two words", 3) == ["two words"]
    assert shingles("", 3) == [] and shingles(None, 2) == []
    assert shingles("a b c", 1) == ["a", "b", "c"]


def test_band_layout_matches_datasketch():
    for thr, n in [(0.8, 128), (0.5, 64), (0.9, 256)]:
        assert optimal_bands(thr, n) == _optimal_param(thr, n, 0.5, 0.5)
    lay = band_layout(0.8, 128)
    assert 0 < lay["false_positive_rate"] < 0.1 and 0 < lay["false_negative_rate"] < 0.1
    assert band_layout(0.8, 128, 16, 8)["bands"] == 16


def test_min_labels_components():
    lab = min_labels(np.array([5, 3, 1, 7]), np.array([4, 4, 2, 6]), 9)
    assert lab.tolist() == [0, 1, 1, 3, 3, 3, 6, 6, 8]
    # A long chain still converges to the minimum.
    n = 1000
    perm = np.random.default_rng(0).permutation(n)
    lab = min_labels(perm[:-1], perm[1:], n)
    assert (lab == 0).all()


def test_exact_dedup_and_representative_is_lowest_id():
    base = "the quick brown fox jumps over the lazy dog near the river bank today"
    ids = ["z9", "a1", "m5", "b2", "c3"]
    texts = [base, base.upper() + "!!", "  " + base.replace(" ", "   "), "something else entirely", ""]
    out = find_duplicates(ids, texts, bands=9, rows=13, near=False)
    rows = {r["id"]: r for r in out.to_pylist()}
    assert set(rows) == {"a1", "m5", "z9"}
    assert rows["a1"]["duplicate_of"] is None and rows["a1"]["removed_reason"] is None
    for i in ("m5", "z9"):
        assert rows[i]["dedup_cluster"] == "a1" and rows[i]["duplicate_of"] == "a1"
        assert rows[i]["removed_reason"] == "exact_duplicate"
    assert exact_hashes([base])[0] == exact_hashes([base.title()])[0] != exact_hashes(["other"])[0]


def test_representative_independent_of_order():
    base = _texts(1, 3, 40, 41)[0]
    ids = [f"id{i:02d}" for i in range(8)]
    texts = [base + f" tail{i}" for i in range(8)]
    for perm in ([0, 1, 2, 3, 4, 5, 6, 7], [7, 3, 5, 1, 0, 6, 2, 4]):
        out = find_duplicates([ids[i] for i in perm], [texts[i] for i in perm], bands=9, rows=13)
        assert set(out.column("dedup_cluster").to_pylist()) == {"id00"}
        assert sorted(out.column("id").to_pylist()) == ids


def _planted(n_orig: int, n_dup: int, seed: int = 0):
    """n_orig random docs, then n_dup near copies (one word replaced per ~40 words): Jaccard ~0.9+."""
    rng = np.random.default_rng(seed)
    docs = [list(rng.choice(VOCAB, size=int(rng.integers(80, 120)))) for _ in range(n_orig)]
    texts, src = [" ".join(d) for d in docs], {}
    for j in range(n_dup):
        o = int(rng.integers(0, n_orig))
        d = list(docs[o])
        d[int(rng.integers(0, len(d)))] = "EDITED"
        texts.append(" ".join(d))
        src[n_orig + j] = o
    return texts, src


def test_planted_near_duplicates_recall():
    texts, src = _planted(2000, 200)
    ids = [f"doc{i:06d}" for i in range(len(texts))]
    b, r = optimal_bands(0.8, 128)
    out = find_duplicates(ids, texts, bands=b, rows=r)
    removed = {int(x[3:]) for x, why in zip(out.column("id").to_pylist(), out.column("removed_reason").to_pylist())
               if why is not None}
    planted = set(src)
    assert len(removed & planted) / len(planted) >= 0.95
    assert len(removed & planted) / max(1, len(removed)) >= 0.95
    reasons = set(out.column("removed_reason").to_pylist()) - {None}
    assert reasons <= {"near_duplicate", "exact_duplicate"} and "near_duplicate" in reasons


def test_bucket_edges_star_and_exact_flag():
    ids = pa.array(["c", "a", "b", "d"])
    keys = np.array([[1, 7], [1, 8], [1, 9], [2, 9]], dtype=np.uint64)
    exact = np.array([5, 5, 6, 7], dtype=np.uint64)
    e = bucket_edges(bucket_rows(ids, keys, exact))
    pairs = {(s, d): x for s, d, x in zip(*(e.column(c).to_pylist() for c in ("src", "dst", "exact")))}
    assert pairs == {("a", "b"): False, ("a", "c"): True, ("b", "d"): False}
    cl = {r["id"]: r for r in clusters(e).to_pylist()}
    assert {r["dedup_cluster"] for r in cl.values()} == {"a"}
    assert cl["c"]["removed_reason"] == "exact_duplicate" and cl["b"]["removed_reason"] == "near_duplicate"


RULES = to_dict(FiltersConfig())


@pytest.mark.parametrize("row,reason", [
    (("what is a cat", "A cat is a small mammal.", "", False), "invalid"),
    (("", "A cat is a small mammal.", "", True), "empty_query"),
    (("what is a cat", "   ", "", True), "empty_positive"),
    (("ab", "A cat is a small mammal.", "", True), "too_short_query"),
    (("what is a cat", "x" * 9000, "", True), "too_long_positive"),
    (("what is a cat", "As an AI language model, I cannot answer.", "", True), "boilerplate_positive"),
    (("what is a cat", "Lorem ipsum dolor sit amet.", "", True), "boilerplate_positive"),
    (("find [insert topic here]", "A cat is a small mammal.", "", True), "boilerplate_query"),
    (("what is a cat", "A cat is a small mammal.", "a CAT is a small mammal", True), "positive_equals_negative"),
    (("what is a cat", "Well, what is a cat? A small mammal.", "", True), "query_in_positive"),
    (("cat", "A cat is a small mammal.", "", True), None),
    (("what is a cat", "A cat is a small mammal.", "A dog is a canine.", True), None),
])
def test_quality_reasons(row, reason):
    assert quality_reason(*row, **RULES) == reason


def test_filter_options_and_batch():
    rules = dict(RULES, drop_query_in_positive=False, require_negative=True)
    cols = {"query": ["what is a cat", "what is a cat"], "positive": ["what is a cat, really", "Cats."],
            "negative": ["dogs", None], "valid": [True, True]}
    assert filter_reasons(cols, rules) == [None, "empty_negative"]
    with pytest.raises(KeyError, match="positive"):
        filter_reasons({"query": ["q"]}, RULES)


def test_language_filter_hook():
    rules = dict(RULES, language="en")
    assert quality_reason("what is a cat", "A cat is a mammal.", "", True, **rules,
                          language_of=lambda t: "en") is None
    assert quality_reason("what is a cat", "Un chat est un mammifère.", "", True, **rules,
                          language_of=lambda t: "fr") == "language"
    pytest.importorskip("langid")  # the optional language id package
    assert filter_reasons({"query": ["what is a cat"] * 2,
                           "positive": ["A cat is a small domesticated carnivorous mammal with soft fur.",
                                        "Le chat est un petit mammifère carnivore domestique à fourrure douce."]},
                          rules) == [None, "language"]


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="bands"):
        DedupConfig(bands=20, rows=10)
    with pytest.raises(ConfigError, match="min_chars"):
        FiltersConfig(min_chars={"answer": 3})


def test_shingle_tokens_are_encoded_shingles():
    from speed_ray.dedup.minhash import shingle_tokens

    for t in _texts(50, 9, 0, 12) + ["", "a", "Ünïcödé ТЕКСТ 中文, don't!"]:
        for n in (1, 2, 3, 5):
            assert shingle_tokens(t, n) == [s.encode("utf-8") for s in shingles(t, n)]


def test_buckets_match_datasketch_lsh():
    """Same band layout, same candidates: our star edges connect exactly datasketch MinHashLSH's query results."""
    from datasketch import MinHashLSH

    texts, _ = _planted(300, 60, seed=4)
    ids = [f"d{i:04d}" for i in range(len(texts))]
    sig = signatures(texts, 128, 1, 3)
    from speed_ray.dedup.lsh import band_hashes

    edges = bucket_edges(bucket_rows(pa.array(ids), band_hashes(sig, 9, 13)))
    ours = set(zip(edges.column("src").to_pylist(), edges.column("dst").to_pylist()))
    lsh = MinHashLSH(num_perm=128, params=(9, 13))
    mhs = [MinHash(num_perm=128, hashvalues=s, scheme="affine32") for s in sig]
    for i, m in zip(ids, mhs):
        lsh.insert(i, m)
    theirs = {(min(i, j), max(i, j)) for i, m in zip(ids, mhs) for j in lsh.query(m) if i != j}
    assert ours <= theirs  # every edge we emit is a datasketch candidate
    lab = {i: c for i, c in zip(*(clusters(edges).column(k).to_pylist() for k in ("id", "dedup_cluster")))}
    assert all(lab.get(a, a) == lab.get(b, b) for a, b in theirs)  # and every candidate pair is connected
    assert len(theirs) >= 50


@pytest.mark.parametrize("task,degenerate", [
    (",]{", True), ("john.doe@example.com", True), ("https://example.com/tasks/42", True), ("Task 7:", True),
    ("Retrieve", True), ("TASK1", True), ("Sentence 1", True), ("retrieve passages", False), ("Retrieve cat facts", False), ("Given a question, retrieve answers", False),
    ("Classifiez les avis", False), ("查找 相关", False), ("查找相关", False), ("查", True), ("", False), (None, False),
])
def test_degenerate_task_descriptions_are_filtered(task, degenerate):
    """A task description with no words (seen in the demo: `,]{` and an e-mail address) becomes the instruction
    of every query of its samples; it is dropped with its own reason, and a row with no task (public pairs) is
    not judged by it."""
    row = ("what is a cat", "A cat is a small mammal.", "A dog is a canine.", True)
    assert quality_reason(*row, task=task, **RULES) == ("degenerate_task" if degenerate else None)
    assert quality_reason(*row, task=task, **dict(RULES, drop_degenerate_task=False)) is None
    cols = {"query": [row[0]], "positive": [row[1]], "negative": [row[2]], "task": [task]}
    assert filter_reasons(cols, RULES) == ["degenerate_task" if degenerate else None]


@pytest.mark.parametrize("task_type,row,reason", [
    ("sts", ("S1", "S2", "S3"), "placeholder_query"),                         # the schema's own key names
    ("sts", ("A man plays a guitar.", "{my_book}", "A woman sings."), "placeholder_positive"),
    ("sts", (",(S2,S3: 4.", "64.67", ".[Subsample 1_%) 2.,"), "too_few_words_query"),
    ("sts", ("A man plays a guitar.", "A man is playing guitar.", "Cats sleep."), None),
    ("retrieval", ("poverty relief", "Santa Abyss", "A long passage about charity and aid."), "too_few_words_positive"),
    ("retrieval", ("poverty relief", "Aid programs reduce poverty in rural areas.", ""), None),   # pairs stay
    ("classification", ("The movie was a delight from start to end.", "positive", "negative"), None),  # labels
    ("classification", ("Spam", "spam", "ham"), "too_few_words_query"),
    ("matching_long", ("A short title here", "Another one is here", ""), None),
    ("matching_long", ("Title", "A long enough document text.", ""), "too_few_words_query"),
    (None, ("S1", "S2 is fine", ""), None),                                   # public pairs: no task type, no floor
])
def test_label_like_texts_where_a_sentence_or_passage_is_due(task_type, row, reason):
    rules = dict(RULES, min_chars={}, drop_query_in_positive=False)
    assert quality_reason(*row, True, task_type=task_type, **rules) == reason
    assert quality_reason(*row, True, task_type=task_type, **dict(rules, drop_label_like=False)) is None


def test_min_words_config_names_bad_fields():
    from speed_ray.config import ConfigError
    from speed_ray.dedup.config import FiltersConfig

    assert FiltersConfig().min_words["sts"] == {"query": 2, "positive": 2, "negative": 2}
    with pytest.raises(ConfigError, match="min_words.*doc"):
        FiltersConfig(min_words={"retrieval": {"doc": 3}})


_WORD_TEXTS = [
    "", "a", "ab", "ab cd", "A bird is perched on a gloved hand.", "x@y.com", "mail me at x@y.com now please",
    "see WWW.Example.com or HTTPS://a.b/c for it", "see www.example.com", "ftp://host/path and more words here",
    "東京は日本の首都です", "東京 is big", "café au lait", "ſtraße und Kelvin K", "1234 5678 __ --", "  ,]{  ",
    "word " * 40, "İstanbul is a city",
]


@pytest.mark.parametrize("text", _WORD_TEXTS)
def test_has_words_is_word_count_at_least(text):
    from speed_ray.synth.parsing import _ADDRESS, _CJK, _WORD, has_words, word_count

    # the definition word_count's fast paths must keep: the regex pass over every text
    full = sum(max(1, len(w) // 2) if _CJK.search(w) else 1 for w in _WORD.findall(_ADDRESS.sub(" ", text)))
    assert word_count(text) == full
    for n in range(0, 6):
        assert has_words(text, n) == (full >= n), (text, n)


@pytest.mark.parametrize("text", [
    "As an AI, I cannot do that.", "as a large language model i think", "I'm sorry, but no.", "I AM UNABLE to help",
    "I can't assist with that", "Lorem ipsum dolor", "[Insert name here]", "<placeholder text>", "{{ query }}",
    "{positive}", "a plain passage about birds and hands", "As a result, the birds flew.", "I can see it",
    "[1] a citation", "x < y and z > w", "Ｌｏｒｅｍ ipsum", "AS AN AI", "İ'm sorry", "as an aı model", "",
])
def test_boilerplate_fast_path_agrees_with_the_regex(text):
    from speed_ray.dedup.filters import BOILERPLATE, boilerplate

    assert boilerplate(text) == (BOILERPLATE.search(text) is not None)
