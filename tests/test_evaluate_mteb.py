"""Local tasks through mteb.evaluate with all-MiniLM-L6-v2: protocol, instructions, cache, stage, CLI, compare."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from speed_ray.evaluate.config import EvalConfig

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "configs" / "tasks"

PAIRS = [("A man is playing a guitar.", "A man plays the guitar.", 4.8),
         ("A woman is slicing an onion.", "A woman is cutting an onion.", 4.5),
         ("A dog runs in the park.", "A cat sleeps on the sofa.", 0.6),
         ("The stock market fell sharply today.", "Shares dropped a lot on Monday.", 3.8),
         ("Kids are playing football.", "A chef is cooking pasta.", 0.2),
         ("Two people are dancing.", "A couple dances together.", 4.2)]


def _sts_task(tmp_path: Path, name: str = "TinySTS", extra: str = "") -> Path:
    (tmp_path / "pairs.tsv").write_text("".join(f"{a}\t{b}\t{s}\n" for a, b, s in PAIRS))
    y = tmp_path / f"{name}.yaml"
    y.write_text(textwrap.dedent(f"""\
        name: {name}
        type: sts
        files: [pairs.tsv]
        format: {{delimiter: "\\t", header: false, quoting: none}}
        columns: {{sentence1: 0, sentence2: 1, score: 2}}
        """) + extra)
    return y


def _retrieval_task(tmp_path: Path) -> Path:
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    docs = {"d1": ("Vitamin D", "Vitamin D deficiency is linked to bone loss."),
            "d2": ("Football", "The team won the championship final."),
            "d3": ("Coffee", "Caffeine improves short-term alertness.")}
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "title": t, "text": x}) + "\n"
                                               for k, (t, x) in docs.items()))
    (beir / "queries.jsonl").write_text('{"_id": "q1", "text": "Low vitamin D weakens bones."}\n'
                                        '{"_id": "q2", "text": "Caffeine makes people alert."}\n')
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td3\t1\n")
    y = tmp_path / "scifact_like.yaml"
    y.write_text("name: SciFact\ntype: retrieval\nbeir: beir\n")
    return y


def _clf_task(tmp_path: Path) -> Path:
    animals = ["The cat purrs.", "Dogs bark loudly.", "A horse gallops.", "Birds sing at dawn.", "The cow moos."]
    money = ["Interest rates rose.", "Stocks fell today.", "The bank lends money.", "Inflation is high.",
             "Bonds pay coupons."]
    rows = [(t, "animal") for t in animals] + [(t, "finance") for t in money]
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows[::1]))
    (tmp_path / "test.csv").write_text("text,label\nA puppy barks.,animal\nThe stock market crashed.,finance\n")
    y = tmp_path / "clf.yaml"
    y.write_text("name: TinyClf\ntype: classification\ntrain: {files: train.csv, columns: {text: text, label: "
                 "label}}\ntest: {files: test.csv, columns: {text: text, label: label}}\nn_experiments: 2\n"
                 "samples_per_label: 5\n")
    return y


def test_stsb_subset_is_spearman_of_cosine(minilm, evaldata, tmp_path):
    """mteb's STS protocol on the local STS-B loader equals Spearman(cosine) x 100 computed by hand."""
    from scipy.stats import spearmanr
    from sentence_transformers import SentenceTransformer

    from speed_ray.evaluate.local_tasks import load_spec, read_task
    from speed_ray.evaluate.run import run_evaluation

    cfg = EvalConfig(local_tasks=(str(TASKS / "stsb.yaml"),), data_root=str(evaldata), limit=120,
                     instructions=False, cache_dir=str(tmp_path / "cache"))
    res = run_evaluation("offline:minilm", cfg, str(tmp_path / "out"))
    score = res["models"]["offline:minilm"]["scores"]["STSBenchmark"]
    d = read_task(load_spec(TASKS / "stsb.yaml", data_root=str(evaldata)), limit=120)["test"]
    m = SentenceTransformer(minilm)
    a, b = m.encode(d["sentence1"]), m.encode(d["sentence2"])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert score == pytest.approx(spearmanr(d["score"], cos)[0] * 100, abs=1e-3)
    assert (tmp_path / "out" / "results.json").exists() and (tmp_path / "out" / "results.md").exists()


def test_instructions_go_to_queries_only(minilm, tmp_path):
    import mteb

    from speed_ray.evaluate.encoder import Embedder
    from speed_ray.evaluate.local_tasks import load_spec
    from speed_ray.evaluate.mteb_tasks import build_task

    seen: list[str] = []

    class Recording(Embedder):
        def _run(self, texts):
            seen.extend(texts)
            return super()._run(texts)

    enc = Recording("offline:minilm", instructions=True)
    tasks = [build_task(load_spec(_retrieval_task(tmp_path))),
             build_task(load_spec(_sts_task(tmp_path, extra="instruction: Find paraphrases\n")))]
    res = mteb.evaluate(enc, tasks, cache=None, show_progress_bar=False, encode_kwargs={"batch_size": 8})
    assert len(res.task_results) == 2
    q = "Instruct: Given a scientific claim, retrieve documents that support or refute the claim\nQuery: "
    assert q + "Low vitamin D weakens bones." in seen
    docs = [t for t in seen if "Vitamin D deficiency" in t or "championship" in t]
    assert docs and all(not t.startswith("Instruct:") for t in docs)
    assert "Vitamin D Vitamin D deficiency is linked to bone loss." in docs    # title + " " + text, like mteb
    # symmetric tasks: both sides are queries (E5-mistral); a local task's own instruction wins
    assert "Instruct: Find paraphrases\nQuery: A cat sleeps on the sofa." in seen


def test_cache_second_run_encodes_nothing_and_cli_prints_scores(minilm, tmp_path, capsys):
    from speed_ray.cli import main

    sts, clf = _sts_task(tmp_path), _clf_task(tmp_path)
    args = ["evaluate", "offline:minilm", "evaluate.instructions=false",
            f"evaluate.cache_dir={tmp_path / 'cache'}", "--local-tasks", f"{sts},{clf}", "--out"]
    assert main(args + [str(tmp_path / "run1")]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(args + [str(tmp_path / "run2")]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(first) == {"TinySTS", "TinyClf"} and first == second
    assert first["TinyClf"] == 100.0 and first["TinySTS"] > 80
    r1 = json.loads((tmp_path / "run1" / "results.json").read_text())["models"]["offline:minilm"]
    r2 = json.loads((tmp_path / "run2" / "results.json").read_text())["models"]["offline:minilm"]
    assert r1["encoded_texts"] == 12 + 10 + 2 and r2["encoded_texts"] == 0
    assert r1["types"] == {"TinySTS": "STS", "TinyClf": "Classification"}
    assert r1["averages"]["STS"] == first["TinySTS"]


def test_evaluate_stage_with_baseline_and_missing_task(minilm, tmp_path):
    from speed_ray.evaluate.stage import evaluate_stage
    from speed_ray.stage import StageContext
    from speed_ray.run_config import build_config
    from speed_ray.store import RunStore

    run_dir = tmp_path / "runs"
    missing = tmp_path / "missing.yaml"
    missing.write_text("name: Gone\ntype: sts\nfiles: [nowhere/x.tsv]\ncolumns: {sentence1: 0, sentence2: 1, "
                       "score: 2}\nformat: {header: false}\n")
    cfg = build_config({"run": {"name": "demo", "run_dir": str(run_dir)},
                        "evaluate": {"local_tasks": [str(_sts_task(tmp_path)), str(missing)],
                                     "baselines": [minilm], "instructions": False}})
    store = RunStore(str(run_dir))
    model = store.stage("train_embedder", "fp1")
    model.write_manifest({"model_path": minilm})
    out = store.stage("evaluate", "fp2")
    result = evaluate_stage(StageContext(cfg=cfg, name="evaluate", out=out, inputs={"model": model},
                                         store=store, run_name="demo"))
    assert set(result["scores"]) == {"TinySTS"} and result["skipped"][0]["task"] == "Gone"
    assert result["averages"]["average"] == result["scores"]["TinySTS"]
    base = result["baselines"][Path(minilm).name]
    assert base["scores"]["TinySTS"] == result["scores"]["TinySTS"]      # same weights, same score
    assert result["encoded_texts"][Path(minilm).name] == 0               # the run dir's cache served it
    md = Path(result["results_md"]).read_text()
    assert "TinySTS" in md and "Gone" in md and "Δ" in md
    assert json.loads(Path(result["results_path"]).read_text())["primary"] == "demo"


def test_compare_side_by_side(tmp_path, capsys):
    from speed_ray.cli import main

    def res(scores):
        types = {"STSBenchmark": "STS", "SICK-R": "STS", "SciFact": "Retrieval"}
        return {"format": "speed-ray-eval/1", "primary": "m", "models": {"m": {"scores": scores, "types": types}}}

    for name, scores in (("trained", {"STSBenchmark": 84.0, "SICK-R": 80.0, "SciFact": 70.0}),
                         ("base", {"STSBenchmark": 82.0, "SICK-R": 77.0, "SciFact": 64.5})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(res(scores)))
    assert main(["compare", str(tmp_path / "trained"), str(tmp_path / "base"), "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == {"trained": {"STSBenchmark": 84.0, "SICK-R": 80.0, "SciFact": 70.0},
                                   "base": {"STSBenchmark": 82.0, "SICK-R": 77.0, "SciFact": 64.5}}
    text = "\n".join(out)
    assert "| SciFact | Retrieval | 70.00 | 64.50 | +5.50 |" in text
    assert "| STS | 2 | 82.00 | 79.50 | +2.50 |" in text
    assert "| **Average** | 3 | 78.00 | 74.50 | +3.50 |" in text
    table = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert table["categories"]["Retrieval"] == {"trained": 70.0, "base": 64.5}


def test_ray_data_encoding_matches_local(minilm, ray_local):
    from sentence_transformers import SentenceTransformer

    from speed_ray.evaluate.distributed import encode_on_ray

    texts = [a for a, _, _ in PAIRS] + [b for _, b, _ in PAIRS]
    got = encode_on_ray(texts, minilm, batch_size=4, max_length=256, num_workers=1, use_gpu=False)
    want = SentenceTransformer(minilm).encode(texts)
    assert got.shape == want.shape and np.allclose(got, want, atol=1e-5)
