"""What Ray Train costs on top of plain TRL for one SFT run: wall time of `train_sft` (TorchTrainer, checkpoints
reported to Ray storage, merged export) vs the same TRL SFTTrainer job run in this process without Ray.

    .venv/bin/python benchmarks/align_train.py --model offline:tiny-llama --steps 20 --workers 1

Both train the same examples with the same config; the baseline also writes the merged model and adapter.
The overhead is fixed (actor start-up, worker imports, checkpoint copies), so it shrinks relative to real runs.
Prints one JSON line last: ray_s, plain_s, ratio (ray / plain), and both final losses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from speed_ray.align.config import TrainerConfig  # noqa: E402
from speed_ray.align.data import to_columns  # noqa: E402
from speed_ray.align.train import TrainJob, build_trainer, save_outputs, train_sft  # noqa: E402
from speed_ray.models.offline import resolve_model  # noqa: E402

TOPICS = ["owls", "rivers", "chess", "tea", "volcanoes", "jazz", "bridges", "comets"]


def examples(n: int) -> list[dict]:
    return [{"id": str(i), "prompt": [{"role": "user", "content": f"Task: retrieve documents about {t}. Write JSON."}],
             "completion": [{"role": "assistant", "content": json.dumps({"query": f"about {t}", "positive": t,
                                                                         "hard_negative": "fox"})}]}
            for i, t in enumerate((TOPICS * (n // len(TOPICS) + 1))[:n])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="offline:tiny-llama")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="threads of each Ray Train worker (trainer torch_threads; default: its CPU share, 1)")
    a = ap.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    base = resolve_model(a.model)
    tmp = tempfile.mkdtemp(prefix="speed-ray-bench-align-")
    data = os.path.join(tmp, "sft.parquet")
    pq.write_table(pa.table(to_columns(examples(a.rows))), data)
    cfg = TrainerConfig(base_model=base, lora_dropout=0.0, learning_rate=1e-3, batch_size=8, per_device_batch_size=4,
                        num_workers=a.workers, max_steps=a.steps, save_steps=max(1, a.steps // 2), max_length=256,
                        torch_threads=a.torch_threads)

    import peft  # noqa: F401  (import before timing: the Ray worker's imports are part of its cost, ours not)
    import trl  # noqa: F401

    t0 = time.time()
    plain_cfg = TrainerConfig(**{**cfg.__dict__, "num_workers": 1})
    job = TrainJob("sft", data, plain_cfg, base, f"{tmp}/plain/model", f"{tmp}/plain/adapter", f"{tmp}/plain/ray",
                   f"{tmp}/plain/m.json")
    trainer = build_trainer(job, f"{tmp}/plain/hf", callbacks=[])
    trainer.train()
    save_outputs(trainer, job, f"{tmp}/plain/local", is_main=True)
    plain_s = time.time() - t0
    plain_loss = [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]

    ray.init(num_cpus=max(2, a.workers), include_dashboard=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    t0 = time.time()
    m = train_sft(data, cfg, base_model=base, model_url=f"{tmp}/ray/model", adapter_url=f"{tmp}/ray/adapter",
                  storage_url=f"{tmp}/ray/storage", metrics_url=f"{tmp}/ray/m.json")
    ray_s = time.time() - t0
    ray.shutdown()
    import torch

    print(json.dumps({"benchmark": "align_train", "model": a.model, "steps": a.steps, "workers": a.workers,
                      "ray_torch_threads": m.get("torch_threads"), "plain_torch_threads": torch.get_num_threads(),
                      "load_avg": [round(x, 2) for x in os.getloadavg()],
                      "ray_s": round(ray_s, 2), "plain_s": round(plain_s, 2), "ratio": round(ray_s / plain_s, 3),
                      "ray_last_loss": m["last_loss"], "plain_last_loss": plain_loss}))


if __name__ == "__main__":
    main()
