"""Loading and running a SentenceTransformer in this process: shared by the evaluator's encoder and the Ray Data
encoder actors (speed_ray.evaluate.distributed), which both import it from here."""

from __future__ import annotations

from typing import Any

import numpy as np


def load_sentence_transformer(path: str, max_length: int, device: str | None = None):
    """A SentenceTransformer whose max_seq_length is capped (never raised) at max_length."""
    from sentence_transformers import SentenceTransformer

    from speed_ray.models.remote import local_model_dir

    model = SentenceTransformer(local_model_dir(path), device=device)
    current = model.max_seq_length or max_length
    model.max_seq_length = min(current, max_length)
    return model


def encode_local(model: Any, texts: list[str], batch_size: int) -> np.ndarray:
    """Batched encoding in this process (SentenceTransformer sorts by length to limit padding)."""
    import torch

    with torch.inference_mode():
        emb = model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(emb, dtype=np.float32)
