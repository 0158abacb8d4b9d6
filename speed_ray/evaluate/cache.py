"""Embedding cache keyed by sha256(model, instruction, text), stored as append-only .npz shards in a directory.

Each `put` writes one new shard atomically (tmp + rename), so an interrupted evaluation keeps everything it
finished and a rerun encodes only what is missing; concurrent writers never touch the same file.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import numpy as np


def text_key(model_key: str, instruction: str, text: str) -> str:
    h = hashlib.sha256()
    for part in (model_key, instruction, text):
        b = part.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))   # length-prefixed: no ambiguity between parts
        h.update(b)
    return h.hexdigest()


class EmbeddingCache:
    """Directory of shards `<model hash>/shard-*.npz` (keys: fixed-width sha256 hex, emb: float32 matrix)."""

    def __init__(self, root: str | Path, model_key: str):
        self.model_key = model_key
        self.dir = Path(root).expanduser() / hashlib.sha256(model_key.encode()).hexdigest()[:16]
        self._index: dict[str, tuple[int, int]] | None = None
        self._shards: list[np.ndarray] = []

    def _load(self) -> dict[str, tuple[int, int]]:
        if self._index is None:
            self._index, self._shards = {}, []
            if self.dir.exists():
                for path in sorted(self.dir.glob("shard-*.npz")):
                    try:
                        with np.load(path) as z:
                            keys, emb = z["keys"], z["emb"]
                    except Exception:   # a foreign or damaged file is skipped, never fatal
                        continue
                    s = len(self._shards)
                    self._shards.append(emb)
                    for i, k in enumerate(keys.tolist()):
                        self._index[k] = (s, i)
        return self._index

    def __len__(self) -> int:
        return len(self._load())

    def __bool__(self) -> bool:   # an empty cache is still a cache (`if cache:` must not skip writing to it)
        return True

    def get(self, keys: list[str]) -> dict[int, np.ndarray]:
        """Position in `keys` -> embedding, for the keys that are cached."""
        index = self._load()
        out = {}
        for pos, k in enumerate(keys):
            hit = index.get(k)
            if hit is not None:
                out[pos] = self._shards[hit[0]][hit[1]]
        return out

    def put(self, keys: list[str], emb: np.ndarray) -> None:
        if not keys:
            return
        emb = np.asarray(emb, dtype=np.float32)
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"shard-{uuid.uuid4().hex}.npz"
        tmp = self.dir / f".tmp-{name}"
        with open(tmp, "wb") as f:
            np.savez(f, keys=np.array(keys, dtype="U64"), emb=emb)
        os.replace(tmp, self.dir / name)
        index = self._load()
        s = len(self._shards)
        self._shards.append(emb)
        for i, k in enumerate(keys):
            index[k] = (s, i)
