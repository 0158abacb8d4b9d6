"""An mteb encoder over a SentenceTransformer: E5-mistral query instructions, an embedding cache, batched
local encoding, and Ray Data encoding for large inputs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from speed_ray.evaluate.cache import EmbeddingCache, text_key
from speed_ray.evaluate.instructions import E5_TEMPLATE, query_prefix, task_instruction
from speed_ray.evaluate.st_model import encode_local, load_sentence_transformer

log = logging.getLogger("speed_ray.evaluate")


def model_key(path: str, max_length: int) -> str:
    """Identity of a model for the cache: its path, its JSON configs' contents and its weight files' sizes.

    Not mtimes: offline model helpers may rewrite identical files, which must not invalidate the cache. A remote
    model (s3://...) is read in place through fsspec: its identity needs no download."""
    import hashlib

    from speed_ray.models.remote import is_remote

    h = hashlib.sha256()
    if is_remote(path):
        import fsspec

        fs, root = fsspec.core.url_to_fs(path)
        root = root.rstrip("/")
        files = fs.find(root, detail=True) if fs.exists(root) else {}
        for name, info in sorted(files.items()):
            rel = name[len(root) + 1:]
            if rel.endswith(".json"):
                h.update(rel.encode() + fs.cat_file(name))
            elif rel.endswith((".safetensors", ".bin", ".pt")):
                h.update(f"{rel}:{int(info.get('size') or 0)}".encode())
        return "|".join([path.rstrip("/"), str(max_length), h.hexdigest()])
    p = Path(path)
    if p.is_dir():
        for f in sorted(p.rglob("*")):
            if f.is_file() and f.suffix == ".json":
                h.update(f"{f.relative_to(p)}".encode() + f.read_bytes())
            elif f.is_file() and f.suffix in (".safetensors", ".bin", ".pt"):
                h.update(f"{f.relative_to(p)}:{f.stat().st_size}".encode())
    return "|".join([str(p.resolve()) if p.exists() else path, str(max_length), h.hexdigest()])


def stored_prompts(path: str) -> dict[str, str]:
    """The prompts a SentenceTransformer directory stores (config_sentence_transformers.json), read without
    loading its weights: a local dir, a remote URL, or a hub id (its one small file)."""
    import json

    from speed_ray.models.remote import is_remote

    try:
        if is_remote(path) or Path(path).is_dir():
            import fsspec

            with fsspec.open(f"{path.rstrip('/')}/config_sentence_transformers.json", "r") as f:
                conf = json.load(f)
        else:
            from huggingface_hub import hf_hub_download

            with open(hf_hub_download(path, "config_sentence_transformers.json")) as f:
                conf = json.load(f)
    except Exception:  # no such file: a plain transformers model has no stored prompts
        return {}
    return {str(k): str(v) for k, v in (conf.get("prompts") or {}).items()}


def instruction_for(task_metadata: Any) -> str:
    """A local task's own `instruction`, else E5-mistral's table, else the task's mteb prompt."""
    ds = getattr(task_metadata, "dataset", None) or {}
    prompt = task_metadata.prompt
    if str(ds.get("path", "")).startswith("local/") and isinstance(prompt, str) and prompt:
        return prompt
    return task_instruction(task_metadata.name, task_metadata.type, prompt)


class Embedder:
    """mteb's EncoderProtocol. Queries (and both sides of symmetric tasks, as E5-mistral does) get the task's
    instruction; documents (prompt_type == document) never do."""

    def __init__(self, model: str, *, label: str | None = None, batch_size: int = 64, max_length: int = 512,
                 instructions: bool = True, cache_dir: str | None = None, distributed: bool = False,
                 distributed_min_texts: int = 10000, num_workers: int = 1, use_gpu: bool = False,
                 device: str | None = None):
        from speed_ray.models.offline import resolve_model

        self.path = resolve_model(model)
        self.label = label or model
        self.batch_size = batch_size
        self.instructions = instructions
        self.distributed = distributed
        self.distributed_min_texts = distributed_min_texts
        self.num_workers = num_workers
        self.use_gpu = use_gpu
        self.device = device
        self._model = None
        self._max_length = max_length
        self.encoded_texts = 0                    # texts actually run through the model (not from the cache)
        self.cache = EmbeddingCache(cache_dir, model_key(self.path, max_length)) if cache_dir else None
        self._meta = None
        self._prompts: dict[str, str] | None = None

    # ---- the model ---------------------------------------------------------------------------------
    @property
    def model(self):
        if self._model is None:
            self._model = load_sentence_transformer(self.path, self._max_length, self.device)
        return self._model

    @property
    def prompts(self) -> dict[str, str]:
        """The model's stored prompts; read from its files unless the model is already loaded here, so an
        evaluation whose encoding runs on Ray actors never loads the weights in this process."""
        if self._model is not None:
            return dict(getattr(self._model, "prompts", None) or {})
        if self._prompts is None:
            self._prompts = stored_prompts(self.path)
        return self._prompts

    @property
    def template(self) -> str:
        """The instruction template: the model's stored query prompt when it has '{instruction}', else E5's."""
        q = self.prompts.get("query") or ""
        return q if "{instruction}" in q else E5_TEMPLATE

    def prefix(self, task_metadata: Any, prompt_type: Any) -> str:
        kind = getattr(prompt_type, "value", prompt_type)
        if kind == "document":
            return ""
        if self.instructions:
            return query_prefix(instruction_for(task_metadata), self.template)
        stored = self.prompts.get("query") or ""
        # Without task instructions a model's fixed query prompt still applies to retrieval queries.
        return stored if kind == "query" and "{instruction}" not in stored else ""

    @property
    def mteb_model_meta(self):
        if self._meta is None:
            from mteb.models.model_meta import ModelMeta, ScoringFunction

            self._meta = ModelMeta.create_empty(overwrites={
                "name": "speed-ray/" + Path(str(self.label)).name.replace("/", "_"), "revision": "local",
                "similarity_fn_name": ScoringFunction.COSINE, "use_instructions": self.instructions})
        return self._meta

    # ---- encoding ----------------------------------------------------------------------------------
    def encode(self, inputs: Any, *, task_metadata: Any, hf_split: str = "", hf_subset: str = "",
               prompt_type: Any = None, **kwargs: Any) -> np.ndarray:
        texts = [t for batch in inputs for t in batch["text"]]
        return self.encode_texts(texts, self.prefix(task_metadata, prompt_type))

    def encode_texts(self, texts: list[str], prefix: str = "") -> np.ndarray:
        """Embeddings of prefix + text for each text, from the cache where possible."""
        if not texts:
            return np.zeros((0, self.model.get_sentence_embedding_dimension()), dtype=np.float32)
        keys = [text_key(self.cache.model_key, prefix, t) for t in texts] if self.cache is not None else []
        found = self.cache.get(keys) if self.cache is not None else {}
        missing = [i for i in range(len(texts)) if i not in found]
        new: dict[int, np.ndarray] = {}
        if missing:
            # Unique texts only: benchmarks repeat sentences (STS pairs, SICK) and their cache keys agree.
            uniq = list(dict.fromkeys(texts[i] for i in missing))
            emb = self._run([prefix + t for t in uniq])
            self.encoded_texts += len(uniq)
            pos = {t: j for j, t in enumerate(uniq)}
            new = {i: emb[pos[texts[i]]] for i in missing}
            if self.cache is not None:
                self.cache.put([text_key(self.cache.model_key, prefix, t) for t in uniq], emb)
        rows = [found[i] if i in found else new[i] for i in range(len(texts))]
        return np.stack(rows).astype(np.float32)

    def _run(self, texts: list[str]) -> np.ndarray:
        if self.distributed and len(texts) >= self.distributed_min_texts:
            from speed_ray.evaluate.distributed import encode_on_ray

            log.info("encoding %d texts on Ray Data (%d workers)", len(texts), self.num_workers)
            return encode_on_ray(texts, self.path, batch_size=self.batch_size, max_length=self._max_length,
                                 num_workers=self.num_workers, use_gpu=self.use_gpu)
        return encode_local(self.model, texts, self.batch_size)

    # ---- similarity (cosine, like the published MTEB numbers) --------------------------------------
    def similarity(self, a: Any, b: Any):
        import torch

        a, b = _unit(torch.as_tensor(np.asarray(a))), _unit(torch.as_tensor(np.asarray(b)))
        return a @ b.T

    def similarity_pairwise(self, a: Any, b: Any):
        import torch

        a, b = _unit(torch.as_tensor(np.asarray(a))), _unit(torch.as_tensor(np.asarray(b)))
        return (a * b).sum(-1)


def _unit(x):
    import torch

    x = x.float()
    if x.dim() == 1:
        x = x[None]
    return torch.nn.functional.normalize(x, dim=-1)
