"""One batch of samples through the screen: decontamination, guide scores, the false-negative verdict and its
action. Pure apart from the guide's forward passes (tests run it with MiniLM); the Ray glue is in stage.py."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from speed_ray.e5 import with_instruction
from speed_ray.quality.decontam import DecontamIndex, row_hits
from speed_ray.quality.scores import (copies_positive, cosine_matrix, false_negative, mine_corpus, remine, resembles,
                                     restates)


@dataclass(frozen=True)
class ScreenSettings:
    """The flat values the screen needs (from ScreenConfig)."""

    margin: float = 0.05
    margin_min_similarity: float | None = 0.6   # the margin rule needs s(positive, negative) >= this too (bi-encoder)
    restates: float | None = 0.8          # guide similarity of negative and positive at which the negative restates it
    copies_max_dropped: float | None = 0.2   # a negative that is its positive less this share of its words copies it
    action: str = "remove_negative"
    remine_rank: int = 0
    instructions: bool | None = None      # None: the guide's `instruction_tuned` decides
    fields: tuple[str, ...] = ("query", "positive", "negative")
    ngram_threshold: float = 0.6
    minhash_threshold: float = 0.7
    mine: str = "off"                     # "flagged" / "pairs" / "all": negatives mined from a corpus (_mine)
    mine_range: tuple[int, int] = (0, 10)
    mine_sampling: str = "top"


@dataclass(frozen=True)
class Corpus:
    """The texts negatives are mined from, with the guide's unit-norm embeddings (one row per distinct text)."""

    texts: tuple[str, ...]
    emb: np.ndarray
    name: str = "own"

    def index_of(self, text: str | None) -> int | None:
        if not hasattr(self, "_where"):
            object.__setattr__(self, "_where", {t: i for i, t in enumerate(self.texts)})
        return self._where.get(text) if text else None   # type: ignore[attr-defined]


def row_seed(row_id: str) -> int:
    """A row's own seed (its random rank pick does not depend on the batch it landed in)."""
    return int.from_bytes(hashlib.blake2b(str(row_id).encode(), digest_size=4).digest(), "little")


def guide_query(task: str | None, query: str, instructions: bool) -> str:
    return with_instruction(task, query) if instructions and task and task.strip() else query


def score_rows(guide, queries: Sequence[str], positives: Sequence[str], negatives: Sequence[str | None],
               want_candidates: bool = False):
    """(pos, neg, cand, pn, q, p): the guide's score of each query with its positive and with its negative (NaN
    without one); when asked (bi-encoder), of each query with every positive of the batch (n, n); (bi-encoder) of
    each positive with its negative (NaN without one; None for a cross-encoder, whose scores are not similarities);
    and (bi-encoder) the queries' and the positives' unit-norm embeddings (None for a cross-encoder)."""
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
        return pos, neg, cand, pn, q, p
    pos = guide.pair_scores(queries, positives)
    idx = np.flatnonzero(has_neg)
    neg[idx] = guide.pair_scores([queries[i] for i in idx], [negatives[i] for i in idx])
    return pos, neg, None, None, None, None


def unlike_positive(s: ScreenSettings, positive: str, p_emb: np.ndarray | None, texts: Sequence[str],
                    emb: np.ndarray | None) -> np.ndarray:
    """Where each candidate text may replace a false negative of a row with this positive: it neither restates the
    positive under the guide (bi-encoder: similarity below s.restates) nor copies it less a few words. The margin
    rule is the caller's (remine and mine_corpus rank only candidates below pos - margin)."""
    ok = ~copies_positive([positive] * len(texts), texts, s.copies_max_dropped)
    if s.restates is not None and p_emb is not None and emb is not None and len(texts):
        ok &= np.asarray(emb, np.float64) @ np.asarray(p_emb, np.float64) < s.restates
    return ok


def screen_batch(cols: dict[str, list], guide, index: DecontamIndex | None, s: ScreenSettings,
                 corpus: Corpus | None = None) -> dict:
    """The verdict for each row of a batch (columns as lists: id, query, positive, and task, task_type, negative
    where present). Returns per-row lists: reason (None: kept; "contaminated" / "false_negative": removed),
    detail (a dict for the lineage or None), pos / neg / margin scores (None where not scored), and negative (the
    row's negative after the action: unchanged, "" for a pair, or the re-mined text). With `s.mine` and a corpus, kept
    rows the action left without their false negative ("flagged"), kept rows without a negative ("pairs") or all
    kept rows ("all") then take a negative mined from the corpus."""
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
    ins = s.instructions if s.instructions is not None else bool(getattr(guide, "instruction_tuned", False))
    queries = [guide_query(tasks[i], cols["query"][i], ins) for i in rows]
    positives = [cols["positive"][i] for i in rows]
    pos, neg, cand, pn, q, p = score_rows(guide, queries, positives, [negatives[i] for i in rows],
                                          want_candidates=s.action == "remine" and guide.kind == "bi_encoder")
    outranks = false_negative(pos, neg, s.margin) & resembles(pn, s.margin_min_similarity, len(rows))
    restated = restates(pn, s.restates) if pn is not None else np.zeros(len(rows), bool)
    copied = copies_positive(positives, [negatives[i] for i in rows], s.copies_max_dropped)
    bad = outranks | restated | copied
    new_idx = np.full(len(rows), -1)
    if s.action == "remine" and bad.any():
        tt = np.array([str(ttypes[i]) for i in rows], dtype=object)
        same_pos = np.array([[a == b for b in positives] for a in positives], bool)
        allowed = (tt[:, None] == tt[None, :]) & ~same_pos
        for k in np.flatnonzero(bad):   # the replacement must pass the rules its negative failed
            allowed[k] &= unlike_positive(s, positives[k], p[k], positives, p)
        new_idx = remine(pos, cand, allowed, s.margin, (s.remine_rank, s.remine_rank + 1))
    for k, i in enumerate(rows):
        pos_s[i] = float(pos[k])
        neg_s[i] = None if np.isnan(neg[k]) else float(neg[k])
        if not bad[k]:
            continue
        info = {"negative": negatives[i], "pos_score": pos_s[i], "neg_score": neg_s[i], "margin": s.margin,
                "rule": ("within_margin" if outranks[k] else "restates_positive" if restated[k]
                         else "copies_positive")}
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
    if s.mine != "off" and corpus is not None and q is not None:
        _mine(cols, rows, pos, q, p, corpus, s, reason, detail, negatives, neg_s)
    margin = [None if p is None or ng is None else p - ng for p, ng in zip(pos_s, neg_s)]
    return {"reason": reason, "detail": detail, "pos": pos_s, "neg": neg_s, "margin": margin,
            "negative": negatives}


def _mine(cols, rows, pos, q, p, corpus: Corpus, s: ScreenSettings, reason, detail, negatives, neg_s) -> None:
    """Mined negatives for the kept rows that want one (in place): the corpus text at the configured rank among
    those outside the false-negative margin that neither restate nor copy the row's positive, never the row's own
    query, positive or screened-out negative."""
    want = [k for k, i in enumerate(rows) if reason[i] is None and (
        s.mine == "all" or (not negatives[i] and (s.mine == "pairs" or "false_negative" in (detail[i] or {}))))]
    if not want:
        return
    exclude = []
    for k in want:
        i = rows[k]
        old = ((detail[i] or {}).get("false_negative") or {}).get("negative")
        exclude.append({j for j in (corpus.index_of(cols["query"][i]), corpus.index_of(cols["positive"][i]),
                                    corpus.index_of(negatives[i]), corpus.index_of(old)) if j is not None})
    def accept(r: int, j: int) -> bool:
        k = want[r]
        return bool(unlike_positive(s, cols["positive"][rows[k]], p[k], [corpus.texts[j]], corpus.emb[j:j + 1])[0])

    idx, score = mine_corpus(q[want], pos[want], corpus.emb, exclude, s.margin, s.mine_range, s.mine_sampling,
                             seeds=[row_seed(cols["id"][rows[k]]) for k in want], accept=accept)
    for k, j, sc in zip(want, idx, score):
        i = rows[k]
        info = {"from": corpus.name, "rank_range": list(s.mine_range), "sampling": s.mine_sampling}
        if j < 0:
            info["found"] = False
        else:
            info.update(found=True, replaced=negatives[i] or None, score=float(sc))
            negatives[i] = corpus.texts[j]
            neg_s[i] = float(sc)
        detail[i] = {**(detail[i] or {}), "mined": info}
