"""The CPU engine's copy-free grouped-query attention vs transformers' sdpa, on the demo's synthesis call.

    .venv/bin/python benchmarks/hf_attention.py --n 24 --max-tokens 200

One HFEngine.generate call of n schema-constrained synthesis requests (mixed task types, sampled at temperature 1
with a seed per row, as the synthesis stage sends them) on SmolLM2-135M-Instruct, first with attn_implementation
"sdpa" (the baseline: transformers repeats the KV cache's heads every step when a mask is passed), then with
"speed_ray_gqa" (speed_ray/generate/gqa_attention.py). Same process, same requests, same threads. Prints one JSON
line last: wall seconds and completion tokens/s of each (after a one-token warm-up call that compiles the
grammars), the speed-up, and how many texts are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _run(model: str, attention: str, reqs, threads: int) -> tuple[dict, list[str]]:
    import torch

    from speed_ray.generate.hf_engine import HFEngine

    torch.set_num_threads(threads)
    eng = HFEngine(model, batch_size=len(reqs), attention=attention)
    assert eng.model.config._attn_implementation == attention
    import dataclasses

    eng.generate([dataclasses.replace(r, max_tokens=1) for r in reqs])   # warm-up: grammars compiled, first call
    t0 = time.perf_counter()
    out = eng.generate(reqs)
    wall = time.perf_counter() - t0
    toks = sum(o.completion_tokens for o in out)
    return {"wall_s": round(wall, 2), "completion_tokens": toks, "tokens_per_s": round(toks / wall, 2)}, \
        [o.text for o in out]


def main() -> None:
    from speed_ray.generate.gqa_attention import register
    from speed_ray.models.offline import resolve_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="offline:smollm2")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    model = resolve_model(args.model)
    from generation import _requests

    reqs = _requests(args.n, args.max_tokens, temperature=1.0, structured=True)
    load0 = os.getloadavg()[0]
    base, base_txt = _run(model, "sdpa", reqs, args.threads)
    ours, ours_txt = _run(model, register(), reqs, args.threads)
    print(json.dumps({"benchmark": "hf_attention", "model": args.model, "n": args.n, "max_tokens": args.max_tokens,
                      "threads": args.threads, "sdpa": base, "speed_ray_gqa": ours,
                      "speedup": round(base["wall_s"] / ours["wall_s"], 2),
                      "identical_texts": sum(a == b for a, b in zip(base_txt, ours_txt)),
                      "load_avg_start": round(load0, 2), "load_avg_end": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
