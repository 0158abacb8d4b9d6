"""Embedder training throughput vs sentence-transformers (MNRL, Cached MNRL), and GradCache peak memory at batch 256.

Same model (offline:minilm, full fine-tuning, fp32 CPU), same batches, same steps. The headline batches have
SPEED-like lengths (queries 4-30 words, documents 20-110), where the project's length-sorted packing of all
three sides pays off; near-uniform lengths, where it cannot, are reported beside them (uniform_*), and so are
long documents that fill a 256-token limit (long_*: queries 4-30 words, documents 200-400 words, truncated at
256 tokens by both trainers; padding saves almost nothing there, what is left is the number of forward passes).
Throughput: project's train_step (plain) vs sentence-transformers' losses called on the same batches with the
same AdamW (their SentenceTransformerTrainer adds dataloader overhead that is not the loss; this measures the
loss+model step). Memory: peak RSS (resource.getrusage ru_maxrss) of a fresh subprocess per measurement, which
sees torch's CPU allocations; the baseline RSS after loading the model is subtracted. On a shared machine the
wall-clock rates swing with other processes' load: *_cpu_vs_st_* beside each ratio is the same comparison in
this process's CPU seconds (user + system, all threads; ST's over the project's). Last line: one JSON object.
The long_ray case is the issue's own measurement: the project's whole Ray Train loop (`speed-ray train-embedder` on
a local Ray, one worker with --threads torch threads: the feed's reads, train_step, the optimizer, the step log)
against sentence-transformers' MNRL step in this process with the same threads, on the long triples (the feed
batches them in its own seeded order: same rows, other groupings). Its step times are the gaps between the step
log's per-step timestamps after the first (warm-up) step; ST's are timed step by step after one warm-up step.
Usage: python benchmarks/embedder_train.py [--steps 5] [--batch 32] [--mem-batch 256] [--rounds 3]
                                           [--cases varied,gradcache,uniform,long,long_ray,memory]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


_WORDS = ("the of and to in is was for on that with as by at from which or be are this had not but volcano tax "
          "chess bread jazz bee river opera satellite glacier protein court harbor algorithm").split()


def _batches(n_steps: int, b: int, shape: str = "varied") -> list[list[dict]]:
    """Triples with SPEED-like lengths (varied: queries 4-30 words, documents 20-110 words, as synthetic
    retrieval/classification samples run), near-constant lengths (uniform: every text of a side about as
    long, the case where per-side padding wastes nothing) or long documents (long: 200-400 words, about one
    token each, so most fill a 256-token limit). Seeded: both trainers see the same batches."""
    import random

    rng = random.Random(0)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))

    q, d = {"varied": ((4, 30), (20, 110)), "uniform": ((10, 12), (30, 33)), "long": ((4, 30), (200, 400))}[shape]
    return [[{"query": f"Instruct: Retrieve passages\nQuery: {text(*q)}", "positive": text(*d),
              "negative": text(*d)} for _ in range(b)] for _ in range(n_steps)]


LONG_MAX_LENGTH = 256   # the long case's document limit (both trainers truncate there)


def project_step(mini: int = 0, max_length: int = 128):
    """One training step of the project's trainer (train_step + AdamW) on a fresh model."""
    import torch

    from speed_ray.embedder.model import load_embedder
    from speed_ray.embedder.train import StepSettings, train_step
    from speed_ray.models.offline import resolve_model

    torch.manual_seed(0)
    emb = load_embedder(resolve_model("offline:minilm"), lora=False, max_length=128).train()
    opt = torch.optim.AdamW([p for p in emb.parameters() if p.requires_grad], lr=1e-5)
    s = StepSettings(temperature=0.05, mini_batch_size=mini, max_query_length=128, max_doc_length=max_length)

    def step(b):
        train_step(emb, b, s)
        opt.step()
        opt.zero_grad()

    return step


def st_step(cached: bool = False, mini: int = 32, max_length: int = 128):
    """One step of sentence-transformers' (Cached)MultipleNegativesRankingLoss + AdamW on a fresh model."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import (CachedMultipleNegativesRankingLoss,
                                                                   MultipleNegativesRankingLoss)

    from speed_ray.models.offline import resolve_model

    torch.manual_seed(0)
    model = SentenceTransformer(resolve_model("offline:minilm"), device="cpu")
    model.max_seq_length = max_length
    model.train()
    loss = (CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=mini, show_progress_bar=False)
            if cached else MultipleNegativesRankingLoss(model, scale=20.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(b):
        feats = [model.preprocess([t[k] for t in b]) for k in ("query", "positive", "negative")]
        out = loss(feats, None)
        out.backward()
        opt.step()
        opt.zero_grad()

    return step


def compare(ours, theirs, batches, rounds: int, cpu: dict | None = None) -> tuple[float, float]:
    """Samples/s of each step function: one warm-up step each, then `rounds` timed passes over batches[1:],
    alternating ours and theirs (so drift in the machine's speed hits both); the medians. cpu, if given, gets
    "cpu_vs_st": the median of theirs' CPU seconds (user + system) per round over ours'."""
    import statistics

    ours(batches[0])
    theirs(batches[0])
    rates: dict[int, list[float]] = {0: [], 1: []}
    secs: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(rounds):
        for k, step in enumerate((ours, theirs)):
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            for b in batches[1:]:
                step(b)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            rates[k].append((len(batches) - 1) * len(batches[0]) / (time.perf_counter() - t0))
            secs[k].append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    if cpu is not None:
        cpu["cpu_vs_st"] = statistics.median(secs[1]) / statistics.median(secs[0])
    return statistics.median(rates[0]), statistics.median(rates[1])


def ray_loop_vs_st(steps: int, batch: int, threads: int) -> dict:
    """Median step seconds of the project's Ray Train loop (train-embedder, local Ray, one worker) and of ST's MNRL
    step in this process, on the same long triples."""
    import glob
    import statistics
    import tempfile

    import torch

    batches = _batches(steps + 1, batch, "long")
    with tempfile.TemporaryDirectory(prefix="embtrain-") as d:
        data = os.path.join(d, "long.jsonl")
        with open(data, "w") as f:
            for k, b in enumerate(batches):
                for i, t in enumerate(b):
                    f.write(json.dumps({"id": f"r{k}-{i}", **t}) + "\n")
        out = os.path.join(d, "run")
        env = {**os.environ, "RAY_TMPDIR": d, "SPEED_RAY_PROGRESS": "0"}
        cmd = [sys.executable, "-c", "import sys; from speed_ray.cli import main; sys.exit(main(sys.argv[1:]))",
               "train-embedder", data, "--base-model", "offline:minilm", "--out", out,
               f"run.num_cpus={max(2, threads)}", "embedder.lora=false", "embedder.num_workers=1",
               f"embedder.cpus_per_worker={threads}", f"embedder.torch_threads={threads}",
               f"embedder.batch_size={batch}", f"embedder.max_steps={steps + 1}", "embedder.save_steps=100000",
               f"embedder.max_doc_length={LONG_MAX_LENGTH}", "embedder.max_query_length=128",
               "embedder.temperature=0.05", "embedder.learning_rate=1e-5", "embedder.warmup_steps=0",
               "embedder.precision=fp32", "embedder.pooling=mean"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        log = glob.glob(os.path.join(out, "stages", "train_embedder", "*", "artifacts", "progress", "steps.jsonl"))
        times = [json.loads(ln)["time"] for ln in open(log[0]) if ln.strip()]
    ours = [b - a for a, b in zip(times, times[1:])]
    torch.set_num_threads(threads)
    st = st_step(max_length=LONG_MAX_LENGTH)
    st(batches[0])
    theirs = []
    for b in batches[1:]:
        t = time.perf_counter()
        st(b)
        theirs.append(time.perf_counter() - t)
    o, t_ = statistics.median(ours), statistics.median(theirs)
    return {"long_ray_threads": threads, "long_ray_step_s": round(o, 3), "long_st_mnrl_step_s": round(t_, 3),
            "long_ray_steps_s": [round(x, 2) for x in ours], "long_st_mnrl_steps_s": [round(x, 2) for x in theirs],
            "long_ray_steps_timed": len(ours), "long_ray_command_wall_s": round(wall, 1),
            "long_ray_vs_st_mnrl": round(t_ / o, 3),
            "long_ray_vs_st_mnrl_mean": round(statistics.mean(theirs) / statistics.mean(ours), 3)}


def _peak_child(kind: str, batch: int, mini: int) -> float:
    """Peak RSS (MiB) of one training step in a fresh process, minus the RSS after loading."""
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--batch", str(batch), "--mini", str(mini)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(kind: str, batch: int, mini: int) -> None:
    import torch

    from speed_ray.embedder.model import load_embedder
    from speed_ray.embedder.train import StepSettings, train_step
    from speed_ray.models.offline import resolve_model

    emb = load_embedder(resolve_model("offline:minilm"), lora=False, max_length=128).train()
    b = _batches(1, batch)[0]
    emb.encode(["warm up"]).sum().backward()
    emb.zero_grad()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    train_step(emb, b, StepSettings(temperature=0.05, mini_batch_size=mini if kind == "gradcache" else 0,
                                    max_query_length=128, max_doc_length=128))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # ru_maxrss is a high-water mark: the increment is 0 when the step stays under the load-time peak, so the
    # absolute peak of the whole process is reported too (the conservative comparison: same model, same imports).
    print(json.dumps({"peak_mib": peak - base, "abs_peak_mib": peak}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--mem-batch", type=int, default=256)
    ap.add_argument("--mini", type=int, default=32, help="GradCache chunk at --mem-batch (half of it at --batch)")
    ap.add_argument("--rounds", type=int, default=3, help="timed passes per trainer; the median is reported")
    ap.add_argument("--cases", default="varied,gradcache,uniform,long,long_ray,memory",
                    help="which measurements to run (comma-separated; the default runs all)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the long_ray case (both sides)")
    ap.add_argument("--ray-steps", type=int, default=8,
                    help="timed steps of the long_ray case (after one warm-up step each): the first steps of a fresh "
                         "process fault in the activations' memory, a training run's steady steps do not")
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        return _child(a.child, a.batch, a.mini)
    import torch

    cases = set(a.cases.split(","))
    unknown = cases - {"varied", "gradcache", "uniform", "long", "long_ray", "memory"}
    if unknown:
        raise SystemExit(f"unknown --cases: {sorted(unknown)}")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    batches = _batches(a.steps + 1, a.batch)
    res = {"batch": a.batch, "steps": a.steps, "rounds": a.rounds, "threads": torch.get_num_threads(),
           "data": "varied (SPEED-like lengths) for the headline; uniform lengths and long documents (max_doc_length "
                   f"{LONG_MAX_LENGTH}) reported beside it"}
    if "varied" in cases:
        res["project_plain_samples_s"], res["st_mnrl_samples_s"] = compare(project_step(), st_step(), batches,
                                                                           a.rounds, cpu := {})
        res["plain_vs_st_mnrl"] = res["project_plain_samples_s"] / res["st_mnrl_samples_s"]
        res["plain_cpu_vs_st_mnrl"] = cpu["cpu_vs_st"]
    if "gradcache" in cases:
        res["project_gradcache_samples_s"], res["st_cmnrl_samples_s"] = compare(
            project_step(a.mini // 2), st_step(cached=True, mini=a.mini // 2), batches, a.rounds, cpu := {})
        res["gradcache_vs_st_cmnrl"] = res["project_gradcache_samples_s"] / res["st_cmnrl_samples_s"]
        res["gradcache_cpu_vs_st_cmnrl"] = cpu["cpu_vs_st"]
    if "uniform" in cases:
        res["uniform_project_plain_samples_s"], res["uniform_st_mnrl_samples_s"] = compare(
            project_step(), st_step(), _batches(a.steps + 1, a.batch, "uniform"), a.rounds, cpu := {})
        res["uniform_plain_vs_st_mnrl"] = res["uniform_project_plain_samples_s"] / res["uniform_st_mnrl_samples_s"]
        res["uniform_plain_cpu_vs_st_mnrl"] = cpu["cpu_vs_st"]
    if "long" in cases:
        res["long_project_plain_samples_s"], res["long_st_mnrl_samples_s"] = compare(
            project_step(max_length=LONG_MAX_LENGTH), st_step(max_length=LONG_MAX_LENGTH),
            _batches(a.steps + 1, a.batch, "long"), a.rounds, cpu := {})
        res["long_plain_vs_st_mnrl"] = res["long_project_plain_samples_s"] / res["long_st_mnrl_samples_s"]
        res["long_plain_cpu_vs_st_mnrl"] = cpu["cpu_vs_st"]
    if "long_ray" in cases:
        res.update(ray_loop_vs_st(a.ray_steps, a.batch, a.threads))
    if "memory" in cases:
        p, c = _peak_child("plain", a.mem_batch, a.mini), _peak_child("gradcache", a.mem_batch, a.mini)
        res["peak_mib_plain_b%d" % a.mem_batch] = p["peak_mib"]
        res["peak_mib_gradcache_b%d" % a.mem_batch] = c["peak_mib"]
        res["abs_peak_mib_plain_b%d" % a.mem_batch] = plain = p["abs_peak_mib"]
        res["abs_peak_mib_gradcache_b%d" % a.mem_batch] = cached = c["abs_peak_mib"]
        res["gradcache_vs_plain_memory"] = cached / plain if plain > 0 else None
        res["memory_method"] = ("absolute peak RSS (getrusage) of a fresh subprocess per run; peak_mib_* is the "
                                "increment over the high-water mark after model load")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
