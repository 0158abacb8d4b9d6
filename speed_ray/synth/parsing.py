"""Strict-but-tolerant parsing of LLM outputs: JSON extraction, per-task-type sample checks with reason codes,
judge answers and revisions."""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Any

from speed_ray.synth.schemas import sample_keys


class ParseError(ValueError):
    """An output that cannot be used; `reason` is a short code (no_json, truncated, missing_key:best, ...)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)```", re.DOTALL)
_OPEN_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?")
_REFUSAL = re.compile(r"^\W*(i'?m sorry|i am sorry|i apologi[sz]e|sorry, |i can(?:no|')t|i can not|i'?m unable|"
                      r"i am unable|i'?m not able|i am not able|i won'?t|as an ai\b)", re.IGNORECASE)


def _unfence(text: str) -> str:
    m = _FENCE.search(text)
    if m:
        return m.group(1)
    m = _OPEN_FENCE.search(text)   # an opening fence with no closing one: a truncated answer
    return text[m.end():] if m else text


def _scan(s: str) -> tuple[int | None, str]:
    """End index (exclusive) of the bracketed value starting at s[0], string-aware for ' and " quotes,
    and `s` with trailing commas (before } or ]) removed up to there. None if it never closes."""
    depth, quote, esc, out = 0, "", False, []
    for i, ch in enumerate(s):
        if quote:
            out.append(ch)
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == quote:
                quote = ""
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            while out and out[-1].isspace():
                out.pop()
            if out and out[-1] == ",":
                out.pop()
            depth -= 1
            if depth == 0:
                out.append(ch)
                return i + 1, "".join(out)
        out.append(ch)
    return None, "".join(out)


def _try_at(s: str) -> Any:
    dec = json.JSONDecoder()
    try:
        return dec.raw_decode(s)[0]
    except json.JSONDecodeError:
        pass
    end, fixed = _scan(s)
    if end is None:
        raise ParseError("truncated", "the JSON value never closes")
    try:
        return json.loads(fixed)
    except json.JSONDecodeError:
        pass
    try:  # E5's brainstorm prompt asks for "a python list of strings"
        val = ast.literal_eval(fixed)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
        raise ParseError("invalid_json", str(e)[:200]) from None
    if not isinstance(val, (list, dict)):
        raise ParseError("invalid_json", "not an object or list")
    return val


def extract_json(text: str | None) -> Any:
    """The first JSON object or list in `text`: code fences, prose around it, trailing commas and Python
    literals are tolerated. Raises ParseError(empty_output | no_json | truncated | invalid_json)."""
    if text is None or not str(text).strip():
        raise ParseError("empty_output")
    s = _unfence(str(text))
    starts = sorted(i for i in (s.find("{"), s.find("[")) if i >= 0)
    if not starts:
        raise ParseError("refusal" if _REFUSAL.search(s) else "no_json")
    first_err: ParseError | None = None
    for i in starts:
        try:
            return _try_at(s[i:])
        except ParseError as e:
            first_err = first_err or e
    assert first_err is not None
    raise first_err


@dataclass
class ParsedSample:
    ok: bool
    sample: dict | None
    reason: str = ""
    query: str = ""
    positive: str = ""
    negative: str = ""
    explanation: str = ""          # the teacher's "reason" when this came from a revision


def _norm(s: str) -> str:
    return " ".join(s.split()).casefold()


def sample_texts(task_type: str, sample: dict) -> tuple[str, str, str]:
    """(query, positive, negative) of a sample; matching has no hard negative ("")."""
    keys = sample_keys(task_type)
    vals = [str(sample.get(k, "")) for k in keys]
    return (vals[0], vals[1], vals[2] if len(vals) > 2 else "")


def check_sample(obj: Any, task_type: str, min_chars: int = 1, max_chars: int = 20000) -> dict:
    """The canonical sample (its keys only, in schema order, strings stripped) or ParseError with a reason."""
    if isinstance(obj, list) and len(obj) == 1 and isinstance(obj[0], dict):
        obj = obj[0]   # a one-element list around the object
    if not isinstance(obj, dict):
        raise ParseError("not_object", type(obj).__name__)
    out = {}
    for k in sample_keys(task_type):
        if k not in obj:
            raise ParseError(f"missing_key:{k}")
        v = obj[k]
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)   # a numeric label ("5") is a fine label
        if not isinstance(v, str):
            raise ParseError(f"wrong_type:{k}", type(v).__name__)
        v = v.strip()
        if not v:
            raise ParseError(f"empty:{k}")
        if len(v) < min_chars:
            raise ParseError(f"too_short:{k}")
        if len(v) > max_chars:
            raise ParseError(f"too_long:{k}")
        out[k] = v
    q, pos, neg = sample_texts(task_type, out)
    if neg and _norm(pos) == _norm(neg):
        raise ParseError("positive_equals_negative")
    if _norm(q) == _norm(pos):
        raise ParseError("query_equals_positive")
    return out


def _parsed(sample: dict, task_type: str, explanation: str = "") -> ParsedSample:
    q, p, n = sample_texts(task_type, sample)
    return ParsedSample(True, sample, "", q, p, n, explanation)


def parse_sample(text: str | None, task_type: str, min_chars: int = 1, max_chars: int = 20000) -> ParsedSample:
    """Parse and validate one generated sample; never raises for bad model output (ok=False, reason=code)."""
    sample_keys(task_type)   # an unknown task type is a programming error, not a reject
    try:
        obj = extract_json(text)
        return _parsed(check_sample(obj, task_type, min_chars, max_chars), task_type)
    except ParseError as e:
        reason = e.reason
        if reason in ("no_json", "invalid_json") and text and _REFUSAL.search(str(text)):
            reason = "refusal"
        return ParsedSample(False, None, reason)


def canonical_json(sample: dict) -> str:
    """The one serialization of a validated sample (schema key order), used as training target and for dedup."""
    return json.dumps(sample, ensure_ascii=False)


def _index(obj: dict, key: str, n: int) -> int:
    if key not in obj:
        raise ParseError(f"missing_key:{key}")
    v = obj[key]
    if isinstance(v, bool):
        raise ParseError(f"wrong_type:{key}")
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        v = int(v.strip())
    if not isinstance(v, int):
        raise ParseError(f"wrong_type:{key}", repr(v)[:50])
    if not 0 <= v < n:
        raise ParseError(f"out_of_range:{key}", f"{v} not in [0, {n})")
    return v


def parse_judge(text: str | None, n: int) -> tuple[int, int, str]:
    """(best, worst, reason) from the judge's JSON; indices start from 0 (SPEED App. C.2)."""
    if n < 2:
        raise ValueError(f"a judged list needs at least 2 outputs, got {n}")
    obj = extract_json(text)
    if isinstance(obj, list) and len(obj) == 1 and isinstance(obj[0], dict):
        obj = obj[0]
    if not isinstance(obj, dict):
        raise ParseError("not_object")
    best, worst = _index(obj, "best", n), _index(obj, "worst", n)
    if best == worst:
        raise ParseError("best_equals_worst")
    reason = obj.get("reason", "")
    return best, worst, reason if isinstance(reason, str) else json.dumps(reason, ensure_ascii=False)


def parse_revision(text: str | None, task_type: str, min_chars: int = 1, max_chars: int = 20000) -> ParsedSample:
    """The teacher's {"reason", "revision"}; the revision is the sample as an object or a JSON string."""
    try:
        obj = extract_json(text)
        if not isinstance(obj, dict):
            raise ParseError("not_object")
        if "revision" not in obj:
            # a bare sample instead of the wrapper: accept it when it validates
            if all(k in obj for k in sample_keys(task_type)):
                return _parsed(check_sample(obj, task_type, min_chars, max_chars), task_type)
            raise ParseError("missing_key:revision")
        rev, why = obj["revision"], obj.get("reason", "")
        why = why if isinstance(why, str) else json.dumps(why, ensure_ascii=False)
        if isinstance(rev, str):
            try:
                rev = extract_json(rev)
            except ParseError as e:
                raise ParseError(f"revision_{e.reason}") from None
        return _parsed(check_sample(rev, task_type, min_chars, max_chars), task_type, why)
    except ParseError as e:
        reason = e.reason
        if reason in ("no_json", "invalid_json") and text and _REFUSAL.search(str(text)):
            reason = "refusal"
        return ParsedSample(False, None, reason)


_WORD = re.compile(r"[^\W\d_]{2,}")        # a word: two or more letters (any script)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")   # scripts written without spaces
_ADDRESS = re.compile(r"\S+@\S+\.\w+|(?:https?://|www\.)\S+", re.IGNORECASE)


def _without_addresses(text: str) -> str:
    """The text with e-mail addresses and URLs blanked; an ASCII text without "@", "://" or "www." (any case) cannot
    hold one, so it skips the regex (most texts: the substitution costs more than the rest of word_count)."""
    if text.isascii() and "@" not in text and "://" not in text and "www." not in text.lower():
        return text
    return _ADDRESS.sub(" ", text)


def word_count(text: str) -> int:
    """Words of two or more letters, e-mail addresses and URLs left out; a run of CJK characters (written without
    spaces) counts about one word per two characters."""
    return _count(_without_addresses(text))


def _count(text: str) -> int:
    words = _WORD.findall(text)
    if text.isascii():   # no CJK: one word each
        return len(words)
    return sum(max(1, len(w) // 2) if _CJK.search(w) else 1 for w in words)


def has_words(text: str, n: int) -> bool:
    """word_count(text) >= n, reading only as far as the n-th word (the filters' floors are a few words, the texts
    passages)."""
    if n <= 0:
        return True
    text = _without_addresses(text)
    if not text.isascii():
        return _count(text) >= n
    for i, _ in enumerate(_WORD.finditer(text), 1):
        if i >= n:
            return True
    return False


_NUMBERING = re.compile(r"^\s*(?:[-*\u2022]+|\(?\d+[.)]|\d+\s*[-:]|[a-z][.)])\s+", re.IGNORECASE)


def normalize_task(task: str) -> str:
    """Strip list markers/numbering and quotes, collapse whitespace."""
    t = " ".join(str(task).split())
    t = _NUMBERING.sub("", t).strip().strip("\"'").strip()
    return t


def parse_task_list(text: str | None, min_words: int = 0) -> list[str]:
    """Brainstormed tasks: a JSON/Python list of strings (or {"tasks": [...]}), or failing that one task per
    bullet line; normalized and deduplicated case-insensitively, in order. Tasks of fewer than `min_words` words
    (`,]{`, an e-mail address) are dropped: no instruction can be made of them (ParseError "degenerate_tasks" when
    nothing else is left)."""
    try:
        obj = extract_json(text)
        if isinstance(obj, dict):
            obj = obj.get("tasks", next((v for v in obj.values() if isinstance(v, list)), None))
        if not isinstance(obj, list):
            raise ParseError("not_list")
        items = [x for x in obj if isinstance(x, str)]
    except ParseError as e:
        lines = [ln for ln in str(text or "").splitlines() if _NUMBERING.match(ln)]
        if not lines:
            raise ParseError(e.reason if e.reason != "not_object" else "not_list") from None
        items = lines
    out, seen, degenerate = [], set(), 0
    for it in items:
        t = normalize_task(it)
        if t and min_words and word_count(t) < min_words:
            degenerate += 1
        elif t and t.casefold() not in seen:
            seen.add(t.casefold())
            out.append(t)
    if not out:
        raise ParseError("degenerate_tasks" if degenerate else "empty_list")
    return out
