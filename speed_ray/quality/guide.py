"""The guide model that scores samples: a sentence-transformers bi-encoder (cosine of embeddings) or a
cross-encoder (its score of the pair). Loaded once per Ray actor."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from speed_ray.quality.scores import cosine_matrix


class Guide:
    def __init__(self, model_path: str, kind: str = "bi_encoder", max_length: int = 256, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.kind = kind
        device = "cuda" if torch.cuda.is_available() else "cpu"   # a GPU when the actor was given one
        if kind == "cross_encoder":
            from sentence_transformers import CrossEncoder

            self.model = CrossEncoder(model_path, max_length=max_length, device=device)
        elif kind == "bi_encoder":
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(model_path, device=device)
            self.model.max_seq_length = min(max_length, self.model.max_seq_length or max_length)
        else:
            raise ValueError(f"unknown guide kind {kind!r}: use bi_encoder or cross_encoder")
        # trained with instructions: its sentence-transformers config defines a non-empty prompt (E5-mistral's
        # "web_search_query", Qwen3-Embedding's "query"); all-MiniLM-L6-v2, a raw base model and a cross-encoder do not
        prompts = getattr(self.model, "prompts", None) or {}
        self.instruction_tuned = kind == "bi_encoder" and any(str(v).strip() for v in prompts.values())

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm embeddings (bi-encoder only); each distinct text is encoded once."""
        if self.kind != "bi_encoder":
            raise ValueError("a cross-encoder guide gives pair scores, not embeddings")
        uniq = list(dict.fromkeys(texts))
        if not uniq:
            return np.zeros((0, 1), np.float32)
        emb = self.model.encode(uniq, batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                                show_progress_bar=False)
        where = {t: i for i, t in enumerate(uniq)}
        return emb[[where[t] for t in texts]]

    def pair_scores(self, queries: Sequence[str], docs: Sequence[str]) -> np.ndarray:
        """The guide's score of each (query, doc) pair: cosine (bi-encoder) or the cross-encoder's output."""
        if not len(queries):
            return np.zeros(0)
        if self.kind == "cross_encoder":
            return np.asarray(self.model.predict(list(zip(queries, docs)), batch_size=64, show_progress_bar=False),
                              np.float64).reshape(len(queries))
        q, d = self.embed(queries), self.embed(docs)
        return (q.astype(np.float64) * d).sum(axis=1)

    def score_matrix(self, queries: Sequence[str], docs: Sequence[str]) -> np.ndarray:
        """(len(queries), len(docs)) scores of every query with every doc (bi-encoder only)."""
        return cosine_matrix(self.embed(queries), self.embed(docs))
