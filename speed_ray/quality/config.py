"""Config of the screen stage: hard-negative screening under a guide model, sample scores, decontamination."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from speed_ray.config import check


@dataclass(frozen=True)
class ScreenConfig:
    enabled: bool = True                      # false: the stage passes rows through (scores and checks off)
    # Hard-negative screening: a guide scores (query, positive) and (query, negative).
    guide_model: str | None = None            # None: the run's embedder.base_model; hub id, path or offline:minilm
    guide_kind: Literal["bi_encoder", "cross_encoder"] = "bi_encoder"   # a sentence-transformers model of that kind
    margin: float = 0.05                      # negative > positive - margin: a likely false negative...
    margin_min_similarity: float | None = 0.6  # ...when the negative also resembles the positive, s(pos, neg) >= this
    #                                           (bi-encoder guide): a negative as close to the query as the positive but
    #                                           unlike it is the hard negative training wants. null: the margin alone.
    #                                           With MiniLM on benchmarks/quality_filters.py the margin rule alone
    #                                           flagged 59 of 1500 clean rows (fine-grained Banking77 intents)
    restates_threshold: float | None = 0.8    # bi-encoder guide: s(positive, negative) >= this, the negative restates
    #                                           the positive (a near-copy or paraphrase): a false negative too; null: off
    copies_max_dropped: float | None = 0.2    # a negative that is its positive with at most this share of its words
    #                                           dropped (at least one; case and punctuation aside) copies it: a false
    #                                           negative whatever the guide scores (a dropped "not" excepted); null: off
    action: Literal["drop", "remove_negative", "remine"] = "remove_negative"   # what happens to such a triple:
    # keep it as a pair (in-batch negatives only; its query and positive are not in doubt); drop it; or take another
    # row's positive of the same task type in its batch as the negative (the highest that is not itself within the
    # margin, at rank remine_rank), else a pair. benchmarks/screen_training_effect.py (STS-B, 30% planted, three
    # seeds): kept as pairs 1.45 points under clean data, dropped 2.63; with mine: flagged below, 0.08
    remine_rank: int = 0
    # Mining hard negatives from a corpus (as sentence-transformers' mine_hard_negatives), under the margin above:
    mine: Literal["off", "flagged", "pairs", "all"] = "off"   # flagged: kept rows whose false negative the action
    #                                                took away get a mined one; pairs: every kept row without a
    #                                                negative (a user's pairs too); all: every kept row's negative
    #                                                is replaced by a mined one
    mine_corpus: str | None = None            # None: the input's own positives and negatives; or a Parquet / JSONL
    #                                           file or directory whose `text` (else `positive`) column is the corpus
    mine_rank_min: int = 0                    # the candidates outside the margin, best first: take rank min ("top")
    mine_rank_max: int = 10                   # or a random one of ranks [min, max) ("random")
    mine_sampling: Literal["top", "random"] = "top"
    instructions: bool | None = None          # E5 "Instruct: {task}\nQuery: " before the guide's query (speed_ray/e5.py);
    #                                           None: only for a guide trained with instructions (one whose
    #                                           sentence-transformers config defines a non-empty prompt). A prefix a
    #                                           guide never learned dilutes its query embedding: with MiniLM the
    #                                           false-negative rules' precision fell from 0.77 to 0.67
    #                                           (benchmarks/quality_filters.py)
    max_length: int = 256                     # guide tokens per text
    batch_size: int = 256                     # rows per map_batches call (one actor call)
    num_actors: int = 1                       # guide actors (each loads the model once)
    cpus_per_actor: float = 1.0               # fractional is fine on a small Ray
    gpus_per_actor: float = 0.0               # > 0: the guide runs on a GPU (fractional: actors share one)
    # Decontamination against the evaluation tasks the run reports (evaluate.local_tasks; hub tasks when reachable)
    decontaminate: bool = True
    decontam_fields: tuple[str, ...] = ("query", "positive", "negative")
    decontam_ngram: int = 8                   # word n-grams for containment
    decontam_min_ngram: int = 5               # evaluation texts shorter than decontam_ngram are indexed whole, down
    #                                           to this many words (an STS sentence quoted inside a document)
    decontam_ngram_threshold: float = 0.6     # share of the shorter text's n-grams found in the other (0.5 also
    #                                           took a 10-word question for an evaluation question sharing its first
    #                                           8 words: "is there a limit on how much i can top up" / "... withdraw")
    decontam_shingle: int = 1                 # word shingles for MinHash
    decontam_minhash_threshold: float = 0.8   # estimated Jaccard similarity (0.7 also caught "use my card" for
    #                                           "verify my card" in the intent sets)
    decontam_num_perm: int = 128

    def __post_init__(self):
        check(self.margin >= -1.0, "margin", "must be >= -1")
        check(self.margin_min_similarity is None or -1.0 <= self.margin_min_similarity <= 1.0,
              "margin_min_similarity", "must be in [-1, 1], or null for the margin alone")
        check(self.restates_threshold is None or -1.0 < self.restates_threshold <= 1.0, "restates_threshold",
              "must be in (-1, 1], or null to turn the rule off")
        check(self.copies_max_dropped is None or 0.0 <= self.copies_max_dropped < 1.0, "copies_max_dropped",
              "must be in [0, 1) (a share of the positive's words), or null to turn the rule off")
        check(self.action != "remine" or self.guide_kind == "bi_encoder", "action",
              "remine needs a bi_encoder guide (it scores each query against the batch's positives)")
        check(self.remine_rank >= 0, "remine_rank", "must be >= 0")
        check(self.mine == "off" or self.guide_kind == "bi_encoder", "mine",
              "mining needs a bi_encoder guide (it ranks the corpus by embedding similarity)")
        check(self.mine == "off" or self.enabled, "mine", "mining needs the screen enabled (screen.enabled: true)")
        check(self.mine != "flagged" or self.action != "drop", "mine",
              "flagged mines for the rows the action keeps without their false negative; action drop keeps none "
              "(use action: remove_negative)")
        check(0 <= self.mine_rank_min < self.mine_rank_max, "mine_rank_max",
              f"need 0 <= mine_rank_min < mine_rank_max (got {self.mine_rank_min}, {self.mine_rank_max})")
        check(self.max_length > 0, "max_length", "must be > 0")
        check(self.batch_size > 0, "batch_size", "must be > 0")
        check(self.num_actors >= 1, "num_actors", "must be >= 1")
        check(self.cpus_per_actor > 0, "cpus_per_actor", "must be > 0")
        check(self.gpus_per_actor >= 0, "gpus_per_actor", "must be >= 0")
        bad = sorted(set(self.decontam_fields) - {"query", "positive", "negative"})
        check(not bad and bool(self.decontam_fields), "decontam_fields",
              f"name fields among query, positive, negative (got {list(self.decontam_fields)})")
        check(self.decontam_ngram >= 1, "decontam_ngram", "must be >= 1")
        check(1 <= self.decontam_min_ngram <= self.decontam_ngram, "decontam_min_ngram",
              "must be in [1, decontam_ngram]")
        check(self.decontam_shingle >= 1, "decontam_shingle", "must be >= 1")
        check(0 < self.decontam_ngram_threshold <= 1, "decontam_ngram_threshold", "must be in (0, 1]")
        check(0 < self.decontam_minhash_threshold < 1, "decontam_minhash_threshold", "must be in (0, 1)")
        check(self.decontam_num_perm >= 16, "decontam_num_perm", "must be >= 16")
