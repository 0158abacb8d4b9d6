"""Rows of the `samples` schema (docs/DESIGN.md), stable ids and growing lineage."""

from __future__ import annotations

import hashlib
import json
from typing import Any

SAMPLE_COLUMNS = ("id", "task_type", "task", "prompt", "prompt_params", "text", "sample", "query", "positive",
                  "negative", "valid", "reject_reason", "generator", "lineage")


def stable_id(*parts: Any) -> str:
    """A 20-hex-digit id from the parts (JSON-encoded, so ("a", 1) and ("a", "1") differ)."""
    blob = json.dumps(parts, ensure_ascii=False, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _as_json(v: Any) -> str:
    if v is None:
        return ""
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def lineage_extend(lineage_json: str | dict | None, **fields: Any) -> str:
    """The lineage with `fields` added. Lineage only grows: a field already present keeps its value unless the
    new value differs, in which case the new value wins and the old one is kept under `<field>@prev`."""
    lin = dict(lineage_json) if isinstance(lineage_json, dict) else (json.loads(lineage_json) if lineage_json else {})
    for k, v in fields.items():
        if isinstance(v, str) and k in ("prompt_params",):
            try:
                v = json.loads(v)
            except ValueError:
                pass
        if k in lin and lin[k] != v:
            lin[f"{k}@prev"] = lin[k]
        lin[k] = v
    return json.dumps(lin, ensure_ascii=False, sort_keys=True)


def sample_row(base: dict, text: str | None, task_type: str, generator: str, min_chars: int = 1,
               max_chars: int = 20000) -> dict:
    """A `samples` row from a base row (id, task_type, task, prompt, prompt_params, lineage) and a raw output."""
    from speed_ray.synth.parsing import canonical_json, parse_sample

    p = parse_sample(text, task_type, min_chars, max_chars)
    return {
        "id": base["id"], "task_type": task_type, "task": base.get("task") or "",
        "prompt": _as_json(base.get("prompt")), "prompt_params": _as_json(base.get("prompt_params")),
        "text": text or "", "sample": canonical_json(p.sample) if p.ok else "",
        "query": p.query, "positive": p.positive, "negative": p.negative, "valid": p.ok,
        "reject_reason": p.reason, "generator": generator,
        "lineage": lineage_extend(base.get("lineage"), generator=generator),
    }


def with_lineage(lineage: str | None, key: str, value) -> str:
    """A sample's lineage JSON with `key` set to `value` (a lineage that is not a JSON object is kept under a key)."""
    import json

    try:
        d = json.loads(lineage) if lineage else {}
    except json.JSONDecodeError:
        d = {"unparsed_lineage": lineage}
    if not isinstance(d, dict):
        d = {"lineage": d}
    d[key] = value
    return json.dumps(d, ensure_ascii=False)
