"""Encoding large inputs on Ray Data: map_batches over a pool of encoder actors, one model per actor (GPU)."""

from __future__ import annotations

import numpy as np


class EncoderActor:
    """Ray Data UDF: loads the SentenceTransformer once, encodes {"idx", "text"} batches."""

    def __init__(self, path: str, max_length: int, batch_size: int):
        import torch

        from speed_ray.evaluate.st_model import load_sentence_transformer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_sentence_transformer(path, max_length, device)
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        from speed_ray.evaluate.st_model import encode_local

        emb = encode_local(self.model, [str(t) for t in batch["text"]], self.batch_size)
        return {"idx": np.asarray(batch["idx"]), "embedding": list(emb)}


def encode_on_ray(texts: list[str], path: str, *, batch_size: int, max_length: int, num_workers: int,
                  use_gpu: bool) -> np.ndarray:
    """Embeddings in input order, computed by `num_workers` actors across the cluster."""
    import ray

    ds = ray.data.from_items([{"idx": i, "text": t} for i, t in enumerate(texts)])
    # Larger blocks than the encode batch keep each actor busy; the actor re-batches internally.
    out = ds.map_batches(EncoderActor, fn_constructor_kwargs={"path": path, "max_length": max_length,
                                                              "batch_size": batch_size},
                         batch_size=max(batch_size * 4, 256),
                         compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, num_workers)),
                         num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1)
    result = np.zeros((len(texts), 0), dtype=np.float32)
    rows = out.take_all()
    if rows:
        dim = len(rows[0]["embedding"])
        result = np.zeros((len(texts), dim), dtype=np.float32)
        for r in rows:
            result[int(r["idx"])] = np.asarray(r["embedding"], dtype=np.float32)
    return result
