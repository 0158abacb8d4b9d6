"""Quality filters for embedding training samples: one reason per dropped row, so the manifest counts each.

Heuristics in the spirit of SPEED's data cleaning (Appendix A) and the rule filters of Gopher/C4
(Rae et al. 2021, https://arxiv.org/abs/2112.11446): length bounds, degenerate pairs, refusals and
placeholders, and an optional language id.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

from speed_ray.dedup.config import MIN_WORDS
from speed_ray.dedup.minhash import normalize
from speed_ray.synth.parsing import has_words

# Model refusals, template placeholders and filler: a sample containing them teaches the embedder noise.
BOILERPLATE = re.compile("|".join([
    r"\bas an ai\b", r"\bas a(?:n ai)? (?:large )?language model\b", r"\bi(?:'m| am) (?:sorry|unable)\b",
    r"\bi can(?:not|'t) (?:help|assist|provide|fulfill|comply)\b", r"\blorem ipsum\b",
    r"\[(?:insert|your|placeholder|todo)[^\]]*\]", r"<(?:insert|placeholder)[^>]*>",
    r"\{\{?\s*(?:query|positive|negative|document|placeholder|text)\s*\}\}?",
]), re.IGNORECASE)

FIELDS = ("query", "positive", "negative")
# Every BOILERPLATE alternative holds one of these, in lower case: an ASCII text with none of them cannot match,
# and a substring test is ~50x cheaper than the case-insensitive alternation (three texts a row, 1M rows a run).
_BOILERPLATE_CUES = ("as a", "i'm ", "i am ", "i can", "lorem", "[", "<", "{")


def boilerplate(text: str) -> bool:
    """BOILERPLATE.search(text), skipped for ASCII texts that hold none of its cues."""
    if text.isascii():
        low = text.lower()
        if not any(cue in low for cue in _BOILERPLATE_CUES):
            return False
    return BOILERPLATE.search(text) is not None


_PLACEHOLDER = re.compile(r"[{\[<]\s*[\w .-]*\s*[}\]>]")   # the whole text is `{my_book}`, `[label]`, `<doc>`

def degenerate_task(task: str, min_words: int) -> bool:
    """A task description no instruction can be made of: fewer than min_words words once e-mail addresses and URLs
    are taken out (`,]{`, `x@y.com`, a bare URL). The embedder puts it before every query of its samples."""
    return not has_words(task, min_words)


def label_like(text: str, field: str, task_type: str | None, min_words: Mapping[str, Mapping[str, int]]
               ) -> str | None:
    """Why a text is no sentence or passage where its task type expects one, or None: "placeholder" (the whole
    text is one of the schema's key names, as `S1`, or a bracketed name, as `{my_book}`) or "too_few_words"."""
    from speed_ray.synth.schemas import SAMPLE_KEYS

    floor = (min_words.get(task_type or "") or {}).get(field)
    if floor is None or not text:
        return None
    if text in SAMPLE_KEYS.get(task_type or "", ()) or _PLACEHOLDER.fullmatch(text):
        return "placeholder"
    return None if has_words(text, floor) else "too_few_words"


def quality_reason(query: str | None, positive: str | None, negative: str | None, valid: bool | None = True, *,
                   min_chars: Mapping[str, int], max_chars: Mapping[str, int], require_negative: bool = False,
                   drop_invalid: bool = True, drop_positive_equals_negative: bool = True,
                   drop_query_in_positive: bool = True, query_in_positive_min_words: int = 4,
                   drop_boilerplate: bool = True, language: str | None = None,
                   language_of: Callable[[str], str] | None = None, task: str | None = None,
                   drop_degenerate_task: bool = True, min_task_words: int = 3, task_type: str | None = None,
                   drop_label_like: bool = True, min_words: Mapping[str, Mapping[str, int]] = MIN_WORDS
                   ) -> str | None:
    """Why this sample should not be trained on (the first rule that fires), or None to keep it. A row with no
    task description (public pairs) is not judged by it; a row without a known task type is not judged by the
    per-type word floors."""
    if drop_invalid and valid is False:
        return "invalid"
    if drop_degenerate_task and task and task.strip() and degenerate_task(task, min_task_words):
        return "degenerate_task"
    values = {"query": (query or "").strip(), "positive": (positive or "").strip(),
              "negative": (negative or "").strip()}
    for f in ("query", "positive"):
        if not values[f]:
            return f"empty_{f}"
    if require_negative and not values["negative"]:
        return "empty_negative"
    for f in FIELDS:
        v = values[f]
        if v and len(v) < min_chars.get(f, 0):
            return f"too_short_{f}"
        if f in max_chars and len(v) > max_chars[f]:
            return f"too_long_{f}"
    if drop_label_like and task_type:
        for f in FIELDS:
            why = label_like(values[f], f, task_type, min_words)
            if why:
                return f"{why}_{f}"
    if drop_boilerplate:
        for f in FIELDS:
            if values[f] and boilerplate(values[f]):
                return f"boilerplate_{f}"
    pos = normalize(values["positive"]) if drop_positive_equals_negative or drop_query_in_positive else ""
    if drop_positive_equals_negative and values["negative"] and pos == normalize(values["negative"]):
        return "positive_equals_negative"
    if drop_query_in_positive:
        # Short keyword queries legitimately occur inside their document; long ones copied over are leaks.
        q = normalize(values["query"])
        if len(q.split(" ")) >= query_in_positive_min_words and f" {q} " in f" {pos} ":
            return "query_in_positive"
    if language:
        if language_of is None:
            raise ValueError("filters.language is set but no language identifier was given")
        if language_of(values["positive"]) != language:
            return "language"
    return None


def langid_classifier() -> Callable[[str], str]:
    """The language of a text via `langid` (pure Python + numpy, model bundled: no download)."""
    try:
        import langid
    except ImportError as e:
        raise ImportError("filters.language needs the `langid` package (pip install langid); "
                          "set filters.language: null to keep every language") from e
    return lambda text: langid.classify(text)[0]


def filter_reasons(columns: Mapping[str, Sequence], rules: Mapping, language_of: Callable[[str], str] | None = None
                   ) -> list[str | None]:
    """quality_reason for each row of a columnar batch; `rules` are the FiltersConfig fields."""
    n = len(next(iter(columns.values()))) if columns else 0
    missing = [c for c in ("query", "positive") if c not in columns]
    if missing:
        raise KeyError(f"quality filters need column(s) {missing}; the samples have {sorted(columns)}")
    neg = columns["negative"] if "negative" in columns else [None] * n
    valid = columns["valid"] if "valid" in columns else [True] * n
    tasks = columns["task"] if "task" in columns else [None] * n
    types = columns["task_type"] if "task_type" in columns else [None] * n
    if rules.get("language") and language_of is None:
        language_of = langid_classifier()
    return [quality_reason(q, p, ng, v, language_of=language_of, task=t, task_type=tt, **rules)
            for q, p, ng, v, t, tt in zip(columns["query"], columns["positive"], neg, valid, tasks, types)]
