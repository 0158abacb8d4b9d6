"""Training on a user's own data: pairs and triples from Parquet, JSONL or a `datasets` directory, checked row by row,
planned so pairs and triples never share a batch, and the `speed-ray train-embedder` command end to end."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from speed_ray.embedder.data import DataError, plan_batches, to_triple
from speed_ray.embedder.loss import compute_loss_from_embeddings
from speed_ray.embedder.own_data import Columns, convert_rows, input_files


# ---- pure parts ------------------------------------------------------------------------------------------------
def test_pairs_and_triples_never_share_a_batch_and_the_plan_is_deterministic():
    types = ["a", "b"] * 30
    pairs = [i % 3 == 0 for i in range(60)]
    for one_task in (True, False):
        plan = plan_batches(types, 4, one_task, seed=1, epoch=0, pairs=pairs)
        assert plan == plan_batches(types, 4, one_task, seed=1, epoch=0, pairs=pairs)
        assert plan != plan_batches(types, 4, one_task, seed=1, epoch=1, pairs=pairs)
        for b in plan:
            assert len(b) == 4 and len({pairs[i] for i in b}) == 1
            if one_task:
                assert len({types[i] for i in b}) == 1 or len({types[i] for i in b}) == 2  # pooled rest
        used = [i for b in plan for i in b]
        assert len(used) == len(set(used)) and len(used) >= 60 - 2 * 4 * (2 if one_task else 1)
    # no pairs: exactly the triples-only plan
    assert plan_batches(types, 4, False, 1, 0, [False] * 60) == plan_batches(types, 4, False, 1, 0)


def test_a_pair_trains_with_in_batch_negatives_only():
    assert to_triple({"query": "q", "positive": "p", "negative": ""}) is None
    t = to_triple({"query": "q", "positive": "p", "negative": "", "task": "find it", "task_type": "sts"},
                  allow_pairs=True)
    assert t["negative"] is None and t["query"].startswith("Instruct: find it")
    g = torch.Generator().manual_seed(0)
    q, p = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    got = compute_loss_from_embeddings(q, p, None, 0.05)
    qn, pn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(p, dim=-1)
    want = torch.nn.functional.cross_entropy(qn @ pn.T / 0.05, torch.arange(4))
    assert torch.allclose(got, want)


def test_bad_rows_name_the_file_the_row_and_the_column():
    cols = Columns()
    with pytest.raises(DataError, match=r"f\.parquet: row 7 has no column 'query'"):
        convert_rows([{"positive": "p"}], cols, "f.parquet", 7, "", "own")
    with pytest.raises(DataError, match=r"f\.jsonl: line 3, column 'positive' \(the positive\): expected a non-empty"):
        convert_rows([{"query": "q", "positive": "  "}], cols, "f.jsonl", 3, "", "own", unit="line")
    with pytest.raises(DataError, match=r"row 1, column 'text' \(the query\)"):
        convert_rows([{"text": 5, "positive": "p"}], Columns(query="text"), "f", 1, "", "own")
    with pytest.raises(DataError, match="no column 'neg'"):
        convert_rows([{"query": "q", "positive": "p"}], Columns(negative="neg", negative_required=True), "f", 1,
                     "", "own")
    rows = convert_rows([{"query": "q", "positive": "p"}, {"query": "q2", "positive": "p2", "negative": None}],
                        cols, "f", 1, "task x", "own")
    assert [r["negative"] for r in rows] == [None, None] and rows[0]["task"] == "task x"
    assert rows[1]["id"] == "f#2"


def test_input_formats(tmp_path):
    pq.write_table(pa.table({"query": ["q"], "positive": ["p"]}), tmp_path / "a.parquet")
    assert input_files(str(tmp_path / "a.parquet")) == ("parquet", [str(tmp_path / "a.parquet")])
    assert input_files(str(tmp_path))[0] == "parquet"
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="expected a .parquet, .jsonl or .arrow"):
        input_files(str(tmp_path / "d.txt"))
    with pytest.raises(FileNotFoundError):
        input_files(str(tmp_path / "missing.parquet"))
    import datasets

    datasets.Dataset.from_dict({"query": ["q"], "positive": ["p"]}).save_to_disk(str(tmp_path / "ds"))
    fmt, files = input_files(str(tmp_path / "ds"))
    assert fmt == "arrow" and files


# ---- with Ray --------------------------------------------------------------------------------------------------------
def _pairs_and_triples(n=40):
    topics = ["volcano", "tax law", "chess", "bread", "jazz", "bees", "rivers", "opera"]
    rows = []
    for i in range(n):
        t, o = topics[i % 8], topics[(i + 4) % 8]
        row = {"query": f"what about {t} number {i}", "positive": f"a passage on {t}, item {i}",
               "task": "Given a question, retrieve passages"}
        if i % 2:
            row["negative"] = f"a passage on {o}, item {i}"
        rows.append(row)
    return rows


def test_import_and_feed_own_data_from_three_formats(ray_local, tmp_path):
    import datasets

    from speed_ray.embedder.feed import FeedReader, prepare_feed
    from speed_ray.embedder.own_data import import_data
    from speed_ray.stage import StageContext
    from speed_ray.run_config import build_config
    from speed_ray.store import RunStore

    rows = _pairs_and_triples()
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    full = [{**r, "negative": r.get("negative")} for r in rows]   # a null negative: a pair
    pq.write_table(pa.Table.from_pylist(full), tmp_path / "d.parquet")
    datasets.Dataset.from_list(full).save_to_disk(str(tmp_path / "ds"))
    for src in ("d.jsonl", "d.parquet", "ds"):
        store = RunStore(str(tmp_path / f"run-{src}"))
        out = store.stage("own_data", "fp")
        info = import_data(str(tmp_path / src), out, Columns())
        assert info["rows"] == 40 and info["pairs"] == 20
        cfg = build_config({"run": {"run_dir": str(tmp_path / f"run-{src}")},
                            "embedder": {"batch_size": 4, "max_steps": 3, "train_pairs": True,
                                         "one_task_per_batch": False}})
        ctx = StageContext(cfg=cfg, name="train_embedder", out=store.stage("train_embedder", "fp"),
                           inputs={"data": out}, store=store, run_name="t")
        plan = prepare_feed(ctx, cfg.embedder, 0)
        assert plan.summary["triples"] == 40 and plan.summary["pairs"] == 20
        seen = [FeedReader(plan).batch(s) for s in range(plan.n_batches)]
        assert all(len({t["negative"] is None for t in b}) == 1 for b in seen)
        assert {t["negative"] is None for b in seen for t in b} == {True, False}


def test_a_bad_row_in_a_file_fails_the_import_naming_it(ray_local, tmp_path):
    from speed_ray.embedder.own_data import import_data
    from speed_ray.store import RunStore

    rows = _pairs_and_triples(10)
    rows[6]["positive"] = ""
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = RunStore(str(tmp_path / "run")).stage("own_data", "fp")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 7, column 'positive'"):
        import_data(str(tmp_path / "bad.jsonl"), out, Columns())


@pytest.mark.slow
def test_train_embedder_command_trains_evaluates_and_skips_a_rerun(ray_local, tmp_path, minilm, capsys):
    from speed_ray.cli import main

    rows = _pairs_and_triples(48)
    data = tmp_path / "mine.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": r["query"], "answer": r["positive"],
                                          "negative": r.get("negative")} for r in rows]), data)
    out = tmp_path / "run"
    argv = ["train-embedder", str(data), "embedder.max_steps=2", "--base-model", "offline:minilm",
            "--query-column", "question", "--out", str(out), "embedder.batch_size=8", "--positive-column", "answer",
            "embedder.max_query_length=32", "embedder.max_doc_length=32", "embedder.lora=false"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads([line for line in printed.splitlines() if line.startswith("{")][-1])
    assert result["steps"] == 2 and result["pairs"] == 24
    assert result["rows"] == 48 and result["triples"] == 24    # pairs are not counted as triples
    from speed_ray.store import find_run_model

    model = find_run_model(str(out))
    assert model and (tmp_path / "run").exists()
    from sentence_transformers import SentenceTransformer

    emb = SentenceTransformer(model, device="cpu").encode(["a passage on chess"])
    assert emb.shape[0] == 1
    assert main(argv) == 0 and "already trained" in capsys.readouterr().out
    # the evaluate command takes the output directory like any run
    from speed_ray.evaluate.cli import resolve_model_arg

    assert resolve_model_arg(str(out))[0] == model
    # a missing column names the file and row
    assert main(["train-embedder", str(data), "--base-model", "offline:minilm", "--out", str(tmp_path / "r2")]) == 2
    assert "has no column 'query'" in capsys.readouterr().err


def test_public_data_can_be_pairs_or_triples_in_any_format(tmp_path):
    """embedder.public_data reads what train-embedder reads: Parquet, JSONL or a `datasets` directory, rows with or
    without a negative (pairs train with in-batch negatives), and names the file, row and column of a bad row."""
    from datasets import Dataset

    from speed_ray.embedder.own_data import load_public

    rows = [{"query": f"q{i}", "positive": f"p{i}", **({"negative": f"n{i}"} if i % 2 else {})} for i in range(6)]
    (tmp_path / "pub.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist([{"query": r["query"], "positive": r["positive"]} for r in rows]),
                   tmp_path / "pairs.parquet")
    Dataset.from_list([{**r, "negative": r.get("negative")} for r in rows]).save_to_disk(str(tmp_path / "ds"))
    for path in ("pub.jsonl", "pairs.parquet", "ds"):
        got = load_public(str(tmp_path / path))
        assert [g["query"] for g in got] == [f"q{i}" for i in range(6)], path
        assert all(g["task_type"] == "public" for g in got)
        negs = [g["negative"] for g in got]
        assert negs == ([None] * 6 if path == "pairs.parquet" else [None, "n1", None, "n3", None, "n5"]), path
    (tmp_path / "bad.jsonl").write_text(json.dumps({"query": "q", "positive": ""}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 1, column 'positive'"):
        load_public(str(tmp_path / "bad.jsonl"))


def test_train_embedder_screens_and_mines_negatives_for_own_pairs(ray_local, tmp_path, capsys):
    """`--screen screen.mine=pairs`: the user's pairs get hard negatives mined from their own documents (the
    screen stage, under the false-negative margin), and train as triples."""
    import glob

    from speed_ray.cli import main

    rows = [{k: v for k, v in r.items() if k != "negative"} for r in _pairs_and_triples(32)]   # pairs only
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    argv = ["train-embedder", str(data), "--base-model", "offline:minilm", "--out", str(out), "--screen",
            "screen.mine=pairs", "screen.mine_rank_min=1", "screen.mine_rank_max=4", "screen.decontaminate=false",
            "screen.cpus_per_actor=0.5", "embedder.max_steps=1", "embedder.batch_size=8", "embedder.lora=false",
            "embedder.max_query_length=32", "embedder.max_doc_length=32"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "screened: kept 32 of 32 rows" in printed and "'mined': 32" in printed
    result = json.loads([line for line in printed.splitlines() if line.startswith("{")][-1])
    assert result["steps"] == 1 and result["pairs"] == 0 and result["triples"] == result["rows"] == 32   # all mined
    kept = pa.concat_tables([pq.read_table(f) for f in glob.glob(str(out / "stages/screen/*/data/*.parquet"))])
    docs = {r["positive"] for r in rows}
    for r in kept.to_pylist():
        assert r["negative"] in docs and r["negative"] != r["positive"]
        assert json.loads(r["lineage"])["screen"]["mined"]["rank_range"] == [1, 4]
