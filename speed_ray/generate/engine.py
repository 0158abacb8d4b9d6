"""The generator engines on the row contract of speed_ray.llm.rows: running a batch through one, and the stub."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from functools import lru_cache
from typing import Any, Protocol

import pyarrow as pa

from speed_ray.llm.rows import (LLMRequest, LLMResult, error_result, merge_results, requests_from_batch,
                                with_results)

log = logging.getLogger("speed_ray.generate")

FINISH_REASONS = ("stop", "length", "error")


class Engine(Protocol):
    def generate(self, requests: list[LLMRequest]) -> list[LLMResult]: ...


class EngineFatalError(RuntimeError):
    """An engine that cannot go on (its device is lost, its weights are gone) raises this: the stage fails and keeps
    its shards for a rerun to resume, instead of marking batch after batch of rows as errors."""


def generate_table(engine: Engine, batch: pa.Table, engine_name: str, id_col: str = "id") -> pa.Table:
    """Run one batch of request rows (speed_ray.llm.rows) through an engine; returns it with the result columns
    and `engine`. Never raises for bad rows (bad_request errors); an engine's EngineFatalError fails the stage, any
    other exception marks its batch's rows with that error."""
    parsed = requests_from_batch(batch, id_col)
    good = [r for r in parsed if isinstance(r, LLMRequest)]
    answers: list[LLMResult] = []
    if good:
        try:
            answers = engine.generate(good)
        except EngineFatalError:
            raise
        except Exception as e:  # the engine itself failed on this batch: mark rows, keep going
            log.exception("engine %s failed on a batch of %d", engine_name, len(good))
            answers = [error_result(f"{type(e).__name__}: {e}") for _ in good]
    return with_results(batch, merge_results(parsed, answers), engine=pa.array([engine_name] * batch.num_rows))


def generate_batch(engine: Engine, batch: dict[str, Any], engine_name: str) -> dict[str, list]:
    """`generate_table` over a dict of columns."""
    return generate_table(engine, pa.Table.from_pydict(batch), engine_name).to_pydict()


def batch_seed(requests: list[LLMRequest]) -> int | None:
    """One seed for a batch of seeded requests: reproducible for the same batch, different across batches."""
    seeds = [r.seed for r in requests if r.seed is not None]
    if not seeds:
        return None
    return int.from_bytes(hashlib.sha256(",".join(map(str, seeds)).encode()).digest()[:4], "little")


class StubEngine:
    """A deterministic, model-free engine for tests and benchmarks: echoes a valid JSON object per schema.

    Texts depend only on the request (messages + seed), so reruns reproduce them. The model string may carry
    options: "stub:delay=0.2" sleeps per batch (to kill a stage mid-way). "stub:corpus=1" writes corpus-like texts
    instead of short echoes: a 6-12 word first field, a 51-99 word second one, 24-48 words for the others, runs of
    4096 phrases of pseudo-words, so distinct requests give unrelated texts that MinHash keeps apart.
    "stub:dup=0.2,rows=1150000" (implies corpus) plants near duplicates: the documents come from a pool sized so
    that about 20% of 1.15M rows are copies of another (exact, or with one word added), which is what dedup should
    remove. A corpus text carries its document's key ("stubdoc<k>"), and a request that quotes one (the revision
    of a stub sample) rewrites that document, so revision keeps the planted duplicates. Any flat object schema of
    strings (every task type's sample schema) gets corpus texts; other schemas get the echo.
    """

    name = "stub"

    def __init__(self, model: str | None = None, **_: Any):
        self.model = model or "stub"
        self.options = stub_options(self.model)
        dup = float(self.options.get("dup", 0))
        self.corpus = dup > 0 or self.options.get("corpus", "0") not in ("0", "", "false")
        if dup > 0 and "rows" not in self.options:
            raise ValueError("stub option dup=F needs rows=N (the number of rows the pool is sized for)")
        self.pool = _dup_pool(dup, int(self.options["rows"])) if dup > 0 else 0
        self._templates: dict[int, tuple[dict, Any]] = {}

    def generate(self, requests: list[LLMRequest]) -> list[LLMResult]:
        if "delay" in self.options:
            import time

            time.sleep(float(self.options["delay"]))
        out: list[LLMResult | None] = [None] * len(requests)
        todo, hashes, contents = [], [], []
        for i, r in enumerate(requests):
            content = " ".join([str(m.get("content", "")) for m in r.messages])
            todo.append(i)
            hashes.append(hashlib.sha256(f"{content}|{r.seed}".encode()).hexdigest())
            contents.append(content)
        texts = (self._corpus_texts([requests[i] for i in todo], hashes, contents) if self.corpus
                 else [self._echo(requests[i].json_schema, h[:12]) for i, h in zip(todo, hashes)])
        for i, content, text in zip(todo, contents, texts):
            r = requests[i]
            n = text.count(" ") + 1   # the texts are single-spaced: their word count
            finish = "stop"
            if n > r.max_tokens:
                text, n, finish = " ".join(text.split()[:r.max_tokens]), r.max_tokens, "length"
            out[i] = LLMResult(text=text, prompt_tokens=content.count(" ") + 1, completion_tokens=n,
                               finish_reason=finish)
        return out  # type: ignore[return-value]

    def _template(self, schema: dict | None):
        """Per schema (cached by identity: requests_from_batch shares parsed schemas): the echo as a format
        string with the request hash as a placeholder, and the string keys a corpus text fills (None: the
        schema is not a flat object of strings)."""
        key = id(schema)
        hit = self._templates.get(key)
        if hit is not None and hit[0] is schema:
            return hit[1]
        if len(self._templates) > 512:  # requests built one by one each carry their own schema object
            self._templates.clear()
        if schema:
            echo = json.dumps(_stub_object(schema, _HASH_MARK)).replace("%", "%%").replace(_HASH_MARK, "%(h)s")
            props = schema.get("properties") or {}
            flat = (schema.get("type") in ("object", None) and props
                    and all(v.get("type") == "string" and "enum" not in v for v in props.values()))
            keys = tuple(props) if flat else None
        else:
            echo = '{"query": "q %(h)s", "positive": "p %(h)s", "hard_negative": "n %(h)s"}'
            keys = ("query", "positive", "hard_negative")
        self._templates[key] = (schema, (echo, keys))
        return echo, keys

    def _echo(self, schema: dict | None, h: str) -> str:
        return self._template(schema)[0] % {"h": h}

    def _corpus_texts(self, requests: list[LLMRequest], hashes: list[str], contents: list[str]) -> list[str]:
        """Corpus-like JSON samples, vectorized over the batch: each field is a run of 3-word phrases drawn by a
        64-bit mix of the document key and the position (4096 phrases of pseudo-words)."""
        import numpy as np

        n = len(requests)
        if n == 0:
            return []
        h64 = np.array([int(h[:16], 16) for h in hashes], dtype=np.uint64)
        keys = np.empty(n, dtype=np.uint64)
        for j, (hv, content) in enumerate(zip(h64.tolist(), contents)):
            at = content.find("stubdoc")   # the regex from there: a revision prompt is kilobytes long
            m = _DOC_MARK.search(content, at) if at >= 0 else None
            keys[j] = int(m.group(1)) if m else (hv % self.pool if self.pool else hv >> 1)
        phrases = _phrases()
        nv = np.uint64(len(phrases))
        fields = []
        for f, (lo, span) in enumerate(_FIELD_PHRASES):
            lens = lo + (_mix64(keys ^ np.uint64(0xA5A5 + f)) % np.uint64(span)).astype(np.int64)
            pos = np.arange(lo + span, dtype=np.uint64)
            idx = _mix64(keys[:, None] * np.uint64(_GOLD) ^ (pos[None, :] + np.uint64(1 + 1000 * f)) * np.uint64(_M1))
            fields.append((lens, phrases[(idx % nv).astype(np.int64)].tolist()))
        # near copies differ: every other row adds one word to its long field (seeded by the request), so two
        # copies of a document are exact duplicates or near ones (Jaccard ~0.95) in its first two fields
        extra = np.where((h64 >> np.uint64(3)) % np.uint64(2) == np.uint64(1),
                         phrases[((h64 >> np.uint64(24)) % nv).astype(np.int64)], None).tolist()
        (l0, w0), (l1, w1), (l2, w2) = [(lens.tolist(), words) for lens, words in fields]
        keys_l = keys.tolist()
        out = []
        for j, r in enumerate(requests):
            echo, names = self._template(r.json_schema)
            if names is None:
                out.append(echo % {"h": hashes[j][:12]})
                continue
            tail = f"{extra[j].split(' ', 1)[0]} stubdoc{keys_l[j]}" if extra[j] else f"stubdoc{keys_l[j]}"
            texts = [" ".join(w0[j][:l0[j]]), " ".join(w1[j][:l1[j]]) + " " + tail]
            if len(names) > 2:
                third = " ".join(w2[j][:l2[j]])
                texts += [third] * (len(names) - 2)
            out.append("{" + ", ".join([f'"{k}": "{t}"' for k, t in zip(names, texts)]) + "}")
        return out


_HASH_MARK = "STUBHASHMARK"
_DOC_MARK = re.compile(r"\bstubdoc(\d+)\b")
# (min phrases, spread) of a corpus text's fields by position: a query-like one (6-12 words), a long document
# (51-99 words), a medium one (24-48 words); later fields are medium too
_FIELD_PHRASES = ((2, 3), (17, 17), (8, 9))
_GOLD = 0x9E3779B97F4A7C15
_M1 = 0xFF51AFD7ED558CCD
_M2 = 0xC4CEB9FE1A85EC53


def _mix64(h):
    import numpy as np

    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(_M1)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(_M2)
    return h ^ (h >> np.uint64(33))


@lru_cache(maxsize=1)
def _phrases():
    """4096 phrases of 3 pronounceable pseudo-words (2-4 syllables each), the same in every process."""
    import random

    import numpy as np

    syllables = [c + v for c in "bcdfghjklmnprstvz" for v in "aeiou"]
    rng = random.Random(20241023)
    words: set[str] = set()
    while len(words) < 8192:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))))
    vocab = sorted(words)
    return np.array([" ".join(rng.choice(vocab) for _ in range(3)) for _ in range(4096)], dtype=object)


def _dup_pool(dup: float, rows: int) -> int:
    """Pool size P such that `rows` uniform draws from P documents leave a `dup` share of repeats:
    1 - P (1 - e^(-rows/P)) / rows = dup, solved for x = rows / P by bisection."""
    import math

    if not 0 < dup < 1:
        raise ValueError(f"stub option dup must be in (0, 1), got {dup}")
    lo, hi = 1e-9, 50.0
    for _ in range(100):
        x = (lo + hi) / 2
        if 1 - (1 - math.exp(-x)) / x < dup:
            lo = x
        else:
            hi = x
    return max(1, round(rows / x))


def stub_options(model: str) -> dict[str, str]:
    """'stub:delay=0.2,corpus=1' -> {'delay': '0.2', 'corpus': '1'}."""
    _, _, opts = model.partition(":")
    return dict(kv.split("=", 1) for kv in opts.split(",") if "=" in kv)


def _stub_object(schema: dict, h: str) -> Any:
    """A minimal instance of a JSON schema (objects, strings, enums, numbers, arrays)."""
    if "enum" in schema:
        return schema["enum"][0]
    t = schema.get("type")
    if t == "object" or "properties" in schema:
        props = schema.get("properties", {})
        return {k: _stub_object(v, f"{h} {k}") for k, v in props.items()}
    if t == "array":
        return [_stub_object(schema.get("items", {"type": "string"}), h)]
    if t in ("integer", "number"):
        return schema.get("minimum", 1)
    if t == "boolean":
        return True
    return f"{h} text"
