"""JSON schemas of samples and teacher answers, for validation and constrained decoding (vLLM guided JSON,
xgrammar, OpenAI response_format). Keys follow E5-mistral's data structures (SPEED App. D)."""

from __future__ import annotations

# Keys of a sample per task type, in the order the prompts list them (the order a generator learns to write).
SAMPLE_KEYS: dict[str, tuple[str, ...]] = {
    "retrieval": ("user_query", "positive_document", "hard_negative_document"),
    "classification": ("input_text", "label", "misleading_label"),
    "matching_short": ("input", "positive_document"),
    "matching_long": ("input", "positive_document"),
    "sts": ("S1", "S2", "S3"),
    "bitext": ("S1", "S2", "S3"),
}


def sample_keys(task_type: str) -> tuple[str, ...]:
    try:
        return SAMPLE_KEYS[task_type]
    except KeyError:
        raise ValueError(f"unknown task type {task_type!r}; known: {sorted(SAMPLE_KEYS)}") from None


def _object(props: dict[str, dict]) -> dict:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def sample_schema(task_type: str, min_length: int = 1) -> dict:
    """A valid sample of `task_type`: exactly its keys, each a string (non-empty unless min_length=0).
    OpenAI's non-strict json_schema mode ignores minLength; xgrammar and vLLM enforce it."""
    s = {"type": "string", **({"minLength": min_length} if min_length else {})}
    return _object({k: dict(s) for k in sample_keys(task_type)})


JUDGE_SCHEMA = _object({"reason": {"type": "string"}, "best": {"type": "integer"}, "worst": {"type": "integer"}})

# A bounded reason keeps a small constrained teacher from looping inside the string until max_tokens.
REASON_MAX_CHARS = 400


def judge_schema(n_outputs: int) -> dict:
    """The judge answer for a list of n outputs (App. C.2 key order): indices in 0..n-1, best != worst (a DPO
    pair needs two different outputs), reason bounded. JSON Schema cannot tie one property to another, so the
    distinctness is an anyOf with one branch per `best` whose `worst` excludes it: n branches of one object."""
    reason = {"type": "string", "maxLength": REASON_MAX_CHARS}
    n = max(n_outputs, 1)
    if n < 2:
        return _object({"reason": reason, "best": {"type": "integer", "enum": [0]},
                        "worst": {"type": "integer", "enum": [0]}})
    return {"type": "object", "anyOf": [
        _object({"reason": dict(reason), "best": {"type": "integer", "enum": [b]},
                 "worst": {"type": "integer", "enum": [w for w in range(n) if w != b]}}) for b in range(n)]}

# The paper asks for "revision" as a string; an object is accepted too (and is what constrained decoding writes).
REVISE_SCHEMA = _object({"reason": {"type": "string"}, "revision": {"anyOf": [{"type": "string"}, {"type": "object"}]}})


def revise_schema(task_type: str) -> dict:
    """The teacher's revise answer with the revision constrained to a valid sample object."""
    return _object({"reason": {"type": "string", "maxLength": REASON_MAX_CHARS}, "revision": sample_schema(task_type)})


# The E5 brainstorm prompt asks for a bare list; OpenAI's response_format needs an object at the root, so the
# constrained form wraps it. parse_task_list accepts both.
BRAINSTORM_LIST_SCHEMA = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}
BRAINSTORM_SCHEMA = _object({"tasks": BRAINSTORM_LIST_SCHEMA})


def response_format(json_mode: str, name: str, schema: dict | None) -> dict | None:
    """The OpenAI `response_format` for a request, or None to send none."""
    if json_mode == "none" or schema is None:
        return None
    if json_mode == "json_object":
        return {"type": "json_object"} if schema.get("type") == "object" else None
    if json_mode == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
    raise ValueError(f"unknown json_mode {json_mode!r}; choose none, json_object or json_schema")
