"""Local task YAMLs: validation errors name the file and key; loaders read users' formats as they are."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from speed_ray.evaluate.config import EvalConfig
from speed_ray.evaluate.local_tasks import (LocalTaskError, load_spec, parse_id_list, parse_quoted_strings,
                                            read_task, resolve_data_root)

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "configs" / "tasks"


def _yaml(tmp_path: Path, text: str, name: str = "task.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


@pytest.mark.parametrize("body, key, words", [
    ("name: X\ntype: stss\nfiles: [a.tsv]\ncolumns: {sentence1: 0, sentence2: 1, score: 2}\n", "type", "sts"),
    ("type: sts\nfiles: [a.tsv]\ncolumns: {sentence1: 0, sentence2: 1, score: 2}\n", "name", "name"),
    ("name: X\ntype: sts\nfiles: [a.tsv]\ncolumns: {sentence1: 0, score: 2}\n", "columns", "sentence2"),
    ("name: X\ntype: sts\nfiles: [a.tsv]\ncolumns: {sentence1: 0, sentence2: 1, score: 2}\nfromat: {}\n",
     "fromat", "unknown key"),
    ("name: X\ntype: sts\nfiles: [a.tsv]\nformat: {header: false}\n"
     "columns: {sentence1: s1, sentence2: 1, score: 2}\n", "columns.sentence1", "no header"),
    ("name: X\ntype: sts\nfiles: [a.tsv]\nformat: {delimiter: 'ab'}\n"
     "columns: {sentence1: 0, sentence2: 1, score: 2}\n", "format.delimiter", "one character"),
    ("name: X\ntype: classification\ntrain: {files: [a.csv], columns: {text: t, label: l}}\n", "test", "test"),
    ("name: X\ntype: retrieval\ncorpus: {files: [c.csv], columns: {id: i, text: t}}\n"
     "queries: {files: [q.csv], columns: {id: i, text: t}}\n", "qrels", "qrels"),
    ("name: X\ntype: retrieval\ncorpus: {files: [c.csv], columns: {id: i, text: t}, parse: {text: magic}}\n"
     "queries: {files: [q.csv], columns: {id: i, text: t, relevant: r}}\n", "corpus.parse.text", "parser"),
    ("name: X\ntype: sts\nfiles: [a.tsv]\ncolumns: {sentence1: 0, sentence2: 1, score: 2}\n"
     "score_range: [5, 0]\n", "score_range", "min < max"),
    ("name: X\ntype: sts\nfiles: [a.tsv]\ncolumns: {sentence1: 0, sentence2: 1, score: 2}\n"
     "skip_bad_lines: yes please\n", "skip_bad_lines", "true or false"),
])
def test_validation_errors_name_file_and_key(tmp_path, body, key, words):
    path = _yaml(tmp_path, body)
    with pytest.raises(LocalTaskError) as e:
        load_spec(path)
    msg = str(e.value)
    assert str(path) in msg and f"'{key}'" in msg and words in msg, msg


def test_missing_yaml_and_missing_column(tmp_path):
    with pytest.raises(LocalTaskError, match="not found"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "a.csv").write_text("s1,s2,score\na,b,1\n")
    spec = load_spec(_yaml(tmp_path, "name: X\ntype: sts\nfiles: [a.csv]\n"
                                     "columns: {sentence1: s1, sentence2: sentence2, score: score}\n"))
    with pytest.raises(LocalTaskError, match=r"at 'columns.sentence2'.*'sentence2' is not in a.csv's header"):
        read_task(spec)


def test_sts_tsv_without_header_ignores_extra_fields_and_quotes(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "test.tsv").write_text(
        'g\tf\t2012\t1\t2.5\tA "quoted girl.\tA girl.\textra\tmore\n'
        "g\tf\t2012\t2\t4.0\tMen play.\tBoys play.\n\n")
    spec = load_spec(_yaml(tmp_path, """\
        name: MySTS
        type: sts
        files: [d/test.tsv]
        format: {delimiter: "\\t", header: false, quoting: none}
        columns: {score: 4, sentence1: 5, sentence2: 6}
        """), data_root=str(tmp_path))
    d = read_task(spec)["test"]
    assert d == {"sentence1": ['A "quoted girl.', "Men play."], "sentence2": ["A girl.", "Boys play."],
                 "score": [2.5, 4.0]}


def test_bad_score_names_line(tmp_path):
    (tmp_path / "a.csv").write_text("s1,s2,score\na,b,high\n")
    spec = load_spec(_yaml(tmp_path, "name: X\ntype: sts\nfiles: [a.csv]\n"
                                     "columns: {sentence1: s1, sentence2: s2, score: score}\n"))
    with pytest.raises(LocalTaskError, match=r"a.csv:2: score 'high' is not a number"):
        read_task(spec)


def test_data_root_resolution(tmp_path, monkeypatch):
    y = tmp_path / "t.yaml"
    monkeypatch.setenv("MY_ROOT", str(tmp_path / "env"))
    assert resolve_data_root("${MY_ROOT:-fallback}", None, y) == str(tmp_path / "env")
    monkeypatch.delenv("MY_ROOT")
    monkeypatch.chdir(tmp_path)
    assert resolve_data_root("${MY_ROOT:-fallback}", None, y) == str(tmp_path / "fallback")
    assert resolve_data_root("${MY_ROOT:-fallback}", str(tmp_path / "cfg"), y) == str(tmp_path / "cfg")
    assert resolve_data_root(None, None, y) == str(tmp_path)


def test_quoted_strings_and_id_lists():
    printed = ("['First sentence.'\n 'It\\'s second.' \"Alzheimer's third.\"\n 'Unclosed \\x' 'p = 0.016) and']")
    assert parse_quoted_strings(printed) == "First sentence. It's second. Alzheimer's third. Unclosed \\x " \
                                            "p = 0.016) and"
    assert parse_quoted_strings("plain text") == "plain text"
    assert parse_id_list("[14717500 1234]") == ["14717500", "1234"]
    assert parse_id_list("['a', 'b']") == ["a", "b"]
    assert parse_id_list("[]") == []


def test_retrieval_beir_layout_and_csv_qrels(tmp_path):
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in [
        {"_id": "d1", "title": "T1", "text": "one"}, {"_id": "d2", "title": "", "text": "two"},
        {"_id": "d3", "title": "T3", "text": "three"}]) + "\n")
    (beir / "queries.jsonl").write_text('{"_id": "q1", "text": "first?"}\n{"_id": "q2", "text": "second?"}\n')
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td3\t2\n")
    spec = load_spec(_yaml(tmp_path, "name: MyBeir\ntype: retrieval\nbeir: beir\n"), data_root=str(tmp_path))
    d = read_task(spec)
    assert d["corpus"]["d1"] == {"title": "T1", "text": "one"} and len(d["corpus"]) == 3
    assert d["queries"] == {"q1": "first?"}          # q2 has no relevant document: not evaluated (mteb)
    assert d["qrels"] == {"q1": {"d1": 1, "d3": 2}}
    # qrels that cite a document missing from the corpus are a data error
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td9\t1\n")
    with pytest.raises(LocalTaskError, match="not in the corpus"):
        read_task(spec)


def test_classification_and_pair_classification(tmp_path):
    (tmp_path / "train.csv").write_text('text,category\n"hello, there",greet\nbye,leave\n')
    (tmp_path / "test.csv").write_text("text,category\nhi,greet\n")
    spec = load_spec(_yaml(tmp_path, """\
        name: MyClf
        type: classification
        train: {files: train.csv, columns: {text: text, label: category}}
        test: {files: test.csv, columns: {text: text, label: category}}
        """))
    d = read_task(spec)
    assert d["train"] == {"text": ["hello, there", "bye"], "label": [0, 1]} and d["label_names"] == ["greet", "leave"]
    assert d["test"]["label"] == [0] and spec.n_experiments == 10 and spec.samples_per_label == 8
    (tmp_path / "names.json").write_text('["leave", "greet", "other"]')
    spec = load_spec(_yaml(tmp_path, "name: MyClf\ntype: classification\nlabels: names.json\n"
                                     "train: {files: train.csv, columns: {text: text, label: category}}\n"
                                     "test: {files: test.csv, columns: {text: text, label: category}}\n", "c2.yaml"))
    assert read_task(spec)["train"]["label"] == [1, 0]
    (tmp_path / "names.json").write_text('["leave"]')
    with pytest.raises(LocalTaskError, match=r"train.csv:2: label is not in `labels`"):
        read_task(spec)
    (tmp_path / "pairs.tsv").write_text("a\tb\t1\nc\td\t0\n")
    spec = load_spec(_yaml(tmp_path, "name: MyPairs\ntype: pair_classification\nfiles: [pairs.tsv]\n"
                                     "format: {header: false}\ncolumns: {sentence1: 0, sentence2: 1, label: 2}\n",
                           "pairs.yaml"))
    assert read_task(spec)["test"] == {"sentence1": ["a", "c"], "sentence2": ["b", "d"], "label": [1, 0]}


def test_limit_is_deterministic(tmp_path):
    (tmp_path / "a.tsv").write_text("".join(f"s{i}\tt{i}\t{i % 5}\n" for i in range(50)))
    spec = load_spec(_yaml(tmp_path, "name: X\ntype: sts\nfiles: [a.tsv]\nformat: {header: false}\n"
                                     "columns: {sentence1: 0, sentence2: 1, score: 2}\n"))
    a, b = read_task(spec, limit=10)["test"], read_task(spec, limit=10)["test"]
    assert a == b and len(a["score"]) == 10
    assert [int(s[1:]) for s in a["sentence1"]] == sorted(int(s[1:]) for s in a["sentence1"])


def test_missing_data_files_are_skipped_not_fatal(tmp_path):
    from speed_ray.evaluate.run import resolve_tasks

    cfg = EvalConfig(local_tasks=(str(TASKS / "stsb.yaml"),), data_root=str(tmp_path / "nowhere"))
    tasks, skipped = resolve_tasks(cfg)
    assert tasks == [] and skipped[0]["task"] == "STSBenchmark"
    assert skipped[0]["missing"].endswith("stsb/sts-test.csv")


def test_shipped_task_yamls_load():
    for name in ("stsb", "sickr", "scifact", "banking77"):
        spec = load_spec(TASKS / f"{name}.yaml")
        assert spec.files()


def test_shared_evaldata_row_counts(evaldata):
    counts = {}
    for name in ("stsb", "sickr", "scifact", "banking77"):
        d = read_task(load_spec(TASKS / f"{name}.yaml", data_root=str(evaldata)))
        if "corpus" in d:
            counts[name] = (len(d["queries"]), len(d["corpus"]), sum(len(v) for v in d["qrels"].values()))
        elif "train" in d:
            counts[name] = (len(d["train"]["text"]), len(d["test"]["text"]), len(set(d["train"]["label"])))
            assert d["label_names"][0] == "card_arrival"       # the order of categories.json
        else:
            counts[name] = len(d["test"]["score"])
    assert counts == {"stsb": 1379, "sickr": 9927, "scifact": (300, 5183, 339), "banking77": (10003, 3080, 77)}
    scifact = read_task(load_spec(TASKS / "scifact.yaml", data_root=str(evaldata)))
    doc = scifact["corpus"]["4983"]
    assert doc["title"].startswith("Microstructural development") and doc["text"].startswith("Alterations of")
    assert "['" not in doc["text"] and "'\n" not in doc["text"]


# ---- rows without a gold score (issue 19): an error naming file, line and column, or skip_bad_lines ------------

GOOD = [("A man plays a guitar.", "A man is playing guitar.", "4.8"), ("A dog runs.", "A cat sleeps.", "0.6"),
        ("Kids play football.", "Children play soccer.", "4.0")]


def _sts_yaml(tmp_path: Path, extra: str = "", columns: str = "{sentence1: 0, sentence2: 1, score: 2}",
              header: bool = False) -> Path:
    return _yaml(tmp_path, f"name: SemEvalLike\ntype: sts\nfiles: [sts.tsv]\n"
                           f"format: {{delimiter: \"\\t\", header: {str(header).lower()}, quoting: none}}\n"
                           f"columns: {columns}\n" + extra)


@pytest.mark.parametrize("bad, role, what", [
    ("s one\ts two\t", "score", "score is empty"),                  # SemEval: a pair without a gold score
    ("s one\ts two\tn/a", "score", "score 'n/a' is not a number"),
    ("s one\ts two\tnan", "score", "score 'nan' is not a number"),
    ("\ts two\t3.0", "sentence1", "sentence1 is empty"),
    ("s one\t  \t3.0", "sentence2", "sentence2 is empty"),
    ("s one\ts two", "score", "score is missing"),                  # a short line
])
def test_bad_sts_row_is_an_error_naming_file_line_and_column(tmp_path, bad, role, what):
    data = tmp_path / "sts.tsv"
    data.write_text("\t".join(GOOD[0]) + "\n" + bad + "\n" + "\t".join(GOOD[1]) + "\n")
    spec = load_spec(_sts_yaml(tmp_path))
    with pytest.raises(LocalTaskError) as e:
        read_task(spec)
    msg = str(e.value)
    col = {"sentence1": 0, "sentence2": 1, "score": 2}[role]
    assert f"{data}:2: {what}" in msg, msg                                   # the file and its line
    assert f"(column {col}" in msg and f"'columns.{role}'" in msg, msg       # the column
    assert "skip_bad_lines: true" in msg, msg                                # and how to skip such rows


def test_bad_row_error_names_a_header_column(tmp_path):
    (tmp_path / "sts.tsv").write_text("s1\ts2\tgold\n" + "\t".join(GOOD[0]) + "\nx\ty\t\n")
    spec = load_spec(_sts_yaml(tmp_path, columns="{sentence1: s1, sentence2: s2, score: gold}", header=True))
    with pytest.raises(LocalTaskError, match=r"sts.tsv:3: score is empty \(column 'gold'\)"):
        read_task(spec)


@pytest.mark.parametrize("option", ["skip_bad_lines: true\n", "format: {delimiter: \"\\t\", header: false, "
                                    "quoting: none, skip_bad_lines: true}\n"])
def test_skip_bad_lines_skips_and_counts(tmp_path, caplog, option):
    bad = ["no gold\tscore here\t", "bad\tscore\tn/a", "\tempty first\t1.0", "too\tshort"]
    lines = ["\t".join(GOOD[0]), bad[0], bad[1], "\t".join(GOOD[1]), bad[2], bad[3], "\t".join(GOOD[2])]
    (tmp_path / "sts.tsv").write_text("\n".join(lines) + "\n")
    y = _sts_yaml(tmp_path) if option.startswith("skip") else _yaml(
        tmp_path, "name: SemEvalLike\ntype: sts\nfiles: [sts.tsv]\ncolumns: {sentence1: 0, sentence2: 1, score: 2}\n")
    y.write_text(y.read_text() + option)
    with caplog.at_level("WARNING", logger="speed_ray.evaluate"):
        d = read_task(load_spec(y))
    assert d["test"] == {"sentence1": [g[0] for g in GOOD], "sentence2": [g[1] for g in GOOD],
                         "score": [4.8, 0.6, 4.0]}
    assert d["skipped_lines"] == 4
    assert [e.split(": ", 1)[0] for e in d["skipped_examples"]] == [f"{tmp_path / 'sts.tsv'}:{n}" for n in (2, 3, 5, 6)]
    assert "score is empty" in d["skipped_examples"][0]
    assert any("SemEvalLike: skipped 4 bad lines" in r.getMessage() for r in caplog.records), caplog.text
    # limit subsamples the good rows only
    assert len(read_task(load_spec(y), limit=2)["test"]["score"]) == 2
    # a file with nothing bad reports 0
    (tmp_path / "sts.tsv").write_text("\t".join(GOOD[0]) + "\n")
    assert read_task(load_spec(y))["skipped_lines"] == 0


def test_skip_bad_lines_covers_pairs_qrels_and_bad_json(tmp_path):
    (tmp_path / "pairs.tsv").write_text("a\tb\t1\nc\td\t\ne\tf\tyes\ng\th\t0\n")
    y = _yaml(tmp_path, "name: P\ntype: pair_classification\nfiles: [pairs.tsv]\nformat: {header: false}\n"
                        "columns: {sentence1: 0, sentence2: 1, label: 2}\n", "p.yaml")
    with pytest.raises(LocalTaskError, match=r"pairs.tsv:2: label is empty \(column 2\)"):
        read_task(load_spec(y))
    y.write_text(y.read_text() + "skip_bad_lines: true\n")
    d = read_task(load_spec(y))
    assert d["test"]["label"] == [1, 0] and d["skipped_lines"] == 2
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text('{"_id": "d1", "title": "", "text": "one"}\n{"_id": "d2", "text": \n')
    (beir / "queries.jsonl").write_text('{"_id": "q1", "text": "first?"}\n')
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t\n")
    y = _yaml(tmp_path, "name: B\ntype: retrieval\nbeir: beir\n", "b.yaml")
    with pytest.raises(LocalTaskError, match=r"corpus.jsonl:2: not valid JSON"):
        read_task(load_spec(y))
    y.write_text(y.read_text() + "skip_bad_lines: true\n")
    d = read_task(load_spec(y))
    assert d["corpus"] == {"d1": {"title": "", "text": "one"}} and d["qrels"] == {"q1": {"d1": 1}}
    assert d["skipped_lines"] == 2


def _skipping_sts(tmp_path: Path) -> Path:
    rows = ["\t".join(g) for g in GOOD] + ["A woman slices an onion.\tA woman cuts an onion.\t4.5",
                                           "no gold\tscore\t", "other\tpair\t-"]
    (tmp_path / "sts.tsv").write_text("\n".join(rows) + "\n")
    return _sts_yaml(tmp_path, "skip_bad_lines: true\n")


def test_skipped_count_reaches_the_task_and_results(tmp_path):
    from speed_ray.evaluate.mteb_tasks import build_task
    from speed_ray.evaluate.run import skipped_lines, write_results

    task = build_task(load_spec(_skipping_sts(tmp_path)))
    assert skipped_lines([task]) == {}                     # nothing read yet
    task.load_data()
    assert len(task.dataset["test"]) == 4
    assert task.local_report["skipped_lines"] == 2 and len(task.local_report["skipped_examples"]) == 2
    assert skipped_lines([task]) == {"SemEvalLike": 2}
    write_results({"format": "speed-ray-eval/1", "primary": "m", "models": {}, "skipped": [],
                   "skipped_lines": skipped_lines([task])}, str(tmp_path / "out"))
    assert "Bad lines skipped (skip_bad_lines): SemEvalLike 2" in (tmp_path / "out" / "results.md").read_text()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["skipped_lines"] == {"SemEvalLike": 2}


def test_skipped_count_in_an_evaluation(minilm, tmp_path):
    from speed_ray.evaluate.run import run_evaluation

    cfg = EvalConfig(local_tasks=(str(_skipping_sts(tmp_path)),), instructions=False,
                     cache_dir=str(tmp_path / "cache"))
    res = run_evaluation("offline:minilm", cfg, str(tmp_path / "out"))
    assert res["skipped_lines"] == {"SemEvalLike": 2}
    detail = json.loads((tmp_path / "out" / "results.json").read_text())["models"]["offline:minilm"]["details"]
    assert detail["SemEvalLike"]["skipped_lines"] == 2
    assert "score is empty" in detail["SemEvalLike"]["skipped_examples"][0]
    assert "SemEvalLike 2" in (tmp_path / "out" / "results.md").read_text()
