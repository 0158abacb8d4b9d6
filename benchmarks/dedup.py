"""Dedup throughput and quality vs a plain datasketch baseline, on N synthetic documents with planted duplicates.

    python benchmarks/dedup.py --n 200000

Ours: the dedup core the stage runs (speed_ray.dedup: vectorized signatures, band keys, bucket pairs,
connected components), in this process on one core; `--ray` also times the whole stage on a local Ray.
Baseline: datasketch as commonly used: MinHash.update per token per document, MinHashLSH insert, then
a query per document, union-find over the results. Both see the same shingles and band layout.
Prints one JSON line last: docs_per_s, baseline_docs_per_s, ratio, precision and recall vs the planted set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from speed_ray.dedup.components import find_duplicates  # noqa: E402
from speed_ray.dedup.lsh import optimal_bands  # noqa: E402
from speed_ray.dedup.minhash import shingles  # noqa: E402


def make_corpus(n: int, dup_frac: float, exact_frac: float, seed: int, vocab: int = 30000):
    """n documents of 80-120 words; dup_frac of them are copies of another (one word changed, or exact).

    Ids are shuffled, so an original may sort after its copy. Returns (ids, texts, expected removed ids):
    in each planted cluster, all but the lowest id.
    """
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(vocab)])
    n_dup = int(n * dup_frac)
    n_orig = n - n_dup
    lens = rng.integers(80, 121, n_orig)
    toks = rng.integers(0, vocab, (n_orig, 120))
    docs = [list(words[toks[i, :lens[i]]]) for i in range(n_orig)]
    src = rng.integers(0, n_orig, n_dup)
    for j in range(n_dup):
        d = list(docs[src[j]])
        if rng.random() >= exact_frac:
            d[int(rng.integers(0, len(d)))] = "EDIT" + str(j)
        docs.append(d)
    texts = [" ".join(d) for d in docs]
    perm = rng.permutation(n)  # document k gets id perm[k]
    ids = [f"doc{p:09d}" for p in perm]
    clusters: dict[int, list[int]] = {}
    for j in range(n_dup):
        clusters.setdefault(int(src[j]), [int(src[j])]).append(n_orig + j)
    expected = set()
    for members in clusters.values():
        names = sorted(ids[m] for m in members)
        expected.update(names[1:])
    return ids, texts, expected


def score(removed: set, expected: set) -> tuple[float, float]:
    tp = len(removed & expected)
    return tp / max(1, len(removed)), tp / max(1, len(expected))


def run_ours(ids, texts, num_perm, bands, rows, ngram) -> set:
    out = find_duplicates(ids, texts, num_perm=num_perm, bands=bands, rows=rows, ngram=ngram)
    reasons = out.column("removed_reason").to_pylist()
    return {i for i, r in zip(out.column("id").to_pylist(), reasons) if r is not None}


def run_baseline(ids, texts, num_perm, bands, rows, ngram) -> set:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(num_perm=num_perm, params=(bands, rows))
    sigs = []
    for i, t in zip(ids, texts):
        m = MinHash(num_perm=num_perm)
        for s in shingles(t, ngram):
            m.update(s.encode("utf-8"))
        lsh.insert(i, m)
        sigs.append(m)
    parent: dict[str, str] = {}

    def find(x):
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x

    for i, m in zip(ids, sigs):
        for j in lsh.query(m):
            a, b = find(i), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {i for i in parent if find(i) != i}


def run_stage(ids, texts, num_perm, bands, rows, ngram) -> tuple[set, float]:
    """The real stage on a local Ray (2 CPUs): Parquet in, signatures/buckets/clusters/apply, Parquet out."""
    import dataclasses

    import ray

    from speed_ray.dedup.config import DedupConfig
    from speed_ray.dedup.stage import dedup_stage, shards_at
    from speed_ray.stage import StageContext
    from speed_ray.run_config import RunConfig
    from speed_ray.store import RunStore

    tmp = tempfile.mkdtemp(prefix="dedup-bench-")
    store = RunStore(tmp)
    src = store.stage("revision", "in")
    for k in range(0, len(ids), 50000):
        sl = slice(k, k + 50000)
        src.write_shard(f"in-{k:09d}", {"id": ids[sl], "query": ["which passage is this"] * len(ids[sl]),
                                        "positive": texts[sl],
                                        "lineage": ["{}"] * len(ids[sl])})
    cfg = dataclasses.replace(RunConfig(), dedup=DedupConfig(fields=("positive",), num_perm=num_perm, bands=bands,
                                                             rows=rows, ngram=ngram))
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ctx = StageContext(cfg=cfg, name="dedup", out=store.stage("dedup", "out"), inputs={"samples": src},
                       store=store, run_name="bench")
    t0 = time.perf_counter()
    dedup_stage(ctx)  # Ray workers' CPU is not this process's: wall time only
    dt = time.perf_counter() - t0
    rem = shards_at(ctx.out, "removed").read_table(columns=["id", "removed_reason"])
    dup = [i for i, r in zip(rem.column("id").to_pylist(), rem.column("removed_reason").to_pylist())
           if r in ("exact_duplicate", "near_duplicate")]
    return set(dup), dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--dup-frac", type=float, default=0.1)
    ap.add_argument("--exact-frac", type=float, default=0.2, help="share of planted copies that are exact")
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--ngram", type=int, default=3)
    ap.add_argument("--baseline-n", type=int, default=None,
                    help="time the (slow, linear) baseline on the first docs only; default all N")
    ap.add_argument("--ray", action="store_true", help="also time the full stage on a local Ray")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    ids, texts, expected = make_corpus(args.n, args.dup_frac, args.exact_frac, args.seed)
    bands, rows = optimal_bands(args.threshold, args.num_perm)
    res = {"n": args.n, "mode": "in-process core (speed_ray.dedup.components.find_duplicates)",
           "bands": bands, "rows": rows, "planted_removable": len(expected)}

    # Wall time is what the targets use; CPU time of this process is also reported because the shared
    # machine's load swings wall time of both sides.
    t0, c0 = time.perf_counter(), time.process_time()
    removed = run_ours(ids, texts, args.num_perm, bands, rows, args.ngram)
    dt, cdt = time.perf_counter() - t0, time.process_time() - c0
    res["docs_per_s"] = round(args.n / dt, 1)
    res["docs_per_cpu_s"] = round(args.n / cdt, 1)
    res["precision"], res["recall"] = (round(x, 4) for x in score(removed, expected))

    nb = min(args.n, args.baseline_n or args.n)
    t0, c0 = time.perf_counter(), time.process_time()
    b_removed = run_baseline(ids[:nb], texts[:nb], args.num_perm, bands, rows, args.ngram)
    bdt, bcdt = time.perf_counter() - t0, time.process_time() - c0
    res["baseline_n"] = nb
    res["baseline_docs_per_s"] = round(nb / bdt, 1)
    res["baseline_docs_per_cpu_s"] = round(nb / bcdt, 1)
    if nb == args.n:
        res["baseline_precision"], res["baseline_recall"] = (round(x, 4) for x in score(b_removed, expected))
    res["ratio"] = round(res["docs_per_s"] / res["baseline_docs_per_s"], 2)
    res["cpu_ratio"] = round(res["docs_per_cpu_s"] / res["baseline_docs_per_cpu_s"], 2)

    if args.ray:
        s_removed, sdt = run_stage(ids, texts, args.num_perm, bands, rows, args.ngram)
        res["stage_docs_per_s"] = round(args.n / sdt, 1)
        res["stage_precision"], res["stage_recall"] = (round(x, 4) for x in score(s_removed, expected))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
