"""Teacher client throughput against the fake OpenAI server with a fixed latency: achieved vs ideal requests/s.

    .venv/bin/python benchmarks/teacher_client.py [--requests 2000] [--concurrency 64] [--latency 0.2] [--sdk]

The server runs in a subprocess (so it does not share the client's GIL); the ideal is concurrency / latency. A bare
aiohttp loop under the same semaphore is timed too: on a loaded machine the gap to the ideal is the machine's, and
ratio_vs_bare says what the client's retries, limits, accounting and parsing cost on top.
--sdk also times openai.AsyncOpenAI(max_retries=0) under the same semaphore, for the record of why the client
uses httpx. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from speed_ray.llm.client import ChatClient  # noqa: E402
from speed_ray.llm.rows import LLMRequest  # noqa: E402


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "fake_openai.py"), "--latency", str(latency)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"fake server did not start: {line!r}")
    return proc, line.split(" ", 1)[1]


def requests(n: int, tag: str) -> list[LLMRequest]:
    return [LLMRequest([{"role": "system", "content": "You write retrieval examples as JSON."},
                         {"role": "user", "content": f"Write example {tag}{i} about topic {i % 97}."}],
                        max_tokens=256, response_format={"type": "json_object"}, request_id=f"{tag}{i}")
            for i in range(n)]


async def run_client(base_url: str, n: int, concurrency: int) -> tuple[float, float]:
    """(requests/s, client CPU seconds per request): the second is what the client itself costs, which a
    shared machine's load does not inflate the way it does wall time."""
    client = ChatClient(base_url, "bench", concurrency=concurrency, max_retries=0, timeout_s=30)
    await client.complete_many(requests(concurrency, "warm"))  # connections open, code paths warm
    t0, c0 = time.perf_counter(), time.process_time()
    res = await client.complete_many(requests(n, "r"))
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    await client.aclose()
    bad = [r.error for r in res if r.error]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed, e.g. {bad[0]}")
    return n / dt, cpu / n


async def run_bare(base_url: str, n: int, concurrency: int) -> float:
    """The transport's ceiling on this machine: bare aiohttp posts under a semaphore, no retries/limits/parsing."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        sem = asyncio.Semaphore(concurrency)

        async def one(r: LLMRequest):
            async with sem:
                body = json.dumps({"model": "bench", "messages": r.messages, "max_tokens": r.max_tokens}).encode()
                async with s.post(f"{base_url}/chat/completions", data=body,
                                  headers={"Content-Type": "application/json"}) as resp:
                    return json.loads(await resp.read())

        await asyncio.gather(*(one(r) for r in requests(concurrency, "bwarm")))
        t0 = time.perf_counter()
        await asyncio.gather(*(one(r) for r in requests(n, "b")))
        return n / (time.perf_counter() - t0)


async def run_sdk(base_url: str, n: int, concurrency: int) -> float:
    import httpx
    import openai

    sdk = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, http_client=httpx.AsyncClient(
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)))
    sem = asyncio.Semaphore(concurrency)

    async def one(r: LLMRequest):
        async with sem:
            return await sdk.chat.completions.create(model="bench", messages=r.messages, max_tokens=r.max_tokens,
                                                     response_format=r.response_format)

    await asyncio.gather(*(one(r) for r in requests(concurrency, "swarm")))
    t0 = time.perf_counter()
    await asyncio.gather(*(one(r) for r in requests(n, "s")))
    dt = time.perf_counter() - t0
    await sdk.close()
    return n / dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--latency", type=float, default=0.2)
    p.add_argument("--sdk", action="store_true")
    args = p.parse_args()
    os.environ.pop("OPENAI_API_KEY", None)
    proc, url = start_server(args.latency)
    try:
        achieved, cpu_per_req = asyncio.run(run_client(url, args.requests, args.concurrency))
        bare = asyncio.run(run_bare(url, args.requests, args.concurrency))
        sdk = asyncio.run(run_sdk(url, args.requests, args.concurrency)) if args.sdk else None
    finally:
        proc.terminate()
        proc.wait(10)
    ideal = args.concurrency / args.latency
    out = {"achieved_rps": round(achieved, 1), "ideal_rps": round(ideal, 1), "ratio": round(achieved / ideal, 3),
           "concurrency": args.concurrency, "latency_s": args.latency, "requests": args.requests,
           "client_cpu_ms_per_request": round(cpu_per_req * 1000, 3), "cpu_count": os.cpu_count(),
           "load_avg_1m": round(os.getloadavg()[0], 1)}
    out["bare_aiohttp_rps"] = round(bare, 1)          # same machine, same moment: what the transport allows
    out["ratio_vs_bare"] = round(achieved / bare, 3)
    if sdk is not None:
        out["openai_sdk_rps"] = round(sdk, 1)
        out["openai_sdk_ratio"] = round(sdk / ideal, 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
