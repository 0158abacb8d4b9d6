"""Guide-model scores of a sample and what they decide (pure: numpy in, numpy out).

A triple (query, positive, negative) is judged by a guide model's similarities: `pos` = s(query, positive),
`neg` = s(query, negative), `margin` = pos - neg. Its negative is a likely false negative when it scores within
`margin` of its positive or above it (neg > pos - margin), as GISTEmbed masks in-batch candidates
(Solatorio 2024, https://arxiv.org/abs/2402.16829; sentence-transformers' GISTEmbedLoss, "absolute" strategy),
or when it restates the positive (s(positive, negative) >= a threshold; bi-encoder guides). A negative that is the
positive with a few words dropped copies it (`copies_positive`, no model needed).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
# Words whose removal reverses a text's meaning: a negative made by dropping one is a hard negative, not a copy
NEGATIONS = frozenset("not no never nor none nothing nobody nowhere neither cannot cant without dont doesnt didnt isnt "
                      "arent wasnt werent wont wouldnt shouldnt couldnt hasnt havent hadnt aint".split())
COPY_MIN_WORDS = 4   # shorter positives (labels, "very positive") are left to the guide


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of a with the same row of b."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(na * nb, 1e-12)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def false_negative(pos: np.ndarray, neg: np.ndarray, margin: float) -> np.ndarray:
    """True where a negative scores within `margin` of its positive or above it; NaN (no negative) is never one."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    with np.errstate(invalid="ignore"):
        return ~np.isnan(neg) & (neg > pos - margin)


def resembles(pos_neg: np.ndarray | None, floor: float | None, n: int) -> np.ndarray:
    """Where the margin rule may fire: the guide's similarity of negative and positive is at least `floor` (a
    negative as close to the query as the positive but unlike it is a hard negative, not a false negative). None
    (no floor), or no positive-negative scores (a cross-encoder guide): everywhere."""
    if floor is None or pos_neg is None:
        return np.ones(n, bool)
    pos_neg = np.asarray(pos_neg, np.float64)
    with np.errstate(invalid="ignore"):
        return ~np.isnan(pos_neg) & (pos_neg >= floor)


def restates(pos_neg: np.ndarray, threshold: float | None) -> np.ndarray:
    """True where a negative restates its positive: the guide's similarity of the two is at least `threshold`
    (near-copies and paraphrases of the positive, which the query-side margin misses when the guide scores both
    low). None disables it; NaN (no negative) is never one."""
    pos_neg = np.asarray(pos_neg, np.float64)
    if threshold is None:
        return np.zeros(pos_neg.shape, bool)
    with np.errstate(invalid="ignore"):
        return ~np.isnan(pos_neg) & (pos_neg >= threshold)


def remine(pos: np.ndarray, cand: np.ndarray, allowed: np.ndarray, margin: float,
           rank_range: tuple[int, int] = (0, 1 << 30)) -> np.ndarray:
    """A replacement negative for each row: the index of the highest-scoring allowed candidate that is not a
    likely false negative (score <= pos - margin), taken at `rank_range` (start, stop) among those, or -1.

    pos: (n,) each query's score with its positive; cand: (n, m) each query's score with m candidates;
    allowed: (n, m) bool, False where a candidate may not be used (the row's own positive, another task type)."""
    cand = np.asarray(cand, np.float64)
    ok = np.asarray(allowed, bool) & (cand <= np.asarray(pos, np.float64)[:, None] - margin)
    scored = np.where(ok, cand, -np.inf)
    order = np.argsort(-scored, axis=1, kind="stable")
    start, stop = rank_range
    out = np.full(cand.shape[0], -1, np.int64)
    for i in range(cand.shape[0]):
        if start < min(stop, int(ok[i].sum())):
            out[i] = order[i, start]
    return out


def quantiles(values: Iterable[float], qs: Sequence[float] = QUANTILES) -> dict:
    """{"n", "mean", "p05", ..., "p95"} over the finite values (None where there are none)."""
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))],
                   np.float64)
    keys = [f"p{round(q * 100):02d}" for q in qs]
    if v.size == 0:
        return {"n": 0, "mean": None, **{k: None for k in keys}}
    return {"n": int(v.size), "mean": round(float(v.mean()), 6),
            **{k: round(float(x), 6) for k, x in zip(keys, np.quantile(v, qs))}}


SCORE_COLUMNS = ("guide_pos_score", "guide_neg_score", "guide_margin")


def summarize(task_types: Sequence[str], columns: dict[str, Sequence[float]]) -> dict:
    """The manifest's `quality` summary: per task type (and "all"), the quantiles of each score column.

    {"all": {"rows": n, "guide_pos_score": {n, mean, p05..p95}, "guide_neg_score": {...}, "guide_margin": {...}},
     "by_task_type": {task_type: {same shape}}}"""
    tt = np.asarray([str(t) for t in task_types], dtype=object)
    cols = {k: np.asarray([np.nan if x is None else x for x in v], np.float64) for k, v in columns.items()}

    def block(mask: np.ndarray) -> dict:
        return {"rows": int(mask.sum()), **{k: quantiles(v[mask]) for k, v in cols.items()}}

    everything = np.ones(len(tt), bool)
    return {"all": block(everything),
            "by_task_type": {t: block(tt == t) for t in sorted(set(tt.tolist()))}}


def mine_corpus(queries: np.ndarray, pos: np.ndarray, corpus: np.ndarray, exclude: Sequence[Iterable[int]],
                margin: float, rank_range: tuple[int, int], sampling: str = "top", seeds: Sequence[int] | None = None,
                chunk: int = 65536, accept: Callable[[int, int], bool] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Hard negatives from a corpus: for each query, the candidates that are not likely false negatives (score <=
    pos - margin, as in `false_negative`) and not excluded (the row's own positive and query), ranked by score;
    the negative is the one at rank `rank_range[0]` ("top") or a seeded random one among ranks [start, stop)
    ("random"), as sentence-transformers' mine_hard_negatives takes range_min / range_max / margin.

    queries (n, d) and corpus (m, d) are unit-norm embeddings; pos (n,) each query's score with its positive;
    exclude[i]: corpus indices row i may not take; accept(i, j), when given, whether row i may take corpus text j
    (the screen's other false-negative rules, on the candidate against the row's positive). Returns (index (n,), -1
    where no candidate is in range; score). The corpus is scanned in chunks, holding only each row's best candidates
    (`stop`, twice that with `accept`), so memory is O(n * stop)."""
    q = np.asarray(queries, np.float32)
    n = q.shape[0]
    start, stop = rank_range
    if not 0 <= start < stop:
        raise ValueError(f"rank range must be 0 <= start < stop, got {rank_range}")
    limit = (np.asarray(pos, np.float64) - margin)[:, None]
    extra = max((len(list(e)) for e in exclude), default=0)   # excluded ones can sit among the best
    keep = stop * (2 if accept is not None else 1) + extra   # room for candidates accept turns down
    best_s = np.full((n, 0), -np.inf, np.float32)
    best_i = np.zeros((n, 0), np.int64)
    for c0 in range(0, corpus.shape[0], chunk):
        s = q @ np.asarray(corpus[c0:c0 + chunk], np.float32).T
        s[s > limit] = -np.inf
        s_all = np.concatenate([best_s, s], axis=1)
        i_all = np.concatenate([best_i, np.broadcast_to(np.arange(c0, c0 + s.shape[1]), s.shape)], axis=1)
        if s_all.shape[1] > keep:
            top = np.argpartition(-s_all, keep - 1, axis=1)[:, :keep]
            s_all = np.take_along_axis(s_all, top, axis=1)
            i_all = np.take_along_axis(i_all, top, axis=1)
        best_s, best_i = s_all, i_all
    out = np.full(n, -1, np.int64)
    score = np.full(n, np.nan)
    for r in range(n):
        ex = set(exclude[r])
        order = np.lexsort((best_i[r], -best_s[r]))          # best first; ties by corpus index (deterministic)
        ranked = [int(best_i[r, k]) for k in order if np.isfinite(best_s[r, k]) and int(best_i[r, k]) not in ex]
        if accept is not None:
            ranked = [j for j in ranked if accept(r, j)]
        window = ranked[start:stop]
        if not window:
            continue
        if sampling == "random":
            rng = np.random.default_rng(None if seeds is None else int(seeds[r]) & 0xFFFFFFFF)
            pick = window[int(rng.integers(len(window)))]
        else:
            pick = window[0]
        out[r] = pick
        score[r] = float(q[r] @ np.asarray(corpus[pick], np.float32))
    return out, score


def copies_positive(positives: Sequence[str | None], negatives: Sequence[str | None],
                    max_dropped: float | None) -> np.ndarray:
    """True where a negative is its positive with at most `max_dropped` of the positive's words left out (a share,
    at least one word) and nothing else changed but case and punctuation: the negative's normalized words are a
    subsequence of the positive's. Such a near-copy holds no word the positive lacks, so it cannot contradict it
    except by omission; the guide can score it below a restatement ("a woman is a leek" for "A woman is slicing a
    leek": 0.65 under MiniLM) and training then pushes apart two near-identical texts. A negative that drops a
    negation ("not") is a hard negative and stays, as does one that reorders or substitutes words ("a man is
    playing a flute"). Positives under COPY_MIN_WORDS words are not judged. None turns the rule off; a row
    without a negative is never one."""
    from speed_ray.dedup.minhash import normalize

    out = np.zeros(len(positives), bool)
    if max_dropped is None:
        return out
    for i, (p, n) in enumerate(zip(positives, negatives)):
        pw, nw = normalize(p).split(), normalize(n).split()
        if not nw or len(pw) < COPY_MIN_WORDS or len(nw) > len(pw):
            continue
        if len(pw) - len(nw) > max(1, int(max_dropped * len(pw))):
            continue
        dropped, j = [], 0
        for w in pw:            # greedy subsequence match: nw in pw, in order
            if j < len(nw) and nw[j] == w:
                j += 1
            else:
                dropped.append(w)
        out[i] = j == len(nw) and not NEGATIONS.intersection(dropped)
    return out
