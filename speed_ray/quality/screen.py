"""One batch of samples through the screen: decontamination, guide scores, the false-negative verdict and its
action. Pure apart from the guide's forward passes (tests run it with MiniLM); the Ray glue is in stage.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from speed_ray.e5 import with_instruction
from speed_ray.quality.decontam import DecontamIndex, row_hits
from speed_ray.quality.scores import cosine_matrix, false_negative, remine, restates


@dataclass(frozen=True)
class ScreenSettings:
    """The flat values the screen needs (from ScreenConfig)."""

    margin: float = 0.05
    restates: float | None = 0.8          # guide similarity of negative and positive at which the negative restates it
    action: str = "drop"
    remine_rank: int = 0
    instructions: bool = True
    fields: tuple[str, ...] = ("query", "positive", "negative")
    ngram_threshold: float = 0.5
    minhash_threshold: float = 0.7


def guide_query(task: str | None, query: str, instructions: bool) -> str:
    return with_instruction(task, query) if instructions and task and task.strip() else query


def score_rows(guide, queries: Sequence[str], positives: Sequence[str], negatives: Sequence[str | None],
               want_candidates: bool = False):
    """(pos, neg, cand, pn): the guide's score of each query with its positive and with its negative (NaN without
    one); when asked (bi-encoder), of each query with every positive of the batch (n, n); and (bi-encoder) of each
    positive with its negative (NaN without one; None for a cross-encoder, whose scores are not similarities)."""
    n = len(queries)
    has_neg = np.array([bool(x and x.strip()) for x in negatives], bool)
    neg = np.full(n, np.nan)
    if guide.kind == "bi_encoder":
        negs = [negatives[i] for i in np.flatnonzero(has_neg)]
        emb = guide.embed(list(queries) + list(positives) + negs).astype(np.float64)
        q, p, ng = emb[:n], emb[n:2 * n], emb[2 * n:]
        pos = (q * p).sum(axis=1)
        neg[has_neg] = (q[has_neg] * ng).sum(axis=1)
        pn = np.full(n, np.nan)
        pn[has_neg] = (p[has_neg] * ng).sum(axis=1)
        cand = cosine_matrix(q, p) if want_candidates else None
        return pos, neg, cand, pn
    pos = guide.pair_scores(queries, positives)
    idx = np.flatnonzero(has_neg)
    neg[idx] = guide.pair_scores([queries[i] for i in idx], [negatives[i] for i in idx])
    return pos, neg, None, None


def screen_batch(cols: dict[str, list], guide, index: DecontamIndex | None, s: ScreenSettings) -> dict:
    """The verdict for each row of a batch (columns as lists: id, query, positive, and task, task_type, negative
    where present). Returns per-row lists: reason (None: kept; "contaminated" / "false_negative": removed),
    detail (a dict for the lineage or None), pos / neg / margin scores (None where not scored), and negative (the
    row's negative after the action: unchanged, "" for a pair, or the re-mined text)."""
    n = len(cols["query"])
    tasks = cols.get("task") or [None] * n
    ttypes = cols.get("task_type") or [""] * n
    negatives = list(cols.get("negative") or [None] * n)
    reason: list[str | None] = [None] * n
    detail: list[dict | None] = [None] * n
    pos_s: list[float | None] = [None] * n
    neg_s: list[float | None] = [None] * n
    if index is not None:
        for i, hit in enumerate(row_hits(index, cols, s.fields, s.ngram_threshold, s.minhash_threshold)):
            if hit is not None:
                reason[i] = "contaminated"
                detail[i] = {"contaminated": {**hit, "text": hit["text"][:500]}}
    if guide is None:
        return {"reason": reason, "detail": detail, "pos": pos_s, "neg": neg_s,
                "margin": [None] * n, "negative": negatives}
    rows = [i for i in range(n) if reason[i] is None]
    queries = [guide_query(tasks[i], cols["query"][i], s.instructions) for i in rows]
    positives = [cols["positive"][i] for i in rows]
    pos, neg, cand, pn = score_rows(guide, queries, positives, [negatives[i] for i in rows],
                                    want_candidates=s.action == "remine" and guide.kind == "bi_encoder")
    outranks = false_negative(pos, neg, s.margin)
    restated = restates(pn, s.restates) if pn is not None else np.zeros(len(rows), bool)
    bad = outranks | restated
    new_idx = np.full(len(rows), -1)
    if s.action == "remine" and bad.any():
        tt = np.array([str(ttypes[i]) for i in rows], dtype=object)
        same_pos = np.array([[a == b for b in positives] for a in positives], bool)
        allowed = (tt[:, None] == tt[None, :]) & ~same_pos
        new_idx = remine(pos, cand, allowed, s.margin, (s.remine_rank, s.remine_rank + 1))
    for k, i in enumerate(rows):
        pos_s[i] = float(pos[k])
        neg_s[i] = None if np.isnan(neg[k]) else float(neg[k])
        if not bad[k]:
            continue
        info = {"negative": negatives[i], "pos_score": pos_s[i], "neg_score": neg_s[i], "margin": s.margin,
                "rule": "restates_positive" if restated[k] and not outranks[k] else "within_margin"}
        if pn is not None and not np.isnan(pn[k]):
            info["pos_neg_score"] = float(pn[k])
        if s.action == "drop":
            reason[i] = "false_negative"
            detail[i] = {"false_negative": info}
            continue
        if s.action == "remine" and new_idx[k] >= 0:
            negatives[i] = positives[new_idx[k]]
            neg_s[i] = float(cand[k, new_idx[k]])
            detail[i] = {"false_negative": {**info, "action": "remined", "new_negative_of": cols["id"][rows[new_idx[k]]]}}
        else:
            negatives[i] = ""
            neg_s[i] = None
            detail[i] = {"false_negative": {**info, "action": "removed_negative"}}
    margin = [None if p is None or ng is None else p - ng for p, ng in zip(pos_s, neg_s)]
    return {"reason": reason, "detail": detail, "pos": pos_s, "neg": neg_s, "margin": margin,
            "negative": negatives}
