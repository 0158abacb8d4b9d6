"""MinHash signatures of word n-gram shingles, equal to datasketch 2.x ("affine32"), vectorized over a batch.

MinHash: Broder, "On the resemblance and containment of documents" (1997). The permutation scheme is
datasketch >= 2.0's "affine32": sha1_hash32 of each token, the MurmurHash3 32-bit finalizer, then
a_k * h + b_k mod 2^32 with odd a_k drawn from np.random.RandomState(seed)
(https://github.com/ekzhu/datasketch/blob/master/datasketch/minhash.py).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from functools import lru_cache
from typing import Sequence

import numpy as np

_PUNCT = re.compile(r"[^\w\s]+")
_MAX32 = np.uint32(0xFFFFFFFF)
# Bound on the (shingles x num_perm) uint32 block hashed at once: 4M values = 16 MiB per worker at any N.
_BLOCK_VALUES = 1 << 22
_TEXT_CHUNK = 2048


def _drop_table() -> dict[int, None]:
    return {c: None for c in range(128) if not re.match(r"[\w\s]", chr(c))}


_ASCII_DROP = _drop_table()


def normalize(text: str | None) -> str:
    """NFKC, lower case, punctuation dropped, whitespace collapsed: "the same text" for exact and near dedup."""
    if not text:
        return ""
    if text.isascii():  # the common case, without the Unicode regex (same result)
        return " ".join(text.lower().translate(_ASCII_DROP).split())
    return " ".join(_PUNCT.sub("", unicodedata.normalize("NFKC", text).lower()).split())


def shingles(text: str | None, ngram: int, normalized: bool = False) -> list[str]:
    """Word n-grams of the normalized text; a text shorter than n words is one shingle, an empty text none."""
    words = (text or "" if normalized else normalize(text)).split(" ")
    if words == [""]:
        return []
    if len(words) <= ngram:
        return [" ".join(words)]
    if ngram == 1:
        return words
    return [" ".join(words[i:i + ngram]) for i in range(len(words) - ngram + 1)]


def shingle_tokens(text: str | None, ngram: int, normalized: bool = False) -> list[bytes]:
    """`shingles` as the UTF-8 bytes datasketch is fed, built on bytes (no per-shingle encode)."""
    words = (text or "" if normalized else normalize(text)).encode("utf-8").split(b" ")
    if words == [b""]:
        return []
    if len(words) <= ngram:
        return [b" ".join(words)]
    if ngram == 1:
        return words
    return list(map(b" ".join, zip(*[words[i:] for i in range(ngram)])))


@lru_cache(maxsize=16)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 (a, b): the same RandomState draws in the same order."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    a.setflags(write=False)
    b.setflags(write=False)
    return a, b


def sha1_hash32(tokens: Sequence[bytes]) -> np.ndarray:
    """datasketch.hashfunc.sha1_hash32 over many tokens: the first 4 bytes of SHA-1, little-endian."""
    sha1 = hashlib.sha1
    # Whole 20-byte digests, then every 5th little-endian word: cheaper than slicing each digest.
    return np.frombuffer(b"".join([sha1(t).digest() for t in tokens]), dtype="<u4")[::5].astype(np.uint32)


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (uint32 wraparound is the intended mod 2^32)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def signatures_from_tokens(docs: Sequence[Sequence[bytes]], num_perm: int = 128, seed: int = 1) -> np.ndarray:
    """(len(docs), num_perm) uint32: row i equals datasketch MinHash(num_perm, seed) updated with docs[i].

    A document without tokens keeps datasketch's empty value (all 2^32 - 1).
    """
    a, b = permutations(num_perm, seed)
    n = len(docs)
    out = np.full((n, num_perm), _MAX32, dtype=np.uint32)
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=n)
    max_shingles = max(1, _BLOCK_VALUES // num_perm)
    start = 0
    while start < n:
        # A block of whole documents whose shingles fit the value budget (at least one document).
        end = start + 1
        total = lengths[start]
        while end < n and total + lengths[end] <= max_shingles:
            total += lengths[end]
            end += 1
        block = [t for d in docs[start:end] for t in d]
        if block:
            hv = fmix32(sha1_hash32(block))
            # (num_perm, shingles) with shingles contiguous: reduceat along the last axis is ~7x faster.
            phv = a[:, None] * hv[None, :]
            phv += b[:, None]
            lens = lengths[start:end]
            nonempty = np.flatnonzero(lens > 0)
            offsets = np.concatenate(([0], np.cumsum(lens)[:-1]))[nonempty]
            out[start + nonempty] = np.minimum.reduceat(phv, offsets, axis=1).T
        start = end
    return out


def signatures(texts: Sequence[str | None], num_perm: int = 128, seed: int = 1, ngram: int = 3,
               normalized: bool = False) -> np.ndarray:
    """MinHash signatures of the texts' word n-gram shingles (UTF-8 bytes, as datasketch is fed)."""
    out = np.empty((len(texts), num_perm), dtype=np.uint32)
    for start in range(0, len(texts), _TEXT_CHUNK):  # shingle lists are Python objects: keep few alive
        chunk = texts[start:start + _TEXT_CHUNK]
        out[start:start + len(chunk)] = signatures_from_tokens(
            [shingle_tokens(t, ngram, normalized) for t in chunk], num_perm, seed)
    return out


def exact_hashes(texts: Sequence[str | None], normalized: bool = False) -> np.ndarray:
    """uint64 hash of each normalized text: equal values are exact duplicates (2^-64 collision odds)."""
    if not normalized:
        texts = [normalize(t) for t in texts]
    blob = b"".join([hashlib.blake2b((t or "").encode("utf-8"), digest_size=8).digest() for t in texts])
    return np.frombuffer(blob, dtype="<u8").astype(np.uint64)


def join_fields(columns: dict[str, Sequence], fields: Sequence[str]) -> list[str]:
    """One document per row: the named fields' texts joined by newlines (None counts as empty)."""
    missing = [f for f in fields if f not in columns]
    if missing:
        raise KeyError(f"dedup.fields names column(s) {missing} that the samples do not have "
                       f"(columns: {sorted(columns)})")
    cols = [columns[f] for f in fields]
    if len(cols) == 1:
        return [c or "" for c in cols[0]]
    return ["\n".join(v or "" for v in vals) for vals in zip(*cols)]
