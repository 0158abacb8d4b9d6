"""Effect of false-negative screening on training (issue 18): MiniLM trained on clean vs planted triples.

    python benchmarks/screen_training_effect.py [--rows N] [--steps S] [--plant 0.3] [--action remove_negative]
        [--seeds 0,1,2] [--oracle] [--set screen.mine=pairs ...]

Data: STS-B train + dev pairs scored >= 4 as (query, positive), each with a random other train/dev sentence as
the negative; pairs with a text equal (after normalization) to an STS-B test sentence are left out. Planted: a
seeded share of the rows (default 30%) gets a false negative, a near-copy of its positive (quality_filters'
_edit: a word dropped or two swapped, case and punctuation changed). Compared: `speed-ray train-embedder` with
offline:minilm (full fine-tuning, same seed, steps, batch) on clean rows, on planted rows, and on planted rows
with --screen (the screen stage first); each model and the untrained base scored by `speed-ray evaluate` on
configs/tasks/stsb.yaml (STS-B test, Spearman x100). One process, a local Ray; prints one JSON line last.

--oracle adds a fourth model: the planted rows as a perfect screen would leave them under the action (drop: the
planted rows removed; remove_negative: kept as pairs; remine: not defined, so refused). It splits the gap in two:
clean - oracle is what the action itself costs (fewer rows, fewer hard negatives), oracle - screened what the
screen's own errors cost. --set passes more overrides to every run (screen.* ones reach the screened run only), as
screen.mine=pairs, which gives the rows the action left as pairs a negative mined from the rows' own documents;
--oracle with a screen.mine override is refused (a perfect screen's pairs would still need the same mining).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
os.environ.setdefault("SPEED_RAY_EVALDATA", os.path.join(ROOT, "..", "shared", "evaldata"))
for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(k, v)

from quality_filters import TASK_STS, _edit, _stsb  # noqa: E402  (reads SPEED_RAY_EVALDATA at import)

from speed_ray.dedup.minhash import normalize  # noqa: E402

TASK_YAML = os.path.join(ROOT, "configs", "tasks", "stsb.yaml")


def make_rows(n: int | None, seed: int, plant: float) -> tuple[list[dict], list[dict], set[str]]:
    """(clean rows, the same rows with `plant` of them given a near-copy of their positive as negative, planted ids)."""
    rng = random.Random(seed)
    test = {normalize(s) for r in _stsb("sts-test.csv") for s in r[1:]}
    pairs = _stsb("sts-train.csv") + _stsb("sts-dev.csv")
    sentences = sorted({s for r in pairs for s in r[1:] if normalize(s) not in test})
    good = [(a, b) for score, a, b in pairs if score >= 4.0 and normalize(a) not in test and normalize(b) not in test]
    rng.shuffle(good)
    good = good[:n] if n else good
    clean = []
    for i, (a, b) in enumerate(good):
        neg = rng.choice(sentences)
        while normalize(neg) in (normalize(a), normalize(b)):
            neg = rng.choice(sentences)
        clean.append({"id": f"r{i:05d}", "task": TASK_STS, "task_type": "sts", "query": a, "positive": b,
                      "negative": neg})
    chosen = set(rng.sample(range(len(clean)), round(plant * len(clean))))
    planted = [dict(r, negative=_edit(r["positive"], rng)) if i in chosen else dict(r) for i, r in enumerate(clean)]
    return clean, planted, {clean[i]["id"] for i in chosen}


def oracle_rows(planted: list[dict], planted_ids: set[str], action: str) -> list[dict]:
    """The planted rows as a screen that flags exactly the planted ones would leave them under `action`."""
    if action == "drop":
        return [r for r in planted if r["id"] not in planted_ids]
    if action == "remove_negative":
        return [dict(r, negative=None) if r["id"] in planted_ids else r for r in planted]   # null: a pair
    raise ValueError(f"no oracle for screen.action={action!r}: a perfect re-mine has no one right negative")


def write_jsonl(rows: list[dict], path: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def cli(argv: list[str]) -> None:
    from speed_ray.cli import main

    rc = main(argv)
    if rc:
        raise SystemExit(f"speed-ray {' '.join(argv[:2])} failed with exit status {rc}")


def evaluate(model: str, out: str, *overrides: str) -> float:
    """`speed-ray evaluate MODEL --local-tasks configs/tasks/stsb.yaml`: the STS-B test Spearman x100."""
    from speed_ray.evaluate.compare import main_scores

    cli(["evaluate", model, "--local-tasks", TASK_YAML, "--out", out, "evaluate.cache=false", *overrides])
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        scores = main_scores(json.load(f))
    (score,) = scores.values()
    return float(score)      # as the evaluator reports it (4 decimals): goal_met must not see a rounded gap


def screen_outcome(run_dir: str, planted_ids: set[str]) -> dict:
    """What the screen stage did: its manifest's counts, and how its verdicts fall on the planted rows."""
    import pyarrow.parquet as pq

    (manifest,) = glob.glob(os.path.join(run_dir, "stages", "screen", "*", "manifest.json"))
    with open(manifest, encoding="utf-8") as f:
        whole = json.load(f)
    m = whole.get("screen") or {}
    out = {k: m.get(k) for k in ("rows_in", "rows_out", "removed", "actions")}
    out["screen_s"] = round(whole["ended_at"] - whole["started_at"], 1)
    # the kept rows: the stage's data shards (artifacts/removed holds the dropped ones)
    shards = sorted(glob.glob(os.path.join(os.path.dirname(manifest), "data", "**", "*.parquet"), recursive=True))
    if shards:
        kept = [r for s in shards for r in pq.read_table(s, columns=["id", "lineage"]).to_pylist()]
        ids = {r["id"] for r in kept}
        # a kept row the screen flagged says so in its lineage, whatever the action then did with its negative
        # (emptied it, re-mined it in the batch, or left it to screen.mine)
        flagged_kept = {r["id"] for r in kept if "false_negative" in (json.loads(r["lineage"] or "{}").get("screen")
                                                                     or {})}
        removed = {r["id"] for s in glob.glob(os.path.join(os.path.dirname(manifest), "artifacts", "removed", "**",
                                                           "*.parquet"), recursive=True)
                   for r in pq.read_table(s, columns=["id"]).to_pylist()}
        out["planted_caught"] = len((planted_ids - ids) | (flagged_kept & planted_ids))
        out["clean_rows_flagged"] = len((flagged_kept | removed) - planted_ids)
        out["rows_dropped"] = out["rows_in"] - len(ids) if out.get("rows_in") is not None else None
    return out


def run_seed(args, seed: int, work: str, base: dict[str, float] | None) -> dict:
    """Clean, planted and screened MiniLM at one seed (data, planting and training), each scored on STS-B test.
    `base`: the untrained model's scores when an earlier seed measured them (they do not depend on the seed)."""
    os.makedirs(work, exist_ok=True)
    clean, planted, planted_ids = make_rows(args.rows or None, seed, args.plant)
    data = {"clean": write_jsonl(clean, os.path.join(work, "clean.jsonl")),
            "planted": write_jsonl(planted, os.path.join(work, "planted.jsonl"))}
    if args.oracle:
        data["oracle"] = write_jsonl(oracle_rows(planted, planted_ids, args.action), os.path.join(work, "oracle.jsonl"))
    warmup = max(1, args.steps // 10)
    overrides = ["embedder.lora=false", f"embedder.max_steps={args.steps}", f"embedder.batch_size={args.batch}",
                 f"embedder.learning_rate={args.lr}", f"embedder.warmup_steps={warmup}",
                 f"embedder.max_query_length={args.max_length}", f"embedder.max_doc_length={args.max_length}",
                 f"embedder.torch_threads={args.threads}", f"run.seed={seed}",
                 f"screen.action={args.action}", "screen.decontaminate=false", *args.set]
    runs = {"clean": ("clean", False), "planted_off": ("planted", False), "planted_on": ("planted", True),
            **({"oracle": ("oracle", False)} if args.oracle else {})}
    scores: dict[str, float] = {}
    times: dict[str, float] = {}
    for name, (which, screen) in runs.items():
        t0 = time.time()
        out = os.path.join(work, "runs", name)
        cli(["train-embedder", data[which], "--base-model", "offline:minilm", "--out", out,
             *(["--screen"] if screen else []), *overrides])
        times[f"train_{name}_s"] = round(time.time() - t0, 1)
    t0 = time.time()
    if base is None:
        base = {"base": evaluate("offline:minilm", os.path.join(work, "eval", "base")),
                # The evaluator gives every model the tasks' instructions (as the trained models learned them);
                # MiniLM was not trained with any, so its score without them is reported beside (the published 82.03).
                "base_no_instructions": evaluate("offline:minilm", os.path.join(work, "eval", "base_plain"),
                                                 "evaluate.instructions=false")}
    scores.update(base)
    for name in runs:
        scores[name] = evaluate(os.path.join(work, "runs", name), os.path.join(work, "eval", name))
    times["evaluate_s"] = round(time.time() - t0, 1)
    screened = screen_outcome(os.path.join(work, "runs", "planted_on"), planted_ids)
    gap = scores["clean"] - scores["planted_on"]
    split = ({"action_cost": round(scores["clean"] - scores["oracle"], 4),
              "screen_error_cost": round(scores["oracle"] - scores["planted_on"], 4)} if "oracle" in scores else {})
    return {"seed": seed, **scores, "recovered_within": round(gap, 4), "goal_met": abs(gap) <= 0.5, **split,
            "rows": len(clean), "planted": len(planted_ids), "screen_removed_or_kept_as_pairs": screened,
            "times": times}


def across_seeds(results: list[dict]) -> dict:
    """The gap (clean - screened) over the seeds: mean, standard error and a 95% interval (Student's t), and the
    seed-to-seed spread of the clean score itself, the noise any single seed's gap carries."""
    import statistics

    gaps = [r["clean"] - r["planted_on"] for r in results]
    out = {"seeds": [r["seed"] for r in results], "gaps": [round(g, 4) for g in gaps],
           "mean_gap": round(statistics.fmean(gaps), 4),
           "seeds_within_0.5": sum(abs(g) <= 0.5 for g in gaps),
           "mean_planted_off_loss": round(statistics.fmean(r["clean"] - r["planted_off"] for r in results), 4)}
    if all("oracle" in r for r in results):
        out["mean_action_cost"] = round(statistics.fmean(r["action_cost"] for r in results), 4)
        out["mean_screen_error_cost"] = round(statistics.fmean(r["screen_error_cost"] for r in results), 4)
    if len(gaps) > 1:
        se = statistics.stdev(gaps) / len(gaps) ** 0.5
        t95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}
        half = t95.get(len(gaps), 2.0) * se
        out.update(gap_stdev=round(statistics.stdev(gaps), 4), gap_se=round(se, 4),
                   gap_ci95=[round(out["mean_gap"] - half, 4), round(out["mean_gap"] + half, 4)],
                   clean_stdev=round(statistics.stdev(r["clean"] for r in results), 4))
    out["goal_met_mean"] = abs(out["mean_gap"]) <= 0.5
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=0, help="at most this many rows (0: all, about 1.6K)")
    ap.add_argument("--steps", type=int, default=40, help="training steps for each model")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--plant", type=float, default=0.3, help="share of rows given a false negative")
    ap.add_argument("--action", default="remove_negative", choices=["drop", "remove_negative", "remine"],
                    help="screen.action for the screened run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", help="comma-separated seeds (overrides --seed): each seed plants, trains and scores "
                                    "its own three models; the last line adds the gap's mean and 95%% interval")
    ap.add_argument("--oracle", action="store_true",
                    help="also train on the rows a perfect screen would leave (splits the gap: action vs screen errors)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="another config override for every run (screen.* ones reach the screened run only)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the training worker")
    ap.add_argument("--workdir", help="where data, runs and results go (default: a new temporary directory)")
    args = ap.parse_args()
    if args.oracle and args.action == "remine":
        ap.error("--oracle is defined for --action drop and remove_negative only")
    if args.oracle and any(o.startswith("screen.mine") for o in args.set):
        ap.error("--oracle does not mine: leave screen.mine* out of --set")
    t_start = time.time()
    work = args.workdir or tempfile.mkdtemp(prefix="screen-effect-")
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    results: list[dict] = []
    base = None
    for seed in seeds:
        r = run_seed(args, seed, work if len(seeds) == 1 else os.path.join(work, f"seed{seed}"), base)
        base = {k: r[k] for k in ("base", "base_no_instructions")}
        results.append(r)
        if len(seeds) > 1:
            print(json.dumps({"progress": "seed done", **r}), file=sys.stderr, flush=True)
    train = {"base_model": "offline:minilm", "lora": False, "max_steps": args.steps, "batch_size": args.batch,
             "learning_rate": args.lr, "warmup_steps": max(1, args.steps // 10), "max_query_length": args.max_length,
             "max_doc_length": args.max_length, "screen_action": args.action, "screen_decontaminate": False, "oracle": args.oracle,
             "overrides": args.set}
    line = dict(results[0]) if len(results) == 1 else {"per_seed": results, **across_seeds(results)}
    print(json.dumps({
        **line, "train": train, "task": "STS-B test (Spearman x100)", "workdir": work,
        "wall_s": round(time.time() - t_start, 1), "load_avg": [round(x, 2) for x in os.getloadavg()]}))


if __name__ == "__main__":
    main()
