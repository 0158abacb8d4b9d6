"""scripts/gpu_check.sh, the prepared GPU check of the embedder's paper path, run on CPU at its tiny size: it
ends with one JSON line, its checks pass, and it imports nothing the GPU machine lacks (no Ray)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_tiny_and_prints_one_json_line():
    env = os.environ | {"PYTHON": sys.executable, "GPU_CHECK_SIZE": "tiny", "GPU_CHECK_DEVICE": "cpu",
                        "GPU_CHECK_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    last = proc.stdout.strip().splitlines()[-1]
    out = json.loads(last)
    assert proc.returncode == 0 and out["ok"] is True, (out.get("failures"), out.get("error"), proc.stderr[-3000:])
    assert out["failures"] == [] and out["forbidden_imported"] == []
    assert out["fp32"]["gradcache_vs_plain"]["grad_rel_err"] < 1e-4
    for precision in ("fp16", "bf16"):
        r = out[precision]
        assert r["gradcache_vs_plain"]["grad_rel_err"] < 0.05 and r["plain_vs_fp32"]["grad_cos"] > 0.99
        assert r["train"]["steps"] == 6 and r["train"]["samples_per_s"] > 0
        assert r["train"]["skipped_steps"] < r["train"]["steps"]
    # fp16: the scaler starts at 2**16; the tiny model's gradients overflow there and the scale comes down
    assert out["fp16"]["scaler"]["plain"]["scale"] < 2 ** 16 and out["bf16"]["scaler"]["plain"]["scale"] is None
    assert out["fp16"]["train"]["final_scale"] is not None and out["bf16"]["train"]["final_scale"] is None


def test_gpu_check_default_size_is_about_one_billion_parameters():
    import torch
    from transformers import LlamaConfig, LlamaModel

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    hidden, layers, heads, inter, vocab = mod.SIZES["1b"]["model"]
    with torch.device("meta"):
        model = LlamaModel(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                       num_hidden_layers=layers, num_attention_heads=heads))
    n = sum(p.numel() for p in model.parameters())
    assert 0.8e9 < n < 1.2e9, n
    assert mod.SIZES["1b"]["lengths"] == (512, 512)   # the paper's max query / document length
