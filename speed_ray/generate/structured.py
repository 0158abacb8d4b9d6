"""JSON-schema-constrained decoding for transformers' generate via xgrammar, one grammar per batch row."""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger("speed_ray.generate")


class SchemaCompiler:
    """Compiles JSON schemas to xgrammar grammars for one tokenizer, caching by schema."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int] | None = None):
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._cache: dict[str, Any] = {}

    def compile(self, schema: dict):
        key = json.dumps(schema)  # property order steers generation: keep it
        if key not in self._cache:
            # any_whitespace=False: a small model otherwise pads JSON with runs of spaces and newlines
            self._cache[key] = self._compiler.compile_json_schema(key, any_whitespace=False, strict_mode=True)
        return self._cache[key]


class RowGrammarLogitsProcessor:
    """A transformers logits processor constraining each batch row to its own grammar (None: free text).

    Unlike xgrammar.contrib.hf.LogitsProcessor it allows unconstrained rows in the same batch and never
    asserts: a row whose sampled token the grammar rejects is released (logged) instead of crashing the
    batch. Use one instance per generate() call.
    """

    def __init__(self, grammars: list, vocab_size: int):
        import xgrammar as xgr

        self._xgr = xgr
        self.matchers = [xgr.GrammarMatcher(g) if g is not None else None for g in grammars]
        self.bitmask = xgr.allocate_token_bitmask(len(grammars), vocab_size)
        self.vocab_size = vocab_size
        self._started = False
        self.released: list[int] = []

    def __call__(self, input_ids, scores):
        if input_ids.shape[0] != len(self.matchers):
            raise RuntimeError(f"batch of {input_ids.shape[0]} rows but {len(self.matchers)} grammars")
        if self._started:
            last = input_ids[:, -1].tolist()
            for i, m in enumerate(self.matchers):
                if m is not None and not m.is_terminated() and not m.accept_token(last[i]):
                    log.warning("row %d: grammar rejected token %d; leaving the row unconstrained", i, last[i])
                    self.matchers[i] = None
                    self.released.append(i)
        self._started = True
        rows = [i for i, m in enumerate(self.matchers) if m is not None and not m.is_terminated()]
        if not rows:
            return scores
        for i in rows:
            self.matchers[i].fill_next_token_bitmask(self.bitmask, i)
        device = scores.device
        cpu_scores = scores if device.type in ("cpu", "cuda") else scores.to("cpu")
        self._xgr.apply_token_bitmask_inplace(cpu_scores, self.bitmask.to(cpu_scores.device),
                                              vocab_size=min(self.vocab_size, scores.shape[-1]), indices=rows)
        return cpu_scores if cpu_scores is scores else cpu_scores.to(device)
