"""Parse rate of real synthesis prompts with and without JSON-schema-constrained decoding (xgrammar), HF engine.

The same prompts (mixed task types), sampling seeds and model on both sides; a sample counts as parsed when
speed_ray.synth.parsing.parse_sample accepts it for its task type. Last line: JSON with both parse rates.

    .venv/bin/python benchmarks/structured_output.py --model offline:smollm2 --n 16 --max-tokens 256
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TYPES = ("retrieval", "classification", "matching_short", "matching_long", "sts", "bitext")


def _requests(n: int, max_tokens: int, structured: bool):
    import random

    from speed_ray.llm.rows import LLMRequest
    from speed_ray.synth.prompts import synthesis_messages
    from speed_ray.synth.schemas import sample_schema

    out = []
    for i in range(n):
        t = TYPES[i % len(TYPES)]
        rng = random.Random(i)
        task = f"Retrieve web pages that answer questions about topic {i % 5}." if t == "retrieval" else \
            f"Classify product reviews about topic {i % 5} by sentiment." if t == "classification" else \
            f"Given a title about topic {i % 5}, retrieve its abstract."
        msgs, _ = synthesis_messages(t, task, rng, topic=f"Topic {i % 5}")
        out.append((t, LLMRequest(msgs, temperature=1.0, top_p=1.0, max_tokens=max_tokens,
                                  json_schema=sample_schema(t) if structured else None, seed=1000 + i)))
    return out


def run(eng, n: int, max_tokens: int, structured: bool) -> dict:
    from speed_ray.synth.parsing import parse_sample

    reqs = _requests(n, max_tokens, structured)
    t0 = time.time()
    res = eng.generate([r for _, r in reqs])
    wall = time.time() - t0
    ok, reasons = 0, Counter()
    for (t, _), r in zip(reqs, res):
        p = parse_sample(r.text, t) if r.finish_reason != "error" else None
        if p is not None and p.ok:
            ok += 1
        else:
            reasons[p.reason if p is not None else "generation_error"] += 1
    return {"parse_rate": ok / n, "parsed": ok, "reject_reasons": dict(reasons), "wall_s": round(wall, 1),
            "truncated": sum(r.finish_reason == "length" for r in res),
            "output_tokens": sum(r.completion_tokens for r in res)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="offline:smollm2")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    import torch

    from speed_ray.generate.hf_engine import HFEngine
    from speed_ray.models.offline import resolve_model

    torch.set_num_threads(os.cpu_count() or 1)
    eng = HFEngine(resolve_model(args.model), batch_size=args.batch_size, max_model_len=4096)
    free = run(eng, args.n, args.max_tokens, structured=False)
    constrained = run(eng, args.n, args.max_tokens, structured=True)
    print(json.dumps({"benchmark": "structured_output", "model": args.model, "prompts": args.n,
                      "task_types": sorted(set(TYPES[i % len(TYPES)] for i in range(args.n))),
                      "max_tokens": args.max_tokens, "unconstrained": free, "xgrammar": constrained,
                      "parse_rate_unconstrained": free["parse_rate"], "parse_rate_xgrammar": constrained["parse_rate"],
                      "ratio": round(constrained["parse_rate"] / free["parse_rate"], 3) if free["parse_rate"] else None}))


if __name__ == "__main__":
    main()
