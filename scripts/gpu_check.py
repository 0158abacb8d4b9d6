"""GPU check of the embedder's paper path (configs/paper.yaml) on one GPU, with torch, transformers and peft only.

A random-weight decoder of about 0.9B parameters (LlamaConfig: hidden 2048, 16 layers, 16 heads, MLP 5504, vocab
32000) with LoRA r16 on every linear layer, last-token pooling with an appended EOS, gradient checkpointing, and
InfoNCE with in-batch and hard negatives at temperature 0.02, all through the project's own code
(speed_ray/embedder: model.make_embedder, train.train_step / finish_gradients / optimizer_step, loss.grad_cache_step),
which imports no Ray. For fp16 (GradScaler) and bf16:

1. GradCache (chunks of `mini`) gives the plain step's loss and LoRA gradients (same precision);
2. both are close to the fp32 plain step's (same weights);
3. training steps of the paper's per-GPU batch (1536 / 16 workers = 96, GradCache chunks of 32, 512 tokens):
   samples/s, peak GPU memory, skipped (overflowed) fp16 steps.

Last line: one JSON object ("ok": every check passed; the exit status is 0 then, 1 otherwise).
Usage: bash scripts/gpu_check.sh  (env GPU_CHECK_SIZE=1b|small|tiny, GPU_CHECK_DEVICE=cuda|cpu,
GPU_CHECK_BUDGET_S=480: phases that would start after this many seconds are skipped and reported so).
"""

from __future__ import annotations

import copy
import json
import os
import random
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

SIZES = {
    # name: (hidden, layers, heads, intermediate, vocab), check batch / chunk, train batch / chunk / steps,
    # max query / doc tokens, words per query / document
    "1b": dict(model=(2048, 16, 16, 5504, 32000), check=(32, 8), train=(96, 32, 6), lengths=(512, 512),
               words=((16, 96), (64, 480))),
    "small": dict(model=(256, 4, 4, 688, 4000), check=(16, 4), train=(32, 8, 3), lengths=(128, 128),
                  words=((8, 32), (16, 120))),
    "tiny": dict(model=(64, 2, 4, 128, 512), check=(8, 2), train=(8, 4, 5), lengths=(32, 48),
                 words=((4, 16), (8, 40))),
}
# Tolerances, relative to the reference's gradient norm / loss. GradCache vs plain (same precision) differs
# only by chunk shapes (padding widths, kernel choice); vs fp32 by the precision itself.
TOL = {"fp32": {"gc_grad": 1e-4, "gc_loss": 1e-5},
       "fp16": {"gc_grad": 2e-2, "gc_loss": 2e-3, "ref_grad": 1e-1, "ref_loss": 2e-2},
       "bf16": {"gc_grad": 8e-2, "gc_loss": 1e-2, "ref_grad": 3e-1, "ref_loss": 5e-2}}
TEMPERATURE = 0.02
FORBIDDEN = ("ray", "vllm", "trl", "sentence_transformers", "mteb", "deepspeed")


def _tokenizer(vocab: int):
    """A word-level tokenizer over the words w0..wN (no hub): every word one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    words = specials + [f"w{i}" for i in range(vocab - len(specials))]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def _batch(rng: random.Random, n: int, vocab: int, words) -> list[dict]:
    def text(lo, hi):
        return " ".join(f"w{rng.randrange(vocab - 4)}" for _ in range(rng.randint(lo, hi)))

    (qlo, qhi), (dlo, dhi) = words
    return [{"query": text(qlo, qhi), "positive": text(dlo, dhi), "negative": text(dlo, dhi)} for _ in range(n)]


def _embedder(base, tok, precision: str, device, max_length: int):
    from speed_ray.embedder.model import make_embedder, storage_dtype

    backbone = copy.deepcopy(base).to(device=device, dtype=storage_dtype(precision, lora=True))
    torch.manual_seed(1)   # the same LoRA A for every precision
    emb = make_embedder(backbone, tok, "last_token", lora=True, lora_r=16, lora_alpha=16, precision=precision,
                        gradient_checkpointing=True, max_length=max_length)
    g = torch.Generator().manual_seed(2)   # LoRA B starts at 0; nonzero here so that A gets gradients too
    with torch.no_grad():
        for n, p in emb.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 1e-2)
    return emb.train()


def _grads(emb, batch, settings, precision, device, init_scale: float | None = None):
    """Loss and unscaled LoRA gradients of one step (fp16: an overflow halves the scale and redoes it)."""
    from speed_ray.embedder.train import finish_gradients, make_scaler, train_step

    params = [p for p in emb.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)   # for the scaler's unscale_; never stepped
    scaler = make_scaler(precision, device)
    if scaler is not None and init_scale is not None:
        scaler = torch.amp.GradScaler(device.type, init_scale=init_scale)
    for retry in range(12):
        loss = train_step(emb, batch, settings, scaler)
        finish_gradients(params, opt, scaler)
        grads = {n: p.grad.detach().float().clone() for n, p in emb.named_parameters() if p.requires_grad}
        opt.zero_grad(set_to_none=True)
        if scaler is None or all(torch.isfinite(g).all() for g in grads.values()):
            break
        scaler.update()
    return loss, grads, {"retries": retry, "scale": scaler.get_scale() if scaler is not None else None}


def _compare(got_loss, got, want_loss, want) -> dict:
    g = torch.cat([got[k].flatten() for k in sorted(want)])
    w = torch.cat([want[k].flatten() for k in sorted(want)])
    return {"loss_rel_diff": abs(got_loss - want_loss) / max(abs(want_loss), 1e-12),
            "grad_rel_err": float((g - w).norm() / w.norm().clamp(min=1e-30)),
            "grad_cos": float(torch.nn.functional.cosine_similarity(g, w, dim=0)),
            "grad_norm_ratio": float(g.norm() / w.norm().clamp(min=1e-30))}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device):
    return round(torch.cuda.max_memory_allocated() / 2 ** 30, 3) if device.type == "cuda" else None


def _train(emb, batches, settings, precision, device) -> dict:
    """Optimizer steps as train_func takes them; the first is a warm-up, not timed."""
    from speed_ray.embedder.train import finish_gradients, make_optimizer, make_scaler, optimizer_step, train_step

    params = [p for p in emb.parameters() if p.requires_grad]
    opt, sched = make_optimizer(emb, 1e-4, 0, len(batches))
    scaler = make_scaler(precision, device)
    losses, skipped, t0 = [], 0, None
    for i, b in enumerate(batches):
        if i == 1:
            _sync(device)
            t0 = time.time()
        losses.append(train_step(emb, b, settings, scaler))
        finish_gradients(params, opt, scaler)
        skipped += not optimizer_step(opt, sched, scaler)
    _sync(device)
    timed = len(batches) - 1
    dt = time.time() - t0 if t0 is not None else 0.0
    return {"steps": len(batches), "batch": len(batches[0]), "mini_batch": settings.mini_batch_size,
            "samples_per_s": round(timed * len(batches[0]) / dt, 3) if dt > 0 else None,
            "seconds_per_step": round(dt / timed, 4) if timed else None, "skipped_steps": skipped,
            "final_scale": scaler.get_scale() if scaler is not None else None,
            "losses": [round(x, 5) for x in losses], "peak_mem_gb": _peak_gb(device)}


def main() -> int:
    t_start = time.time()
    size = os.environ.get("GPU_CHECK_SIZE", "1b")
    want_device = os.environ.get("GPU_CHECK_DEVICE", "cuda")
    budget = float(os.environ.get("GPU_CHECK_BUDGET_S", "480"))
    out: dict = {"check": "embedder_gpu_path", "size": size, "ok": False, "failures": []}
    try:
        import peft
        import transformers
        from transformers import LlamaConfig, LlamaModel

        from speed_ray.embedder.train import StepSettings

        if want_device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("GPU_CHECK_DEVICE=cuda but torch sees no CUDA device")
        device = torch.device(want_device)
        spec = SIZES[size]
        hidden, layers, heads, inter, vocab = spec["model"]
        qlen, dlen = spec["lengths"]
        out.update(device=str(device), gpu=torch.cuda.get_device_name() if device.type == "cuda" else None,
                   torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                   cuda=torch.version.cuda)
        if device.type == "cpu":
            torch.set_num_threads(int(os.environ.get("GPU_CHECK_THREADS", "1")))

        tok = _tokenizer(vocab)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        t = time.time()
        with torch.device(device):
            base = LlamaModel(cfg)
        base = base.to("cpu").eval()
        out["params"] = sum(p.numel() for p in base.parameters())
        out["build_s"] = round(time.time() - t, 2)

        rng = random.Random(0)
        check_n, check_mini = spec["check"]
        train_n, train_mini, train_steps = spec["train"]
        check_batch = _batch(rng, check_n, vocab, spec["words"])
        train_batches = [_batch(rng, train_n, vocab, spec["words"]) for _ in range(train_steps + 1)]
        plain = StepSettings(TEMPERATURE, 0, False, qlen, dlen)
        cached = StepSettings(TEMPERATURE, check_mini, False, qlen, dlen)
        out["settings"] = {"temperature": TEMPERATURE, "lengths": [qlen, dlen], "check_batch": check_n,
                           "check_mini": check_mini, "lora_r": 16, "gradient_checkpointing": True,
                           "pooling": "last_token"}

        def fail(what: str, value, limit) -> None:
            out["failures"].append(f"{what}: {value:.3g} > {limit:.3g}")

        # fp32 reference: plain and GradCache
        _peak_reset(device)
        ref = _embedder(base, tok, "fp32", device, max(qlen, dlen))
        out["trainable_params"] = sum(p.numel() for p in ref.parameters() if p.requires_grad)
        ref_loss, ref_grads, _ = _grads(ref, check_batch, plain, "fp32", device)
        gc_loss, gc_grads, _ = _grads(ref, check_batch, cached, "fp32", device)
        c = _compare(gc_loss, gc_grads, ref_loss, ref_grads)
        out["fp32"] = {"loss": ref_loss, "gradcache_vs_plain": c, "check_peak_mem_gb": _peak_gb(device)}
        for key, tol in (("grad_rel_err", TOL["fp32"]["gc_grad"]), ("loss_rel_diff", TOL["fp32"]["gc_loss"])):
            if not c[key] <= tol:
                fail(f"fp32 gradcache_vs_plain {key}", c[key], tol)
        del ref
        ref_grads = {k: v.to(device) for k, v in ref_grads.items()}

        precisions = ["fp16", "bf16"]
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            precisions.remove("bf16")
            out["bf16"] = {"skipped": "no bf16 support on this GPU"}
        for precision in precisions:
            if time.time() - t_start > budget:
                out[precision] = {"skipped": f"time budget of {budget:.0f} s spent"}
                out["failures"].append(f"{precision}: not run (time budget)")
                continue
            _peak_reset(device)
            emb = _embedder(base, tok, precision, device, max(qlen, dlen))
            p_loss, p_grads, p_info = _grads(emb, check_batch, plain, precision, device)
            g_loss, g_grads, g_info = _grads(emb, check_batch, cached, precision, device, p_info["scale"])
            res = {"loss": p_loss, "gradcache_vs_plain": _compare(g_loss, g_grads, p_loss, p_grads),
                   "plain_vs_fp32": _compare(p_loss, p_grads, ref_loss, ref_grads),
                   "gradcache_vs_fp32": _compare(g_loss, g_grads, ref_loss, ref_grads),
                   "scaler": {"plain": p_info, "gradcache": g_info}, "check_peak_mem_gb": _peak_gb(device)}
            tol = TOL[precision]
            for name, key, limit in (("gradcache_vs_plain", "grad_rel_err", tol["gc_grad"]),
                                     ("gradcache_vs_plain", "loss_rel_diff", tol["gc_loss"]),
                                     ("plain_vs_fp32", "grad_rel_err", tol["ref_grad"]),
                                     ("plain_vs_fp32", "loss_rel_diff", tol["ref_loss"]),
                                     ("gradcache_vs_fp32", "grad_rel_err", tol["ref_grad"]),
                                     ("gradcache_vs_fp32", "loss_rel_diff", tol["ref_loss"])):
                if not res[name][key] <= limit:   # also catches nan
                    fail(f"{precision} {name} {key}", res[name][key], limit)
            if time.time() - t_start <= budget:
                _peak_reset(device)
                train = StepSettings(TEMPERATURE, train_mini, False, qlen, dlen)
                res["train"] = _train(emb, train_batches, train, precision, device)
                if not all(x == x and abs(x) != float("inf") for x in res["train"]["losses"]):
                    out["failures"].append(f"{precision} train: non-finite loss")
                if res["train"]["skipped_steps"] >= len(train_batches):
                    out["failures"].append(f"{precision} train: every step skipped")
            else:
                res["train"] = {"skipped": f"time budget of {budget:.0f} s spent"}
                out["failures"].append(f"{precision} train: not run (time budget)")
            out[precision] = res
            del emb
        # the GPU machine has torch, transformers, peft (and their dependencies) only
        out["forbidden_imported"] = sorted(m for m in FORBIDDEN if m in sys.modules)
        if out["forbidden_imported"]:
            out["failures"].append(f"imported {', '.join(out['forbidden_imported'])}")
        out["ok"] = not out["failures"]
    except Exception as err:  # the JSON line is always printed
        traceback.print_exc()
        out["error"] = f"{type(err).__name__}: {err}"
    out["seconds"] = round(time.time() - t_start, 1)
    print(json.dumps(out, default=str), flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
