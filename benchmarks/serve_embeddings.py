"""Served /v1/embeddings throughput under batch load vs the same model's raw in-process encode.

    .venv/bin/python benchmarks/serve_embeddings.py [--model offline:minilm] [--clients 8] [--requests 64] [--batch 32]

The load comes from a second process over loopback (asyncio + httpx, N concurrent clients, a fixed number of
requests of --batch texts each, base64 like the openai client). Raw throughput is SentenceTransformer.encode of
the same texts with the replica's thread count, measured before and after the load (mean): in a Ray actor with the
replica's resources (the ratio's baseline, same scheduling context) and in this process (reported too). Last line:
one JSON object with requests/s, texts/s, p50/p99 latency, raw texts/s and the ratio (target >= 0.7).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

WORDS = ("ray serve batches embedding requests from many clients while the replica encodes texts with a small "
         "transformer model trained on synthetic data written by aligned language models for retrieval "
         "classification clustering and semantic similarity tasks across many topics and languages").split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 48))) for _ in range(n)]


def load_client(url: str, token: str | None, clients: int, requests: int, batch: int) -> dict:
    """Runs in the second process: `clients` workers share `requests` requests; returns latencies and timing."""
    import asyncio

    import httpx

    texts = make_texts(requests * batch, seed=1)
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def main() -> dict:
        queue: asyncio.Queue = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(texts[i * batch:(i + 1) * batch])
        lat: list[float] = []
        errors = 0
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(timeout=600, limits=limits, headers=headers) as c:
            # warm-up: first request pays connection setup and lazy init
            (await c.post(f"{url}/embeddings", json={"input": texts[:batch], "model": "m"})).raise_for_status()

            async def worker():
                nonlocal errors
                while not queue.empty():
                    body = {"input": queue.get_nowait(), "model": "m", "encoding_format": "base64"}
                    t = time.perf_counter()
                    r = await c.post(f"{url}/embeddings", json=body)
                    lat.append(time.perf_counter() - t)
                    if r.status_code != 200 or len(r.json()["data"]) != len(body["input"]):
                        errors += 1

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(clients)))
            wall = time.perf_counter() - t0
        return {"latencies": lat, "wall_s": wall, "errors": errors}

    return asyncio.run(main())


def raw_throughput(model, texts: list[str], batch_size: int) -> float:
    t = time.perf_counter()
    model.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)
    return len(texts) / (time.perf_counter() - t)


def actor_raw_throughput(ray, path: str, threads: int, num_cpus: float, texts: list[str], batch_size: int) -> float:
    """Raw encode in a Ray actor with the replica's resources, so both sides share one scheduling context."""

    @ray.remote(num_cpus=num_cpus)
    class RawEncoder:
        def __init__(self):
            import torch
            from sentence_transformers import SentenceTransformer

            torch.set_num_threads(threads)
            self.model = SentenceTransformer(path, device="cpu")
            self.model.encode(texts[:64], batch_size=64)   # warm-up

        def run(self) -> float:
            return raw_throughput(self.model, texts, batch_size)

    actor = RawEncoder.remote()
    try:
        return ray.get(actor.run.remote())
    finally:
        ray.kill(actor)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="offline:minilm")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, replica and raw alike")
    ap.add_argument("--port", type=int, default=8397)
    ap.add_argument("--client", help=argparse.SUPPRESS)   # internal: run as the load-generating process
    args = ap.parse_args()
    if args.client:
        print(json.dumps(load_client(args.client, os.environ.get("BENCH_TOKEN"), args.clients, args.requests,
                                     args.batch)))
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray
    import torch
    from ray import serve
    from sentence_transformers import SentenceTransformer

    from speed_ray.serve.app import APP_NAME, resolve_served_model, start
    from speed_ray.serve.config import ServeConfig

    cfg = ServeConfig(port=args.port, num_cpus=0.5, torch_threads=args.threads, token_env="BENCH_NO_TOKEN",
                      encode_batch_size=64)
    path = resolve_served_model(args.model)
    torch.set_num_threads(args.threads)
    model = SentenceTransformer(path, device="cpu")
    texts = make_texts(args.requests * args.batch, seed=1)
    model.encode(texts[:64], batch_size=64)   # warm-up
    raw_before = raw_throughput(model, texts, cfg.encode_batch_size)

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    try:
        actor_before = actor_raw_throughput(ray, path, args.threads, cfg.num_cpus, texts, cfg.encode_batch_size)
        url, _ = start(args.model, cfg)
        proc = subprocess.run([sys.executable, __file__, "--client", url, "--clients", str(args.clients),
                               "--requests", str(args.requests), "--batch", str(args.batch)],
                              capture_output=True, text=True, check=True)
        load = json.loads(proc.stdout.strip().splitlines()[-1])
        serve.delete(APP_NAME)
        actor_after = actor_raw_throughput(ray, path, args.threads, cfg.num_cpus, texts, cfg.encode_batch_size)
    finally:
        serve.shutdown()
        ray.shutdown()
    raw_after = raw_throughput(model, texts, cfg.encode_batch_size)
    raw = (raw_before + raw_after) / 2
    actor_raw = (actor_before + actor_after) / 2
    n_texts = args.requests * args.batch
    served = n_texts / load["wall_s"]
    print(json.dumps({
        "benchmark": "serve_embeddings", "model": args.model, "clients": args.clients, "requests": args.requests,
        "texts_per_request": args.batch, "threads": args.threads, "errors": load["errors"],
        "requests_per_s": round(args.requests / load["wall_s"], 2), "texts_per_s": round(served, 1),
        "p50_latency_s": round(percentile(load["latencies"], 0.5), 4),
        "p99_latency_s": round(percentile(load["latencies"], 0.99), 4),
        "raw_texts_per_s": round(actor_raw, 1),
        "raw_actor_before_after": [round(actor_before, 1), round(actor_after, 1)],
        "raw_in_process_texts_per_s": round(raw, 1), "raw_in_process_before_after": [round(raw_before, 1),
                                                                                      round(raw_after, 1)],
        "ratio": round(served / actor_raw, 3), "ratio_vs_in_process": round(served / raw, 3), "target_ratio": 0.7,
    }))


if __name__ == "__main__":
    main()
