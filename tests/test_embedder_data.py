"""Training triples: instruction on queries only (both sides for symmetric tasks), nested subsets, one-task batches."""

from __future__ import annotations

from speed_ray.embedder.data import make_batches, select_rows, to_triple, to_triples, worker_slice


def _row(i, task_type="retrieval"):
    return {"id": f"r{i}", "task_type": task_type, "task": "Find passages", "query": f"q{i}",
            "positive": f"p{i}", "negative": f"n{i}"}


def test_instruction_on_queries_only():
    t = to_triple(_row(0))
    assert t["query"] == "Instruct: Find passages\nQuery: q0"
    assert t["positive"] == "p0" and t["negative"] == "n0"


def test_symmetric_tasks_get_instruction_on_both_sides():
    t = to_triple(_row(0, "sts"))
    assert t["positive"] == "Instruct: Find passages\nQuery: p0"
    assert t["negative"].startswith("Instruct: Find passages\nQuery: ")
    assert to_triple(_row(0, "sts"), symmetric_types=())["positive"] == "p0"


def test_incomplete_rows_are_dropped_and_counted():
    rows = [_row(0), {**_row(1), "negative": ""}]
    triples, dropped = to_triples(rows)
    assert len(triples) == 1 and dropped == 1


def test_n_samples_takes_nested_prefixes_and_filters_types():
    rows = [_row(i, "retrieval" if i % 2 else "sts") for i in range(50)]
    small, big = select_rows(rows, 10, seed=3), select_rows(rows, 30, seed=3)
    assert [r["id"] for r in small] == [r["id"] for r in big[:10]]
    assert select_rows(rows, 10, seed=3) == small
    only = select_rows(rows, None, ("sts",), seed=3)
    assert len(only) == 25 and {r["task_type"] for r in only} == {"sts"}


def test_batches_hold_one_task_type_and_split_evenly_over_workers():
    triples = [to_triple(_row(i, ["retrieval", "sts", "classification"][i % 3])) for i in range(40)]
    batches = make_batches(triples, 4, one_task_per_batch=True, seed=0)
    pure = [b for b in batches if len({t["task_type"] for t in b}) == 1]
    assert len(pure) >= len(batches) - 1 and all(len(b) == 4 for b in batches)
    assert len({t["id"] for b in batches for t in b}) == sum(len(b) for b in batches)   # no row twice
    assert make_batches(triples, 4, seed=0) == batches
    b = batches[0]
    assert worker_slice(b, 0, 2) + worker_slice(b, 1, 2) == b


def test_no_batch_holds_the_same_text_twice():
    """Real labeled data repeats claims and shares positives: copies in one batch are each other's false negatives
    (sentence-transformers' NoDuplicatesBatchSampler). The batches avoid them, deterministically, and are the
    plain cut where no text repeats."""
    import random as _random

    rng = _random.Random(0)
    triples = [{"id": f"r{i}", "task_type": "retrieval" if i % 2 else "sts", "query": f"claim {rng.randrange(25)}",
                "positive": f"evidence {rng.randrange(40)}", "negative": f"other {i}"} for i in range(120)]
    for one_task in (True, False):
        batches = make_batches(triples, 6, one_task, seed=2)
        assert batches == make_batches(triples, 6, one_task, seed=2)
        assert len(batches) >= 10
        for b in batches:
            texts = [t[k] for t in b for k in ("query", "positive", "negative")]
            assert len(texts) == len(set(texts)), b
        plain = make_batches(triples, 6, one_task, seed=2, no_duplicates=False)
        assert any(len({t["query"] for t in b}) < 6 for b in plain)   # without it, duplicates do land together
    unique = [{**t, "query": f"q{i}", "positive": f"p{i}"} for i, t in enumerate(triples)]
    assert make_batches(unique, 6, True, 2) == make_batches(unique, 6, True, 2, no_duplicates=False)
