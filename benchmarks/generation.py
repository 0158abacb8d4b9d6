"""Pipeline vs raw engine output tokens/s on the same prompts: Ray Data + HFEngine actor vs plain HF generate
(CPU), or ray.data.llm vs vLLM LLM.chat (GPU). Last line: JSON with both views and the ratio (target >= 0.8).

Both sides pay the same fixed costs in each view, so the ratio measures the pipeline's overhead, not start-up:
  cold:   from "go" to the last token, model load included on both sides (the pipeline also pays its actor's
          start; ray.init is a once-per-cluster cost, reported as ray_init_s and left out of both);
  steady: from the first output batch to the last, over the remaining batches (load and warm-up excluded).
The raw engine generates in the same chunks the pipeline's actor gets (engine.batch_size * 4 rows per call).
The actor reserves all the machine's CPUs and runs torch with that many threads, like the raw engine.

    .venv/bin/python benchmarks/generation.py --model offline:smollm2 --n 96 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _requests(n: int, max_tokens: int, temperature: float = 0.0, structured: bool = False):
    """Synthesis prompts of mixed task types, greedy by default so both sides generate the same tokens; with
    `structured`, each constrained to its task type's sample schema (as the synthesis stage sends them)."""
    import random

    from speed_ray.llm.rows import LLMRequest
    from speed_ray.synth.prompts import synthesis_messages
    from speed_ray.synth.schemas import sample_schema

    types = ("sts", "bitext", "retrieval", "classification", "matching_short", "matching_long")
    out = []
    for i in range(n):
        rng = random.Random(i)
        t = types[i % len(types)]
        msgs, _ = synthesis_messages(t, f"Retrieve documents about topic {i % 7}.", rng, topic=f"Topic {i % 7}")
        out.append(LLMRequest(msgs, temperature=temperature, max_tokens=max_tokens,
                              json_schema=sample_schema(t) if structured else None, seed=i))
    return out


def _views(t_go: float, arrivals: list[tuple[float, int]]) -> dict:
    """(arrival time, tokens) per output batch -> cold and steady-state tokens/s."""
    total = sum(k for _, k in arrivals)
    t_first, first_toks = arrivals[0]
    t_last = arrivals[-1][0]
    steady = (total - first_toks) / (t_last - t_first) if len(arrivals) > 1 and t_last > t_first else float("nan")
    return {"output_tokens": total, "batches": len(arrivals), "cold_wall_s": t_last - t_go,
            "first_batch_s": t_first - t_go, "cold_tokens_per_s": total / (t_last - t_go),
            "steady_tokens_per_s": steady}


def raw_hf(model: str, reqs, batch_size: int, chunk: int) -> dict:
    from speed_ray.generate.hf_engine import HFEngine

    t_go = time.time()
    eng = HFEngine(model, batch_size=batch_size, max_model_len=4096)
    arrivals = []
    for s in range(0, len(reqs), chunk):
        res = eng.generate(reqs[s:s + chunk])
        arrivals.append((time.time(), sum(r.completion_tokens for r in res)))
    return _views(t_go, arrivals)


def pipeline(kind: str, model: str, reqs, batch_size: int, num_cpus: float) -> dict:
    import ray

    from speed_ray.generate.config import EngineConfig
    from speed_ray.llm.rows import request_columns
    from speed_ray.generate.ray_engines import generate_dataset

    cfg = EngineConfig(kind=kind, batch_size=batch_size, num_cpus_per_replica=num_cpus,
                       num_gpus_per_replica=1.0 if kind == "vllm" else 0.0, max_new_tokens=reqs[0].max_tokens)
    rows = [{"id": str(i), **request_columns(r)} for i, r in enumerate(reqs)]
    t_go = time.time()
    ds = generate_dataset(ray.data.from_items(rows), cfg, model).select_columns(["completion_tokens"])
    arrivals = []
    for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"):   # one block per engine task
        arrivals.append((time.time(), sum(int(x) for x in b.column("completion_tokens").to_pylist())))
    return _views(t_go, arrivals)


def raw_vllm(model: str, reqs, chunk: int) -> dict:
    from vllm import LLM, SamplingParams

    t_go = time.time()
    llm = LLM(model=model, max_model_len=4096, enable_prefix_caching=True)
    sp = SamplingParams(temperature=0.0, max_tokens=reqs[0].max_tokens)
    arrivals = []
    for s in range(0, len(reqs), chunk):
        outs = llm.chat([r.messages for r in reqs[s:s + chunk]], sp)
        arrivals.append((time.time(), sum(len(o.outputs[0].token_ids) for o in outs)))
    return _views(t_go, arrivals)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="offline:smollm2")
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8, help="rows per generate call (the actor gets 4x)")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs for each side (default: all)")
    args = ap.parse_args()
    import ray
    import torch

    from speed_ray.models.offline import resolve_model

    model = resolve_model(args.model)
    reqs = _requests(args.n, args.max_tokens)
    gpu = torch.cuda.is_available()
    try:
        import vllm  # noqa: F401
        has_vllm = True
    except ImportError:
        has_vllm = False
    kind = "vllm" if gpu and has_vllm else "hf"
    chunk = args.batch_size * 4 if kind == "hf" else args.batch_size   # = ray_engines.map_kwargs' batch_size
    t0 = time.time()
    # one logical CPU more than the actor reserves: the 0.1-CPU plumbing tasks (repartition, select) must be
    # schedulable while the actor holds all the real cores; they do almost no work
    ray.init(num_cpus=None if gpu else args.num_cpus + 1, include_dashboard=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_init_s = time.time() - t0
    pipe = pipeline(kind, model, reqs, args.batch_size, float(args.num_cpus))
    ray.shutdown()
    if kind == "hf":
        torch.set_num_threads(args.num_cpus)
        raw = raw_hf(model, reqs, args.batch_size, chunk)
    else:
        raw = raw_vllm(model, reqs, chunk)

    def r(x: float, d: int = 2) -> float:
        return round(x, d)

    print(json.dumps({
        "benchmark": "generation", "engine": kind, "model": args.model, "prompts": args.n,
        "max_tokens": args.max_tokens, "batch_size": args.batch_size, "num_cpus": args.num_cpus,
        "ray_init_s": r(ray_init_s),
        "pipeline_output_tokens": pipe["output_tokens"], "raw_output_tokens": raw["output_tokens"],
        "pipeline_cold_wall_s": r(pipe["cold_wall_s"]), "raw_cold_wall_s": r(raw["cold_wall_s"]),
        "pipeline_first_batch_s": r(pipe["first_batch_s"]), "raw_first_batch_s": r(raw["first_batch_s"]),
        "pipeline_cold_tokens_per_s": r(pipe["cold_tokens_per_s"]), "raw_cold_tokens_per_s": r(raw["cold_tokens_per_s"]),
        "pipeline_steady_tokens_per_s": r(pipe["steady_tokens_per_s"]),
        "raw_steady_tokens_per_s": r(raw["steady_tokens_per_s"]),
        "ratio_cold": r(pipe["cold_tokens_per_s"] / raw["cold_tokens_per_s"], 3),
        "ratio_steady": r(pipe["steady_tokens_per_s"] / raw["steady_tokens_per_s"], 3),
        # headline: end to end, model load on both sides (the stricter of the two for the pipeline)
        "ratio": r(pipe["cold_tokens_per_s"] / raw["cold_tokens_per_s"], 3),
    }))


if __name__ == "__main__":
    main()
