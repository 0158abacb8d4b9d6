"""Pipeline vs raw engine output tokens/s on the same prompts: Ray Data + HFEngine actor vs plain HF generate
(CPU), or ray.data.llm vs vLLM LLM.generate (GPU). Last line: JSON with both and the ratio (target >= 0.8).

    .venv/bin/python benchmarks/generation.py --model offline:smollm2 --n 32 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _requests(n: int, max_tokens: int):
    import random

    from speed_ray.generate.engine import GenRequest
    from speed_ray.teacher.prompts import synthesis_messages
    from speed_ray.teacher.schemas import sample_schema

    out = []
    for i in range(n):
        rng = random.Random(i)
        msgs, _ = synthesis_messages("sts", "", rng, topic=f"Topic {i % 7}")
        out.append(GenRequest(msgs, temperature=0.0, max_tokens=max_tokens, json_schema=None, seed=i))
    return out, sample_schema


def raw_hf(model: str, reqs, batch_size: int) -> dict:
    from speed_ray.generate.hf_engine import HFEngine

    eng = HFEngine(model, batch_size=batch_size)
    eng.generate(reqs[:1])  # warm-up, as the pipeline's actor also loads before its first batch
    t0 = time.time()
    res = eng.generate(reqs)
    wall = time.time() - t0
    toks = sum(r.completion_tokens for r in res)
    return {"wall_s": wall, "output_tokens": toks, "tokens_per_s": toks / wall}


def pipeline(kind: str, model: str, reqs, batch_size: int, num_cpus: float) -> dict:
    import ray

    from speed_ray.generate.config import EngineConfig
    from speed_ray.generate.engine import request_columns
    from speed_ray.generate.ray_engines import generate_dataset

    cfg = EngineConfig(kind=kind, batch_size=batch_size, num_cpus_per_replica=num_cpus,
                       num_gpus_per_replica=1.0 if kind == "vllm" else 0.0, max_new_tokens=reqs[0].max_tokens)
    rows = [{"id": str(i), **request_columns(r)} for i, r in enumerate(reqs)]
    t0 = time.time()
    ds = generate_dataset(ray.data.from_items(rows), cfg, model)
    toks = sum(int(r["completion_tokens"]) for r in ds.select_columns(["completion_tokens"]).iter_rows())
    wall = time.time() - t0
    return {"wall_s": wall, "output_tokens": toks, "tokens_per_s": toks / wall}


def raw_vllm(model: str, reqs) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, max_model_len=4096)
    msgs = [r.messages for r in reqs]
    sp = SamplingParams(temperature=0.0, max_tokens=reqs[0].max_tokens)
    llm.chat(msgs[:1], sp)
    t0 = time.time()
    outs = llm.chat(msgs, sp)
    wall = time.time() - t0
    toks = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"wall_s": wall, "output_tokens": toks, "tokens_per_s": toks / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="offline:smollm2")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-cpus", type=float, default=2.0)
    args = ap.parse_args()
    import ray
    import torch

    from speed_ray.models.offline import resolve_model

    model = resolve_model(args.model)
    reqs, _ = _requests(args.n, args.max_tokens)
    gpu = torch.cuda.is_available()
    try:
        import vllm  # noqa: F401
        has_vllm = True
    except ImportError:
        has_vllm = False
    kind = "vllm" if gpu and has_vllm else "hf"
    ray.init(num_cpus=None if gpu else max(2, int(args.num_cpus + 0.5)), include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # the pipeline's actor gets the machine's CPUs minus a sliver for the Ray Data plumbing tasks
    pipe = pipeline(kind, model, reqs, args.batch_size, max(0.5, args.num_cpus - 0.2))
    ray.shutdown()
    if kind == "hf":
        torch.set_num_threads(max(1, int(args.num_cpus + 0.5)))
        raw = raw_hf(model, reqs, args.batch_size)
    else:
        raw = raw_vllm(model, reqs)
    print(json.dumps({"benchmark": "generation", "engine": kind, "model": args.model, "prompts": args.n,
                      "max_tokens": args.max_tokens, "pipeline_tokens_per_s": round(pipe["tokens_per_s"], 2),
                      "raw_tokens_per_s": round(raw["tokens_per_s"], 2),
                      "pipeline_output_tokens": pipe["output_tokens"], "raw_output_tokens": raw["output_tokens"],
                      "pipeline_wall_s": round(pipe["wall_s"], 2), "raw_wall_s": round(raw["wall_s"], 2),
                      "ratio": round(pipe["tokens_per_s"] / raw["tokens_per_s"], 3)}))


if __name__ == "__main__":
    main()
