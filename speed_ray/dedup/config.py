"""Configs for deduplication and quality filters."""

from __future__ import annotations

from dataclasses import dataclass, field

from speed_ray.config import check


@dataclass(frozen=True)
class DedupConfig:
    exact: bool = True                        # drop exact duplicates (hash of normalized text)
    near: bool = True                         # MinHash-LSH near duplicates
    fields: tuple[str, ...] = ("query", "positive")   # columns joined into the document; ("sample",): whole sample
    ngram: int = 3                            # word n-gram shingles
    num_perm: int = 128                       # MinHash permutations (signature length)
    bands: int | None = None                  # None: chosen from threshold (datasketch's optimal params)
    rows: int | None = None                   # signature values per band (set with bands)
    threshold: float = 0.8                    # Jaccard threshold
    seed: int = 1                             # datasketch's default MinHash seed
    batch_size: int = 4096                    # rows per map_batches call
    bucket_partition_rows: int = 2_000_000    # (band, key, id) rows per bucket partition: bounds a worker's memory

    def __post_init__(self):
        check(self.num_perm > 0, "num_perm", "must be > 0")
        check(0.0 < self.threshold < 1.0, "threshold", "must be in (0, 1)")
        check(self.ngram >= 1, "ngram", "must be >= 1")
        check((self.bands is None) == (self.rows is None), "bands", "set bands and rows together, or neither")
        check(self.bands is None or self.bands * self.rows <= self.num_perm, "bands",
              "bands * rows must be <= num_perm")
        check(len(self.fields) > 0, "fields", "name at least one field")
        check(self.batch_size > 0, "batch_size", "must be > 0")
        check(self.bucket_partition_rows > 0, "bucket_partition_rows", "must be > 0")


# Texts that should be sentences or passages, by task type (SAMPLE_KEYS' roles): the fewest words each may have.
# Labels (classification's positive and negative) have no floor; sts and bitext texts are sentences.
MIN_WORDS: dict[str, dict[str, int]] = {
    "retrieval": {"positive": 3, "negative": 3},
    "sts": {"query": 2, "positive": 2, "negative": 2},
    "bitext": {"query": 1, "positive": 1, "negative": 1},
    "classification": {"query": 2},
    "matching_short": {"query": 1, "positive": 1},
    "matching_long": {"query": 3, "positive": 3},
}


@dataclass(frozen=True)
class FiltersConfig:
    min_chars: dict[str, int] = field(default_factory=lambda: {"query": 3, "positive": 3})  # per field, when set
    max_chars: dict[str, int] = field(default_factory=lambda: {"query": 4000, "positive": 8000, "negative": 8000})
    require_negative: bool = False            # drop samples without a hard negative
    drop_positive_equals_negative: bool = True  # the hard negative is the positive (after normalization)
    drop_query_in_positive: bool = True       # query copied verbatim into the positive
    query_in_positive_min_words: int = 4      # shorter (keyword) queries may appear in their positive
    drop_invalid: bool = True                 # drop rows the generator's validation rejected (valid == False)
    drop_boilerplate: bool = True             # "as an AI", placeholders, lorem ipsum
    language: str | None = None               # e.g. "en": keep only positives in this language (needs `langid`)
    drop_degenerate_task: bool = True         # task descriptions with fewer than min_task_words words (`,]{`,
    min_task_words: int = 2                   # an e-mail address): the instruction of every one of their queries
    drop_label_like: bool = True              # a text that should be a sentence or passage (by task type) but is a
    #                                           placeholder (`S1`, `{my_book}`) or has too few words
    min_words: dict[str, dict[str, int]] = field(default_factory=lambda: {k: dict(v) for k, v in MIN_WORDS.items()})

    def __post_init__(self):
        for name in ("min_chars", "max_chars"):
            bad = sorted(set(getattr(self, name)) - {"query", "positive", "negative"})
            check(not bad, name, f"unknown field(s) {bad}; use query, positive, negative")
        check(self.query_in_positive_min_words >= 1, "query_in_positive_min_words", "must be >= 1")
        check(self.min_task_words >= 1, "min_task_words", "must be >= 1")
        for tt, floors in self.min_words.items():
            bad = sorted(set(floors) - {"query", "positive", "negative"})
            check(not bad, "min_words", f"{tt}: unknown field(s) {bad}; use query, positive, negative")
            check(all(isinstance(n, int) and n >= 0 for n in floors.values()), "min_words",
                  f"{tt}: word floors must be integers >= 0 (got {floors})")
