"""Training examples for the three aligned models, built from stage rows (pure: no Ray, no torch).

SPEED (https://arxiv.org/abs/2410.18634) Sections 3.2.2-3.2.4:
- junior SFT on D_seed: (prompt p, task t) -> sample d, loss on d only (Eq. 1);
- senior DPO on D_DPO: (p, t, d_w, d_l) (Eq. 2);
- revisor SFT on D_revise: (p, t, d_root) -> d_re (Eq. 3).
Examples are TRL's conversational formats: prompt/completion (SFT, loss on the completion only) and
prompt/chosen/rejected (DPO), with the message lists stored as JSON strings so they travel as Parquet.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Callable, Iterable

from speed_ray.errors import DataError

Messages = list[dict]

# Used only when the base tokenizer has no chat template (e.g. a base Llama-3): plain-text turns, and the
# assistant turn ends with the tokenizer's EOS so generation engines stop after the sample. It is saved with
# the trained model's tokenizer, so HF and vLLM render prompts exactly as in training.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '### ' + message['role'] + ':\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\n' }}{% endif %}"
)


def parse_messages(raw: str | list) -> Messages:
    """A chat prompt stored as JSON (or already decoded) -> a list of {role, content} dicts, or ValueError."""
    msgs = json.loads(raw) if isinstance(raw, str) else raw
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("prompt is not a non-empty JSON list of chat messages")
    out = []
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"chat message {str(m)[:80]!r} lacks a string role and content")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _assistant(text: str) -> Messages:
    return [{"role": "assistant", "content": text}]


def _nonempty(v) -> bool:
    return isinstance(v, str) and bool(v.strip())


def seed_sft_example(row: dict) -> dict:
    """D_seed row -> SFT example: the data-synthesis prompt (which holds the task) in, the validated sample out."""
    if not _nonempty(row.get("sample")):
        raise ValueError("empty_sample")
    return {"id": str(row.get("id", "")), "prompt": parse_messages(row["prompt"]), "completion": _assistant(row["sample"])}


def dpo_example(row: dict) -> dict:
    """D_DPO row -> preference example (the judge's best is chosen, its worst rejected)."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if not _nonempty(chosen) or not _nonempty(rejected):
        raise ValueError("empty_pair")
    if chosen == rejected:  # no preference signal, and a zero-margin pair only dilutes the batch
        raise ValueError("identical_pair")
    return {"id": str(row.get("id", "")), "prompt": parse_messages(row["prompt"]),
            "chosen": _assistant(chosen), "rejected": _assistant(rejected)}


def revise_sft_example(row: dict, revisor_messages: Callable[[Messages, str], Messages]) -> dict:
    """D_revise row -> SFT example: (data prompt, task, root sample) in, the teacher's revision out."""
    if not _nonempty(row.get("root_text")):
        raise ValueError("empty_root")
    if not _nonempty(row.get("revised_text")):
        raise ValueError("empty_revision")
    prompt = parse_messages(revisor_messages(parse_messages(row["prompt"]), row["root_text"]))
    return {"id": str(row.get("id", "")), "prompt": prompt, "completion": _assistant(row["revised_text"])}


def build_examples(rows: Iterable[dict], make: Callable[[dict], dict]) -> tuple[list[dict], dict[str, int]]:
    """Apply `make` to every row; rows it rejects (or flagged valid=false upstream) are counted by reason, not
    fatal. Returns (examples, skipped)."""
    examples, skipped = [], Counter()
    for row in rows:
        if row.get("valid") is False:
            skipped["invalid"] += 1
            continue
        try:
            examples.append(make(row))
        except (ValueError, KeyError, TypeError) as e:
            reason = str(e) if str(e) in {"empty_sample", "empty_pair", "identical_pair", "empty_root",
                                          "empty_revision"} else f"malformed: {type(e).__name__}"
            skipped[reason] += 1
    return examples, dict(skipped)


def cap_indices(total: int, n: int, seed: int) -> list[int]:
    """Which of `total` examples a cap of n keeps: a seeded uniform subset, in the original order."""
    return sorted(random.Random(seed).sample(range(total), n))


def cap_examples(examples: list[dict], n: int | None, seed: int) -> list[dict]:
    """At most n examples: a seeded uniform subset in the original order (the data-size grids of Figure 3)."""
    if n is None or len(examples) <= n:
        return examples
    return [examples[i] for i in cap_indices(len(examples), n, seed)]


MESSAGE_COLUMNS = ("prompt", "completion", "chosen", "rejected")


def to_columns(examples: list[dict]) -> dict[str, list]:
    """Examples -> Parquet columns (message lists as JSON strings)."""
    if not examples:
        raise DataError("no training examples")
    keys = list(examples[0])
    return {k: [json.dumps(e[k], ensure_ascii=False) if k in MESSAGE_COLUMNS else e[k] for e in examples]
            for k in keys}


def from_columns(rows: list[dict]) -> list[dict]:
    """Parquet rows -> examples in TRL's conversational format (the inverse of to_columns)."""
    return [{k: (json.loads(v) if k in MESSAGE_COLUMNS else v) for k, v in r.items()} for r in rows]
