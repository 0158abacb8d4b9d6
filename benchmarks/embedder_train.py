"""Embedder training throughput vs sentence-transformers (MNRL, Cached MNRL), and GradCache peak memory at batch 256.

Same model (offline:minilm, full fine-tuning, fp32 CPU), same batches, same steps. Throughput: project's
train_step (plain) vs sentence-transformers' losses called on the same batches with the same AdamW (their
SentenceTransformerTrainer adds dataloader overhead that is not the loss; this measures the loss+model step).
Memory: peak RSS (resource.getrusage ru_maxrss) of a fresh subprocess per measurement, which sees torch's CPU
allocations; the baseline RSS after loading the model is subtracted. Last line: one JSON object.
Usage: python benchmarks/embedder_train.py [--steps 5] [--batch 32] [--mem-batch 256]
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


def _batches(n_steps: int, b: int) -> list[list[dict]]:
    words = "volcano tax chess bread jazz bee river opera satellite glacier".split()
    out = []
    for s in range(n_steps):
        out.append([{"query": f"Instruct: Retrieve passages\nQuery: question {s}-{i} about {words[i % 10]}",
                     "positive": f"passage {s}-{i} explaining {words[i % 10]} " * 4,
                     "negative": f"passage {s}-{i} explaining {words[(i + 5) % 10]} " * 4} for i in range(b)])
    return out


def run_project(batches, mini: int = 0) -> float:
    import torch

    from speed_ray.embedder.model import load_embedder
    from speed_ray.embedder.train import StepSettings, train_step
    from speed_ray.models.offline import resolve_model

    torch.manual_seed(0)
    emb = load_embedder(resolve_model("offline:minilm"), lora=False, max_length=128).train()
    opt = torch.optim.AdamW([p for p in emb.parameters() if p.requires_grad], lr=1e-5)
    s = StepSettings(temperature=0.05, mini_batch_size=mini, max_query_length=128, max_doc_length=128)
    train_step(emb, batches[0], s)
    opt.zero_grad()
    t0 = time.perf_counter()
    for b in batches[1:]:
        train_step(emb, b, s)
        opt.step()
        opt.zero_grad()
    return (len(batches) - 1) * len(batches[0]) / (time.perf_counter() - t0)


def run_st(batches, cached: bool = False, mini: int = 32) -> float:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import (CachedMultipleNegativesRankingLoss,
                                                                   MultipleNegativesRankingLoss)

    from speed_ray.models.offline import resolve_model

    torch.manual_seed(0)
    model = SentenceTransformer(resolve_model("offline:minilm"), device="cpu")
    model.max_seq_length = 128
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

    step(batches[0])
    t0 = time.perf_counter()
    for b in batches[1:]:
        step(b)
    return (len(batches) - 1) * len(batches[0]) / (time.perf_counter() - t0)


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
    ap.add_argument("--mini", type=int, default=32)
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        return _child(a.child, a.batch, a.mini)
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    batches = _batches(a.steps + 1, a.batch)
    res = {"batch": a.batch, "steps": a.steps}
    res["project_plain_samples_s"] = run_project(batches)
    res["st_mnrl_samples_s"] = run_st(batches)
    res["project_gradcache_samples_s"] = run_project(batches, a.mini)
    res["st_cmnrl_samples_s"] = run_st(batches, cached=True, mini=a.mini)
    res["plain_vs_st_mnrl"] = res["project_plain_samples_s"] / res["st_mnrl_samples_s"]
    res["gradcache_vs_st_cmnrl"] = res["project_gradcache_samples_s"] / res["st_cmnrl_samples_s"]
    p, c = _peak_child("plain", a.mem_batch, a.mini), _peak_child("gradcache", a.mem_batch, a.mini)
    res["peak_mib_plain_b%d" % a.mem_batch], res["peak_mib_gradcache_b%d" % a.mem_batch] = p["peak_mib"], c["peak_mib"]
    res["abs_peak_mib_plain_b%d" % a.mem_batch] = plain = p["abs_peak_mib"]
    res["abs_peak_mib_gradcache_b%d" % a.mem_batch] = cached = c["abs_peak_mib"]
    res["gradcache_vs_plain_memory"] = cached / plain if plain > 0 else None
    res["memory_method"] = ("absolute peak RSS (getrusage) of a fresh subprocess per run; peak_mib_* is the increment "
                            "over the high-water mark after model load")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
