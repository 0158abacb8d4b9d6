"""Decontamination: synthetic texts checked against the texts of the evaluation tasks a run reports (pure).

Two tests, as in the decontamination of GPT-3 (Brown et al. 2020, Appendix C: 13-gram overlap) and of The Stack /
datatrove (MinHash near-duplicates):
- word n-gram containment: the share of the shorter text's n-grams (normalized words, `dedup.minhash.normalize`)
  that the other text holds; catches an evaluation text copied into a longer document and the reverse. An
  evaluation text shorter than `ngram` words (most STS and intent texts) is indexed as one n-gram of its own length,
  down to `min_ngram` words, so quoting it whole inside a longer text is caught too;
- MinHash similarity of word shingles (`dedup.minhash`, banded as in `dedup.lsh`): catches light edits of short
  texts whose n-grams the edit broke.

The index is plain numpy (sorted 64-bit keys with the evaluation text each came from), built once and shared by
every worker through the object store; it grows with the evaluation sets, not with the synthetic data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from speed_ray.dedup.lsh import band_hashes
from speed_ray.dedup.minhash import normalize, shingle_tokens, signatures_from_tokens

MAX_DOCS_PER_KEY = 64        # an n-gram or band key shared by more evaluation texts than this is common language


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """Unique uint64 hashes of the normalized text's word n-grams (none when it has fewer than n words)."""
    words = normalize(text).split(" ")
    if len(words) < n or words == [""]:
        return np.empty(0, np.uint64)
    grams = {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}
    blob = b"".join(hashlib.blake2b(g.encode(), digest_size=8).digest() for g in grams)
    return np.unique(np.frombuffer(blob, dtype="<u8").astype(np.uint64))


def _sorted_pairs(keys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if not keys:
        return np.empty(0, np.uint64), np.empty(0, np.int32)
    doc = np.concatenate([np.full(len(k), i, np.int32) for i, k in enumerate(keys)])
    flat = np.concatenate(keys).astype(np.uint64)
    order = np.argsort(flat, kind="stable")
    return flat[order], doc[order]


@dataclass
class DecontamIndex:
    tasks: list[str]                 # per evaluation text: the task it belongs to
    texts: list[str]                 # per evaluation text (kept to name what a hit matched)
    ngram: int
    gram_keys: np.ndarray            # sorted uint64 n-gram hashes
    gram_docs: np.ndarray            # the evaluation text of each
    gram_counts: np.ndarray          # n-grams per evaluation text
    gram_sizes: tuple[int, ...]      # the n-gram lengths the evaluation texts are indexed at
    sigs: np.ndarray                 # (texts, num_perm) uint32 MinHash signatures
    band_keys: np.ndarray            # sorted uint64 band keys
    band_docs: np.ndarray
    shingle: int
    num_perm: int
    seed: int
    bands: int
    rows: int

    def __len__(self) -> int:
        return len(self.texts)


def build_index(texts_by_task: dict[str, Sequence[str]], ngram: int = 8, shingle: int = 2, num_perm: int = 128,
                seed: int = 1, bands: int = 32, rows: int = 4, min_ngram: int | None = None) -> DecontamIndex:
    """The index of every evaluation text (empty and duplicate texts of a task left out). min_ngram (None: ngram)
    indexes texts shorter than ngram words whole, down to that many words."""
    min_ngram = ngram if min_ngram is None else min(min_ngram, ngram)
    tasks, texts = [], []
    for task, items in texts_by_task.items():
        seen = set()
        for t in items:
            key = normalize(t)
            if key and key not in seen:
                seen.add(key)
                tasks.append(task)
                texts.append(str(t))
    sizes = [_gram_size(t, ngram, min_ngram) for t in texts]
    grams = [ngram_hashes(t, n) if n else np.empty(0, np.uint64) for t, n in zip(texts, sizes)]
    gram_keys, gram_docs = _sorted_pairs(grams)
    sigs = signatures_from_tokens([shingle_tokens(t, shingle) for t in texts], num_perm, seed) if texts \
        else np.empty((0, num_perm), np.uint32)
    keys = band_hashes(sigs, bands, rows) if texts else np.empty((0, bands), np.uint64)
    band_keys, band_docs = _sorted_pairs(list(keys))
    return DecontamIndex(tasks, texts, ngram, gram_keys, gram_docs, np.array([len(g) for g in grams], np.int64),
                         tuple(sorted({n for n in sizes if n})), sigs, band_keys, band_docs, shingle, num_perm, seed,
                         bands, rows)


def _gram_size(text: str, ngram: int, min_ngram: int) -> int:
    """The n-gram length a text is indexed at: ngram, or its own length when shorter (0: too short to index)."""
    words = len(normalize(text).split())
    return ngram if words >= ngram else (words if words >= min_ngram else 0)


def _docs_of(keys: np.ndarray, sorted_keys: np.ndarray, docs: np.ndarray) -> np.ndarray:
    lo = np.searchsorted(sorted_keys, keys, "left")
    hi = np.searchsorted(sorted_keys, keys, "right")
    parts = [docs[a:b] for a, b in zip(lo, hi) if 0 < b - a <= MAX_DOCS_PER_KEY]
    return np.concatenate(parts) if parts else np.empty(0, np.int32)


def check_texts(index: DecontamIndex, texts: Sequence[str | None], ngram_threshold: float,
                minhash_threshold: float) -> list[dict | None]:
    """For each text: None, or the evaluation text it matches best, as {"task", "text", "method" ("ngram" |
    "minhash"), "score"}. ngram: the share of the shorter text's n-grams the two share; minhash: the estimated
    Jaccard similarity of their shingle sets."""
    out: list[dict | None] = [None] * len(texts)
    if not len(index):
        return out
    present = [i for i, t in enumerate(texts) if t and normalize(t)]
    if not present:
        return out
    sigs = signatures_from_tokens([shingle_tokens(texts[i], index.shingle) for i in present], index.num_perm,
                                  index.seed)
    keys = band_hashes(sigs, index.bands, index.rows)
    for j, i in enumerate(present):
        best = None
        for n in index.gram_sizes:      # an n-gram key only matches evaluation texts indexed at that n
            g = ngram_hashes(texts[i], n)
            if not g.size:
                continue
            docs = _docs_of(g, index.gram_keys, index.gram_docs)
            if docs.size:
                u, c = np.unique(docs, return_counts=True)
                share = c / np.minimum(g.size, index.gram_counts[u])
                k = int(np.argmax(share))
                if share[k] >= ngram_threshold and (best is None or share[k] > best["score"]):
                    best = {"doc": int(u[k]), "method": "ngram", "score": float(share[k])}
        if best is None:
            docs = np.unique(_docs_of(keys[j], index.band_keys, index.band_docs))
            if docs.size:
                jac = (index.sigs[docs] == sigs[j]).mean(axis=1)
                k = int(np.argmax(jac))
                if jac[k] >= minhash_threshold:
                    best = {"doc": int(docs[k]), "method": "minhash", "score": float(jac[k])}
        if best is not None:
            d = best.pop("doc")
            out[i] = {"task": index.tasks[d], "text": index.texts[d], **best}
    return out


def row_hits(index: DecontamIndex, columns: dict[str, Sequence], fields: Sequence[str], ngram_threshold: float,
             minhash_threshold: float) -> list[dict | None]:
    """Per row: the first of `fields` (in order) with a hit, as its hit plus {"field"}; None for clean rows."""
    n = len(next(iter(columns.values()))) if columns else 0
    out: list[dict | None] = [None] * n
    for f in fields:
        if f not in columns:
            continue
        todo = [i for i in range(n) if out[i] is None]
        hits = check_texts(index, [columns[f][i] for i in todo], ngram_threshold, minhash_threshold)
        for i, h in zip(todo, hits):
            if h is not None:
                out[i] = {"field": f, **h}
    return out
