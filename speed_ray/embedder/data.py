"""Training triples for the embedder: instruction templates, nested subsets, public-data mixing, one-task batches.

Query template (SPEED Section 3.3, after E5-mistral, https://arxiv.org/abs/2401.00368):
``Instruct: {task}\\nQuery: {query}``; documents get no instruction, so a corpus index is built once.
Symmetric tasks (STS, text matching, bitext) are the exception: E5-mistral's MTEB evaluation prepends the task
instruction to *every* input of a non-retrieval task (both sentences of an STS pair; see unilm
``e5/mteb_except_retrieval_eval.py``), so training puts the instruction on both sides of those pairs too,
keeping training and evaluation inputs alike. Which task types count as symmetric is configurable.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from typing import Iterable

from speed_ray.e5 import e5_prefix, with_instruction
from speed_ray.errors import DataError

# E5-mistral treats these as symmetric: both sides are "queries" (see the module docstring).
SYMMETRIC_TASK_TYPES = ("sts", "matching_short", "matching_long", "bitext")
# Stored as the SentenceTransformer's "query" prompt: a generic retrieval instruction for callers with no task.
DEFAULT_QUERY_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
TRIPLE_COLUMNS = ("id", "task_type", "task", "query", "positive", "negative", "source")


# The instruction format (one, shared with evaluation and serving) and the data error, re-exported here.
query_prompt = e5_prefix


def _order_key(row_id: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{row_id}".encode()).hexdigest()


def select_rows(rows: list[dict], n_samples: int | None = None, task_types: Iterable[str] | None = None,
                seed: int = 0) -> list[dict]:
    """Filter by task type, then take the first n_samples rows of a seed-fixed order over row ids.

    The order depends only on (seed, id), so n=1000 is a prefix of n=2000: the scaling sweep trains on nested
    subsets, and a category-filtered subset is nested the same way."""
    if task_types:
        keep = set(task_types)
        rows = [r for r in rows if r.get("task_type") in keep]
    rows = sorted(rows, key=lambda r: _order_key(str(r["id"]), seed))
    return rows if n_samples is None else rows[:n_samples]


def to_triple(row: dict, symmetric_types: Iterable[str] = SYMMETRIC_TASK_TYPES, source: str = "synthetic",
              allow_pairs: bool = False) -> dict | None:
    """One sample row -> (query, positive, negative) texts with the instruction applied; None if unusable.
    With allow_pairs, a row without a negative is a pair (negative None: in-batch negatives only)."""
    task, q, pos, neg = (str(row.get(k) or "").strip() for k in ("task", "query", "positive", "negative"))
    if not q or not pos or (not neg and not allow_pairs):
        return None   # a triple needs all three texts: the hard negative is part of the objective (eq. 4)
    task_type = str(row.get("task_type") or "")
    if task:
        q = with_instruction(task, q)
        if task_type in set(symmetric_types):
            pos, neg = with_instruction(task, pos), with_instruction(task, neg) if neg else neg
    return {"id": str(row.get("id") or _order_key(q + pos, 0)[:16]), "task_type": task_type, "task": task,
            "query": q, "positive": pos, "negative": neg or None, "source": source}


def to_triples(rows: list[dict], symmetric_types: Iterable[str] = SYMMETRIC_TASK_TYPES,
               source: str = "synthetic") -> tuple[list[dict], int]:
    """Rows -> triples, and how many rows were dropped for a missing query, positive or negative."""
    out = [t for t in (to_triple(r, symmetric_types, source) for r in rows) if t is not None]
    return out, len(rows) - len(out)


def mix_public(synthetic: list[dict], public: list[dict], fraction: float, seed: int = 0) -> list[dict]:
    """Add public triples so they make up `fraction` of the mix (capped by how many exist)."""
    if fraction <= 0 or not public:
        return list(synthetic)
    want = round(len(synthetic) * fraction / (1 - fraction))
    picked = sorted(public, key=lambda r: _order_key(str(r["id"]), seed))[:want]
    return list(synthetic) + picked


def make_batches(triples: list[dict], batch_size: int, one_task_per_batch: bool = True, seed: int = 0,
                 epoch: int = 0, no_duplicates: bool = True) -> list[list[dict]]:
    """Shuffled global batches of exactly batch_size triples: `plan_batches` over the triples' task types (and,
    with no_duplicates, their texts)."""
    shared = shared_texts([(t["query"], t["positive"], t.get("negative")) for t in triples]) if no_duplicates \
        else None
    plan = plan_batches([t["task_type"] for t in triples], batch_size, one_task_per_batch, seed, epoch,
                        shared=shared)
    return [[triples[i] for i in b] for b in plan]


def plan_batches(task_types: list[str], batch_size: int, one_task_per_batch: bool = True, seed: int = 0,
                 epoch: int = 0, pairs: list[bool] | None = None,
                 shared: dict[int, frozenset] | None = None) -> list[list[int]]:
    """Shuffled global batches of exactly batch_size row indices (every worker needs the same shape to all-gather),
    a pure function of the rows' task types (in their order), the seed and the epoch.

    With one_task_per_batch, each batch holds one task type, so in-batch negatives are documents of the same
    kind (a classification label is no useful negative for a retrieval query). Rows of a type that do not fill
    a whole batch are pooled into mixed batches rather than thrown away; fewer than batch_size left are dropped.
    pairs (rows without a hard negative) never share a batch with triples: every row of a batch has the same
    sides, on every worker.

    shared: the rows that share a text (query, positive or negative) with another row, each with its texts' keys
    (`shared_texts`). No batch holds the same text twice: two copies would be each other's false negatives (as
    sentence-transformers' NoDuplicatesBatchSampler). A row that would repeat a text in the batch being filled waits
    for the next one; without shared texts the batches are exactly the plain cut."""
    if pairs is not None and any(pairs):
        kinds = [(t if one_task_per_batch else "") + ("\x00pair" if p else "") for t, p in zip(task_types, pairs)]
        rng = random.Random(f"{seed}:{epoch}")
        out: list[list[int]] = []
        for flag in (False, True):   # triples, then pairs: each planned on its own, then interleaved
            idx = [i for i, p in enumerate(pairs) if bool(p) == flag]
            sub_shared = None if not shared else {j: shared[i] for j, i in enumerate(idx) if i in shared}
            sub = plan_batches([kinds[i] for i in idx], batch_size, True, rng.randrange(2 ** 31), epoch,
                               shared=sub_shared)
            out += [[idx[j] for j in b] for b in sub]
        rng.shuffle(out)
        return out
    rng = random.Random(f"{seed}:{epoch}")
    batches: list[list[int]] = []
    rest: list[int] = []
    if one_task_per_batch:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, t in enumerate(task_types):
            groups[t].append(i)
        for key in sorted(groups):
            g = groups[key]
            rng.shuffle(g)
            full, left = _cut(g, batch_size, shared)
            batches += full
            rest += left
    else:
        rest = list(range(len(task_types)))
    rng.shuffle(rest)
    batches += _cut(rest, batch_size, shared)[0]
    rng.shuffle(batches)
    return batches


def _cut(order: list[int], batch_size: int, shared: dict[int, frozenset] | None) -> tuple[list[list[int]], list[int]]:
    """Full batches of `order` in order, and the rows left over. With `shared`, a row whose text is already in the
    batch being filled waits (in order) for a later batch; rows that still cannot be placed are left over."""
    if not shared:
        full = len(order) // batch_size * batch_size
        return [order[i:i + batch_size] for i in range(0, full, batch_size)], order[full:]
    batches: list[list[int]] = []
    batch: list[int] = []
    seen: set = set()
    waiting: list[int] = []
    for i in order:
        texts = shared.get(i)
        if texts is not None and not seen.isdisjoint(texts):
            waiting.append(i)
            continue
        batch.append(i)
        if texts is not None:
            seen |= texts
        if len(batch) == batch_size:
            batches.append(batch)
            batch, seen = [], set()
            still = []
            for w in waiting:   # the waiting rows get the first chance at the new batch
                wt = shared[w]
                if len(batch) < batch_size and seen.isdisjoint(wt):
                    batch.append(w)
                    seen |= wt
                else:
                    still.append(w)
            waiting = still
            if len(batch) == batch_size:   # (only when batch_size is smaller than the waiting queue)
                batches.append(batch)
                batch, seen = [], set()
    return batches, batch + waiting


def text_key(text: str) -> int:
    """A text's 64-bit key (BLAKE2b), never 0 (0 stands for "no text")."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") or 1


def shared_texts(rows_texts: list[tuple[str | None, ...]]) -> dict[int, frozenset]:
    """For `plan_batches(shared=...)`: the rows whose texts (any side) occur in another row, with their texts'
    64-bit keys. Rows with only unique texts are left out (they fit any batch)."""
    keys = [[text_key(t) for t in row if t] for row in rows_texts]
    count: dict[int, int] = defaultdict(int)
    for ks in keys:
        for k in set(ks):
            count[k] += 1
    return {i: frozenset(ks) for i, ks in enumerate(keys) if any(count[k] > 1 for k in ks)}


def worker_slice(batch: list[dict], rank: int, world_size: int) -> list[dict]:
    """This worker's contiguous share of a global batch (rank r holds rows r*b .. (r+1)*b - 1)."""
    b = len(batch) // world_size
    return batch[rank * b:(rank + 1) * b]
