"""Response cache for LLM endpoint calls: one JSON file per request hash in an fsspec directory (local or s3://)."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import TYPE_CHECKING

import fsspec

if TYPE_CHECKING:
    from speed_ray.llm.rows import LLMRequest

# Bump when the cached value's meaning changes, so old entries are not read as new ones.
CACHE_VERSION = 1


class ResponseCache:
    """`<url>/<key[:2]>/<key>.json`. Only successful responses go in; writes are atomic (tmp + rename), so a
    killed worker leaves no half-written entry and concurrent writers of one key just race to the same bytes."""

    def __init__(self, url: str):
        self.url = str(url).rstrip("/")
        self._fs, self._root = fsspec.core.url_to_fs(self.url)

    def __repr__(self) -> str:
        return f"ResponseCache({self.url!r})"

    def __getstate__(self):  # fsspec filesystems need not pickle; rebuild on the worker
        return {"url": self.url}

    def __setstate__(self, state):
        self.__init__(state["url"])

    @staticmethod
    def key_for(model: str, req: "LLMRequest") -> str:
        """sha256 of everything that determines the answer: never the request_id, base_url or API key."""
        blob = {"v": CACHE_VERSION, "model": model, "messages": req.messages, "temperature": req.temperature,
                "top_p": req.top_p, "max_tokens": req.max_tokens, "response_format": req.response_format,
                "seed": req.seed}
        return hashlib.sha256(json.dumps(blob, sort_keys=True, ensure_ascii=False,
                                         separators=(",", ":")).encode()).hexdigest()

    def _path(self, key: str) -> str:
        if len(key) < 8 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"cache key must be a hex digest, got {key!r}")
        return f"{self._root}/{key[:2]}/{key}.json"

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        try:
            with self._fs.open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # a corrupt entry (written by something else) is a miss; the next put replaces it

    def put(self, key: str, value: dict) -> None:
        path = self._path(key)
        parent = os.path.dirname(path)
        self._fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{os.path.basename(path)}"
        with self._fs.open(tmp, "wb") as f:
            f.write(json.dumps(value, ensure_ascii=False, sort_keys=True).encode())
        self._fs.mv(tmp, path)

    def __len__(self) -> int:
        if not self._fs.exists(self._root):
            return 0
        return sum(1 for p in self._fs.find(self._root) if p.endswith(".json") and "/.tmp-" not in p)
