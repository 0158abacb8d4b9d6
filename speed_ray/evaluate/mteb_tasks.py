"""Real mteb task objects over local files, so scoring follows mteb's own protocol (STS, retrieval,
classification, pair classification); also deterministic subsampling of any loaded mteb task for smoke tests."""

from __future__ import annotations

import random
from typing import Any

from speed_ray.evaluate.local_tasks import MTEB_TYPES, LocalTaskSpec, read_task, subsample
from speed_ray.store import stable_hash


def _metadata(spec: LocalTaskSpec, revision: str):
    from mteb.abstasks.task_metadata import TaskMetadata

    return TaskMetadata(
        name=spec.name, description=spec.description, reference=None,
        dataset={"path": f"local/{spec.name}", "revision": revision},
        type=MTEB_TYPES[spec.type], category="t2t", modalities=["text"], eval_splits=[spec.split],
        eval_langs=["eng-Latn"], main_score=spec.main_score, date=None, domains=None, task_subtypes=None,
        license=None, annotations_creators=None, dialect=None, sample_creation=None, bibtex_citation=None,
        prompt=spec.instruction)


def build_task(spec: LocalTaskSpec, limit: int | None = None):
    """An mteb AbsTask of the spec's type whose load_data reads the local files (lazily, like hub tasks)."""
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.classification import AbsTaskClassification
    from mteb.abstasks.pair_classification import AbsTaskPairClassification
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.sts import AbsTaskSTS

    revision = stable_hash({"source": spec.source, "limit": limit,
                            "files": [(str(p), p.stat().st_size if p.exists() else None) for p in spec.files()]})
    split = spec.split
    # What reading the files left out (skip_bad_lines), for the results: on the class, so it is the same dict
    # however mteb copies or reloads the task.
    report: dict[str, Any] = {"skipped_lines": None, "skipped_examples": []}

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        data = read_task(spec, limit)
        report.update(skipped_lines=data["skipped_lines"], skipped_examples=data["skipped_examples"])
        if spec.type in ("sts", "pair_classification"):
            cols = data["test"]
            if spec.type == "pair_classification":
                cols = {"sentence1": cols["sentence1"], "sentence2": cols["sentence2"], "labels": cols["label"]}
            self.dataset = DatasetDict({split: Dataset.from_dict(cols)})
        elif spec.type == "classification":
            self.dataset = DatasetDict({"train": Dataset.from_dict(data["train"]),  # label ids (label_names)
                                        split: Dataset.from_dict(data["test"])})
        else:
            corpus = Dataset.from_dict({"id": list(data["corpus"]),
                                        "title": [d["title"] for d in data["corpus"].values()],
                                        "text": [d["text"] for d in data["corpus"].values()]})
            queries = Dataset.from_dict({"id": list(data["queries"]), "text": list(data["queries"].values())})
            self.dataset = {"default": {split: {"corpus": corpus, "queries": queries,
                                                "relevant_docs": data["qrels"], "top_ranked": None}}}
        self.data_loaded = True

    attrs: dict[str, Any] = {"metadata": _metadata(spec, revision), "load_data": load_data,
                             "__module__": __name__, "local_spec": spec, "local_report": report}
    if spec.type == "sts":
        base = AbsTaskSTS
        attrs.update(min_score=spec.score_range[0], max_score=spec.score_range[1])
    elif spec.type == "pair_classification":
        base = AbsTaskPairClassification
    elif spec.type == "classification":
        base = AbsTaskClassification
        attrs.update(n_experiments=spec.n_experiments, samples_per_label=spec.samples_per_label,
                     train_split="train")
    else:
        base = AbsTaskRetrieval
    cls = type(f"Local{base.__name__[7:]}_{spec.name.replace('-', '_').replace('.', '_')}", (base,), attrs)
    return cls(seed=spec.seed)


def limit_loaded_task(task, limit: int, seed: int = 42) -> None:
    """Subsample an already-loaded hub task in place: at most `limit` eval rows / queries per split."""
    ds = task.dataset
    subsets = ds if isinstance(ds, dict) and all(isinstance(v, dict) for v in ds.values()) and \
        not _is_split_map(ds) else {"default": ds}
    for name, splits in subsets.items():
        for split in list(task.eval_splits):
            if split not in splits:
                continue
            data = splits[split]
            if isinstance(data, dict) and "queries" in data:
                _limit_retrieval(data, limit, seed)
            elif hasattr(data, "select") and len(data) > limit:
                splits[split] = data.select(subsample(len(data), limit, seed))
        train = getattr(task, "train_split", None)
        if train and train in splits and hasattr(splits[train], "select") and len(splits[train]) > 10 * limit:
            splits[train] = splits[train].select(subsample(len(splits[train]), 10 * limit, seed))


def _is_split_map(ds: dict) -> bool:
    return any(hasattr(v, "select") or (isinstance(v, dict) and "queries" in v) for v in ds.values())


def _limit_retrieval(data: dict, limit: int, seed: int) -> None:
    queries, rel = data["queries"], data["relevant_docs"]
    ids = [q for q in queries["id"] if rel.get(q)]
    if len(ids) <= limit:
        return
    keep_q = {ids[i] for i in subsample(len(ids), limit, seed)}
    data["queries"] = queries.filter(lambda r: r["id"] in keep_q)
    data["relevant_docs"] = {q: rel[q] for q in keep_q}
    keep_d = {d for q in keep_q for d in rel[q]}
    if data.get("top_ranked"):
        data["top_ranked"] = {q: data["top_ranked"][q] for q in keep_q if q in data["top_ranked"]}
        keep_d |= {d for docs in data["top_ranked"].values() for d in docs}
    corpus = data["corpus"]
    others = [i for i, d in enumerate(corpus["id"]) if d not in keep_d]
    extra = set(random.Random(seed).sample(others, min(len(others), max(0, 10 * limit - len(keep_d)))))
    data["corpus"] = corpus.select([i for i, d in enumerate(corpus["id"]) if d in keep_d or i in extra])
