"""Multi-grained topic sampling, balanced across top-level categories, with SPEED's depth truncation (App. D.1)."""

from __future__ import annotations

import json
import random
from collections import defaultdict

from speed_ray.synth.samples import stable_id


def truncate_topic(path: str, max_depth: int = 4) -> str:
    """Paths deeper than max_depth keep their first and last levels and drop the middle (SPEED App. D.1):
    'Arts/Movies/Titles/3/36_Hours_-_1964/Cast_and_Crew' -> 'Arts/Movies/36_Hours_-_1964/Cast_and_Crew'."""
    parts = [p for p in path.split("/") if p]
    if len(parts) <= max_depth:
        return "/".join(parts)
    head = (max_depth + 1) // 2
    return "/".join(parts[:head] + parts[len(parts) - (max_depth - head):])


def _balanced_quota(n: int, sizes: dict[str, int], rng: random.Random) -> dict[str, int]:
    """Max-min fair split of n over categories: every category gets as many as the others (up to its size);
    which categories get the one extra is random, not alphabetical."""
    quota = {c: 0 for c in sizes}
    order = sorted(sizes)
    rng.shuffle(order)
    left = min(n, sum(sizes.values()))
    while left > 0:
        for c in order:
            if left and quota[c] < sizes[c]:
                quota[c] += 1
                left -= 1
    return quota


def sample_topics(nodes: list[str], n: int, seed: int, max_depth: int = 4, truncate: bool = True) -> list[dict]:
    """n topic rows (id, topic, raw_topic, top_level, lineage), drawn from nodes of every depth, balanced
    across top-level categories. Truncated duplicates are merged first. When n exceeds the distinct topics,
    further rounds draw the taxonomy again (each round balanced), so ids stay unique via the round number."""
    if n <= 0:
        return []
    by_topic: dict[str, str] = {}
    for raw in sorted(set(nodes)):
        topic = truncate_topic(raw, max_depth) if truncate else raw.strip("/")
        by_topic.setdefault(topic, raw)   # keep one raw path per truncated topic, deterministically
    if not by_topic:
        raise ValueError("the taxonomy has no topics")
    groups: dict[str, list[str]] = defaultdict(list)
    for topic in by_topic:
        groups[topic.split("/")[0]].append(topic)
    rng = random.Random(seed)
    rows: list[dict] = []
    rnd = 0
    while len(rows) < n:
        need = min(n - len(rows), len(by_topic))
        quota = _balanced_quota(need, {c: len(v) for c, v in groups.items()}, rng)
        picked = []
        for cat in sorted(groups):
            picked += rng.sample(groups[cat], quota[cat])
        rng.shuffle(picked)
        for topic in picked:
            raw = by_topic[topic]
            lineage = {"topic": topic, "raw_topic": raw, "topic_round": rnd}
            rows.append({"id": stable_id("topic", topic, rnd), "topic": topic, "raw_topic": raw,
                         "top_level": topic.split("/")[0], "lineage": json.dumps(lineage, ensure_ascii=False)})
        rnd += 1
    return rows
