"""Embedding cache: a repeated evaluation of the same tasks vs the first (cold) one, in one process.

    .venv/bin/python benchmarks/evaluate_cache.py [--pairs 300]

Prints one JSON line: seconds cold / warm and their ratio, and the texts each run encoded.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from speed_ray.evaluate.config import EvalConfig
from speed_ray.evaluate.run import run_evaluation


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=300)
    args = ap.parse_args()
    rng = random.Random(0)
    words = "man woman dog cat plays runs eats guitar park ball food quickly slowly red blue big small".split()
    tmp = Path(tempfile.mkdtemp(prefix="evalbench-"))
    with open(tmp / "pairs.tsv", "w") as f:
        for _ in range(args.pairs):
            a = " ".join(rng.choices(words, k=8))
            b = " ".join(rng.choices(words, k=8))
            f.write(f"{a}\t{b}\t{rng.uniform(0, 5):.2f}\n")
    (tmp / "sts.yaml").write_text("name: BenchSTS\ntype: sts\nfiles: [pairs.tsv]\nformat: {header: false}\n"
                                  "columns: {sentence1: 0, sentence2: 1, score: 2}\n")
    cfg = EvalConfig(local_tasks=(str(tmp / "sts.yaml"),), instructions=False, cache_dir=str(tmp / "cache"))
    times, encoded = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        res = run_evaluation("offline:minilm", cfg, None)
        times.append(time.perf_counter() - t0)
        encoded.append(res["models"]["offline:minilm"]["encoded_texts"])
    print(json.dumps({"benchmark": "evaluate_cache", "pairs": args.pairs, "cold_s": round(times[0], 2),
                      "warm_s": round(times[1], 2), "ratio_cold_over_warm": round(times[0] / times[1], 2),
                      "encoded_cold": encoded[0], "encoded_warm": encoded[1]}))


if __name__ == "__main__":
    main()
