"""Data-quality filters vs simple baselines, on rows made from the evaluation sets' TRAIN splits with planted defects.

    python benchmarks/quality_filters.py --rows 2000

Clean rows: STS-B train pairs scored >= 4 (query, positive) and Banking77 train texts of one intent (query,
positive), each with a negative from elsewhere (another random train sentence / another intent), none of them
equal to or a near-copy of an evaluation text (NearCopies: character similarity or containment, a test apart from
the screen's own). Planted:
- false negatives: the negative is a near-copy of the positive (a word dropped or swapped, case and punctuation
  changed) or another sentence paraphrasing it (its STS-B partner scored >= 4.6);
- contaminated rows: an evaluation TEST text (STS-B test, Banking77 test, SICK-R, SciFact) with light edits as
  the query or the positive, or quoted inside a longer positive;
- degenerate rows: a task description no instruction can be made of (`,]{`, an e-mail address, one word).
Ours: the dedup filters' degenerate-task rule, then the screen stage's core on what it keeps (speed_ray.quality:
decontamination index, then the false-negative rules: the MiniLM guide's query-side margin and the negative
restating the positive, and the negative copying the positive less a few words; each rule is also reported alone,
and the guide's two without the copy rule), one removal reason per row, as the stages decide. Baselines: exact rules (negative == positive after normalization, as the dedup
filter; an evaluation text equal to a row's text after normalization; an empty task). One process, no Ray.
Prints one JSON line last: precision / recall per filter and baseline, CPU seconds per 1K and per 100K rows.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from speed_ray.dedup.filters import filter_reasons  # noqa: E402
from speed_ray.dedup.minhash import normalize  # noqa: E402

EVALDATA = os.environ.get("SPEED_RAY_EVALDATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                               "evaldata"))
TASKS = ("configs/tasks/stsb.yaml", "configs/tasks/banking77.yaml", "configs/tasks/sickr.yaml",
         "configs/tasks/scifact.yaml")
TASK_STS = "Retrieve semantically similar text"
TASK_INTENT = "Given an online banking query, find other queries with the same intent"


def _stsb(name: str) -> list[tuple[float, str, str]]:
    out = []
    with open(os.path.join(EVALDATA, "stsb", name), encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 7:
                out.append((float(parts[4]), parts[5], parts[6]))
    return out


def _banking(name: str) -> list[tuple[str, str]]:
    with open(os.path.join(EVALDATA, "banking77", name), encoding="utf-8") as f:
        return [(r["text"], r["category"]) for r in csv.DictReader(f)]


def _edit(text: str, rng: random.Random) -> str:
    """A light edit: case and punctuation changed, and (texts of 6+ words) one word dropped or two swapped."""
    words = text.split()
    if len(words) >= 6:
        i = rng.randrange(1, len(words) - 1)
        if rng.random() < 0.5:
            del words[i]
        else:
            words[i], words[i + 1] = words[i + 1], words[i]
    out = " ".join(words)
    out = out.lower() if rng.random() < 0.5 else out.upper()
    return out.rstrip(".?!") + rng.choice(["", ".", "!", " ?"])


class NearCopies:
    """Whether a train text near-copies an evaluation text, by a test independent of the screen's (word n-gram
    containment and MinHash): character-level similarity (difflib's ratio >= `ratio` of the normalized texts), the
    same on the texts' words sorted (>= `sorted_ratio`, texts of about one length: fuzzy matching's "token sort
    ratio", so "can cards be delivered where" copies "where can cards be delivered"), or one normalized text inside
    the other (the inner one of >= 5 words). STS-B and Banking77 repeat sentences across
    their splits with light edits ("What do I do if I forgot my passcode?" in train, "What should I do ..." in
    test); such a train text is itself contaminated, so it is kept out of the clean rows. Candidates: the evaluation
    texts sharing the text's rarest words, and for containment every evaluation text whose rarest word the text
    holds (an evaluation text inside the text holds all its words, so none is missed: "why did it decline my payment"
    inside "everything seems fine with my account so why did it decline my payment" shares none of that text's
    rarest words)."""

    def __init__(self, eval_texts, ratio: float = 0.8, sorted_ratio: float = 0.85):
        self.texts = list(dict.fromkeys(normalize(t) for t in eval_texts if t))
        self.ratio = ratio
        self.post: dict[str, list[int]] = {}
        for i, t in enumerate(self.texts):
            for w in set(t.split()):
                self.post.setdefault(w, []).append(i)
        self.by_rarest: dict[str, list[int]] = {}   # evaluation texts of >= 5 words, by their rarest word
        for i, t in enumerate(self.texts):
            words = t.split()
            if len(words) >= 5:
                self.by_rarest.setdefault(min(set(words), key=lambda w: len(self.post[w])), []).append(i)
        self.cache: dict[str, bool] = {}
        self.sorted_ratio = sorted_ratio
        self._sorted_texts: dict[int, str] = {}

    def _sorted(self, i: int) -> str:
        if i not in self._sorted_texts:
            self._sorted_texts[i] = " ".join(sorted(self.texts[i].split()))
        return self._sorted_texts[i]

    def __call__(self, text: str) -> bool:
        from collections import Counter
        from difflib import SequenceMatcher

        t = normalize(text)
        if t not in self.cache:
            words = set(t.split())
            rare = sorted(words, key=lambda w: len(self.post.get(w, ())))[:4]
            cand = Counter(i for w in rare for i in self.post.get(w, ())[:3000])
            sorted_t = " ".join(sorted(t.split()))
            padded = f" {t} "
            hit = any(f" {self.texts[i]} " in padded for w in words for i in self.by_rarest.get(w, ()))
            for i, _ in ([] if hit else cand.most_common(40)):
                e = self.texts[i]
                if ((len(e.split()) >= 5 and e in t) or (len(words) >= 5 and t in e)
                        or (len(e) <= 3 * len(t) and SequenceMatcher(None, t, e).ratio() >= self.ratio)
                        or (0.75 <= len(e) / max(len(t), 1) <= 1.33
                            and SequenceMatcher(None, sorted_t, self._sorted(i)).ratio() >= self.sorted_ratio)):
                    hit = True
                    break
            self.cache[t] = hit
        return self.cache[t]


def make_rows(n: int, seed: int, eval_norm: set[str], near: NearCopies | None = None):
    """Rows from the train splits; train texts that equal an evaluation text (after normalization: STS-B and
    Banking77 repeat sentences across splits, SICK-R evaluates all its files), or with `near` near-copy one, are
    left out of the clean rows."""
    rng = random.Random(seed)
    ok = lambda *ts: all(normalize(t) not in eval_norm and not (near and near(t)) for t in ts)  # noqa: E731
    sts = [r for r in _stsb("sts-train.csv") if r[0] >= 4.0 and ok(r[1], r[2])]
    para = [r for r in sts if r[0] >= 4.6]
    sentences = [s for r in _stsb("sts-train.csv") for s in r[1:] if ok(s)]
    bank = [(t, c) for t, c in _banking("train.csv") if ok(t)]
    by_intent: dict[str, list[str]] = {}
    for t, c in bank:
        by_intent.setdefault(c, []).append(t)
    rows = []

    def clean(i: int) -> dict:
        if i % 2:
            _, a, b = rng.choice(sts)
            return {"task": TASK_STS, "task_type": "sts", "query": a, "positive": b, "negative": rng.choice(sentences)}
        c = rng.choice(sorted(by_intent))
        a, b = rng.sample(by_intent[c], 2)
        other = rng.choice([k for k in by_intent if k != c])
        return {"task": TASK_INTENT, "task_type": "classification", "query": a, "positive": b,
                "negative": rng.choice(by_intent[other])}

    test_texts = [s for r in _stsb("sts-test.csv") for s in r[1:]] + [t for t, _ in _banking("test.csv")]
    n_fn, n_ct, n_dg = n // 10, n // 10, n // 20
    for i in range(n - n_fn - n_ct - n_dg):
        rows.append({**clean(i), "kind": "clean"})
    for i in range(n_fn):
        r = clean(i)
        if i % 3 == 2 and r["task_type"] == "sts":
            _, a, b = rng.choice(para)
            r.update(positive=a, negative=b)         # the negative paraphrases the positive
        else:
            r["negative"] = _edit(r["positive"], rng)
        rows.append({**r, "kind": "false_negative"})
    for i in range(n_ct):
        r = clean(i)
        t = rng.choice(test_texts)
        where = i % 3
        if where == 0:
            r["query"] = _edit(t, rng)
        elif where == 1:
            r["positive"] = _edit(t, rng)
        else:
            r["positive"] = f"{r['positive']} As one customer put it: \"{t}\" That settles it."
        rows.append({**r, "kind": "contaminated"})
    for i in range(n_dg):
        r = clean(i)
        r["task"] = [",]{", "support@bank.example.com", "Sentence", "{{task}}", "1 2 3"][i % 5]
        rows.append({**r, "kind": "degenerate"})
    rng.shuffle(rows)
    for i, r in enumerate(rows):
        r["id"] = f"b{i:06d}"
    return rows


def _pr(flagged: list[bool], truth: list[bool]) -> dict:
    tp = sum(f and t for f, t in zip(flagged, truth))
    fp = sum(f and not t for f, t in zip(flagged, truth))
    fn = sum(t and not f for f, t in zip(flagged, truth))
    return {"precision": round(tp / (tp + fp), 4) if tp + fp else None, "recall": round(tp / (tp + fn), 4)
            if tp + fn else None, "flagged": tp + fp, "planted": tp + fn}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--margin", type=float, default=0.05)
    ap.add_argument("--restates", type=float, default=0.8)
    ap.add_argument("--copies", type=float, default=0.2,
                    help="screen.copies_max_dropped (the copy rule; a negative < 0 turns it off)")
    ap.add_argument("--guide", default="offline:minilm")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--instructions", choices=("auto", "on", "off"), default="auto",
                    help="screen.instructions: auto (the stage's default: only a guide trained with instructions "
                         "gets E5's instruction before the query), on or off")
    args = ap.parse_args()
    args.copies = None if args.copies < 0 else args.copies
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("SPEED_RAY_EVALDATA", EVALDATA)
    from speed_ray.dedup.lsh import band_layout
    from speed_ray.models.offline import resolve_model
    from speed_ray.quality.config import ScreenConfig
    from speed_ray.quality.decontam import build_index, row_hits
    from speed_ray.quality.eval_texts import evaluation_texts
    from speed_ray.quality.guide import Guide
    from speed_ray.quality.screen import ScreenSettings, screen_batch

    c = ScreenConfig(margin=args.margin)
    out: dict = {"guide": args.guide, "margin": args.margin, "restates": args.restates, "copies": args.copies,
                 "instructions": args.instructions}

    t0 = time.process_time()
    texts, skipped = evaluation_texts(TASKS, EVALDATA, (), None)
    layout = band_layout(c.decontam_minhash_threshold, c.decontam_num_perm)
    index = build_index(texts, c.decontam_ngram, c.decontam_shingle, c.decontam_num_perm, 1, layout["bands"],
                        layout["rows"], c.decontam_min_ngram)
    out["decontam_index"] = {"texts": len(index), "cpu_s": round(time.process_time() - t0, 2)}
    eval_norm = {normalize(t) for v in texts.values() for t in v}
    t_near = time.process_time()
    rows = make_rows(args.rows, args.seed, eval_norm, NearCopies([t for v in texts.values() for t in v]))
    out["clean_rows_check_cpu_s"] = round(time.process_time() - t_near, 1)
    cols = {k: [r[k] for r in rows] for k in ("id", "task", "task_type", "query", "positive", "negative")}
    truth = {k: [r["kind"] == k for r in rows] for k in ("false_negative", "contaminated", "degenerate")}
    t0 = time.process_time()
    hits = row_hits(index, cols, c.decontam_fields, c.decontam_ngram_threshold, c.decontam_minhash_threshold)
    t_dc = time.process_time() - t0

    t0 = time.process_time()
    rules = {f: getattr(c_, f) for c_ in [__import__("speed_ray.dedup.config", fromlist=["x"]).FiltersConfig()]
             for f in c_.__dataclass_fields__}
    reasons = filter_reasons(cols, rules)
    t_dg = time.process_time() - t0

    # The screen sees what dedup's filters kept, and removes each row for one reason: contaminated first, then a
    # false negative. Each rule of the false-negative test is also measured alone (the others off).
    guide = Guide(resolve_model(args.guide), "bi_encoder", c.max_length, threads=args.threads)
    seen = [i for i, r in enumerate(reasons) if r != "degenerate_task"]
    screened = {k: [v[i] for i in seen] for k, v in cols.items()}
    ins = {"auto": None, "on": True, "off": False}[args.instructions]
    variants = {"stage": ScreenSettings(margin=args.margin, restates=args.restates, action="drop", instructions=ins,
                                        copies_max_dropped=args.copies),
                "margin_rule": ScreenSettings(margin=args.margin, restates=None, action="drop", instructions=ins,
                                              copies_max_dropped=None),
                "restates_rule": ScreenSettings(margin=-2.0, restates=args.restates, action="drop",
                                                instructions=ins, copies_max_dropped=None),
                "copies_rule": ScreenSettings(margin=-2.0, restates=None, action="drop", instructions=ins,
                                              copies_max_dropped=args.copies),
                "guide_rules": ScreenSettings(margin=args.margin, restates=args.restates, action="drop",
                                              instructions=ins, copies_max_dropped=None)}
    verdicts: dict[str, list] = {}
    t_sc = 0.0
    for name, s in variants.items():
        t0 = time.process_time()
        got: list = []
        for k in range(0, len(seen), c.batch_size):
            part = {key: v[k:k + c.batch_size] for key, v in screened.items()}
            got += screen_batch(part, guide, index, s)["reason"]
        t_sc = t_sc or time.process_time() - t0          # the stage's own settings: the first pass
        verdicts[name] = [None] * len(rows)
        for i, r in zip(seen, got):
            verdicts[name][i] = r
    verdict = {"reason": verdicts["stage"]}
    removed_as = [r if r == "degenerate_task" else v for r, v in zip(reasons, verdict["reason"])]

    out["rows"] = len(rows)
    base_ct = [any(normalize(cols[f][i]) in eval_norm for f in ("query", "positive", "negative") if cols[f][i])
               for i in range(len(rows))]
    base_fn = [normalize(cols["negative"][i]) == normalize(cols["positive"][i]) for i in range(len(rows))]
    base_dg = [not (cols["task"][i] or "").strip() for i in range(len(rows))]
    per_k = lambda t: round(t / len(rows) * 1000, 4)  # noqa: E731
    out["filters"] = {
        "false_negative": {**_pr([r == "false_negative" for r in verdict["reason"]], truth["false_negative"]),
                           "cpu_s_per_1k": per_k(t_sc), "cpu_s_per_100k": round(per_k(t_sc) * 100, 1),
                           "margin_rule_alone": _pr([r == "false_negative" for r in verdicts["margin_rule"]],
                                                    truth["false_negative"]),
                           "restates_rule_alone": _pr([r == "false_negative" for r in verdicts["restates_rule"]],
                                                      truth["false_negative"]),
                           "copies_rule_alone": _pr([r == "false_negative" for r in verdicts["copies_rule"]],
                                                    truth["false_negative"]),
                           "guide_rules_only": _pr([r == "false_negative" for r in verdicts["guide_rules"]],
                                                   truth["false_negative"]),
                           "baseline": _pr(base_fn, truth["false_negative"]),
                           # the planted false negatives this filter saw: those an earlier filter (decontamination,
                           # whose STS-B train sentences can near-copy test ones, or the degenerate rule) did not take
                           "planted_removed_earlier": sum(t and r in ("contaminated", "degenerate_task")
                                                          for t, r in zip(truth["false_negative"], removed_as)),
                           "of_rows_screened": _pr([r == "false_negative" for r in verdict["reason"]],
                                                   [t and r not in ("contaminated", "degenerate_task")
                                                    for t, r in zip(truth["false_negative"], removed_as)])},
        "contaminated": {**_pr([r == "contaminated" for r in verdict["reason"]], truth["contaminated"]),
                         "cpu_s_per_1k": per_k(t_dc), "cpu_s_per_100k": round(per_k(t_dc) * 100, 1),
                         "index_alone": _pr([h is not None for h in hits], truth["contaminated"]),
                         "baseline": _pr(base_ct, truth["contaminated"])},
        "degenerate": {**_pr([r == "degenerate_task" for r in reasons], truth["degenerate"]),
                       "cpu_s_per_1k": per_k(t_dg), "baseline": _pr(base_dg, truth["degenerate"])},
    }
    out["goal_met"] = all(f["precision"] is not None and f["precision"] >= 0.9 and f["recall"] >= 0.9
                          for f in out["filters"].values()) and out["filters"]["false_negative"]["cpu_s_per_1k"] <= 0.5
    out["load"] = os.getloadavg()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
