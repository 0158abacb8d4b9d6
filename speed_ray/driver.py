"""The driver: load a config, connect to Ray, run the stage graph, print where everything is."""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

from speed_ray.pipeline import build_plan, fingerprints, plan_status, run_pipeline
from speed_ray.pricing import teacher_price, usd
from speed_ray.run_config import RunConfig, build_config, load_config
from speed_ray.store import RunStore

log = logging.getLogger("speed_ray")


def run_from_config(path: str, overrides: list[str] | None = None, stages: list[str] | None = None,
                    force: list[str] | None = None) -> dict[str, Any]:
    cfg = load_config(path, overrides)
    return run(cfg, stages=stages, force=force)


def run(cfg: RunConfig, stages: list[str] | None = None, force: list[str] | None = None) -> dict[str, Any]:
    from speed_ray.raylocal import ensure_ray

    logging.getLogger("speed_ray").setLevel(cfg.run.log_level)
    t0 = time.time()
    ensure_ray(cfg.run.ray_address, cfg.run.num_cpus)
    summary = run_pipeline(cfg, stages=stages, force=force)
    summary["wall_s"] = time.time() - t0
    print_summary(cfg, summary)
    return summary


def _money(v: float | None) -> str:
    return "n/a" if v is None else f"${v:,.2f}"


def print_summary(cfg: RunConfig, summary: dict[str, Any]) -> None:
    store = RunStore(cfg.run.run_dir)
    lines = [f"run {cfg.run.name!r} ({cfg.pipeline.variant}) in {summary.get('wall_s', 0):.1f}s; "
             f"run dir: {cfg.run.run_dir}"]
    lines.append(f"{'stage':<18} {'state':<8} {'rows':>8} {'secs':>8} {'calls':>7} {'tokens':>9}  output")
    fps = fingerprints(cfg, build_plan(cfg.pipeline.variant))
    for name, st in summary["stages"].items():
        cost = st.get("cost") or {}
        lines.append(f"{name:<18} {st['state']:<8} {st.get('rows') or 0:>8} {st.get('duration_s') or 0:>8.1f} "
                     f"{cost.get('calls', 0):>7} {cost.get('total_tokens', 0):>9}  "
                     f"{store.stage(name, fps[name]).url}")
    print("\n".join(lines), flush=True)
    for line in _where(cfg, store, fps):
        print(line, flush=True)


def _where(cfg: RunConfig, store: RunStore, fps: dict[str, str]) -> list[str]:
    """Where the data, the models, the evaluation table and the report of this run are."""
    out = []
    for stage, what in (("screen", "training data"), ("dedup", "deduplicated data"), ("synthesis", "synthetic data"),
                        ("teacher_synthesis", "synthetic data"), ("junior_sft", "junior generator"),
                        ("senior_dpo", "senior generator"), ("revisor_sft", "revisor"),
                        ("train_embedder", "embedder")):
        if stage not in fps:
            continue
        st = store.stage(stage, fps[stage])
        if st.done:
            m = st.manifest
            out.append(f"{what:>18}: {m.get('model_path') or st.data_url}")
    ev = store.stage("evaluate", fps["evaluate"]) if "evaluate" in fps else None
    if ev is not None and ev.done:
        m = ev.manifest
        md = m.get("results_md")
        if md and store.exists(md):
            import fsspec

            with fsspec.open(md, "r") as f:
                out += ["", f.read().rstrip()]
        out.append(json.dumps(m.get("scores", {})))
    try:
        from speed_ray.studies.report import write_report

        out.append(f"{'report':>18}: {write_report(store, cfg.run.name)}")
    except ImportError:
        pass
    except Exception as e:  # a report problem never hides the run's own outcome
        log.warning("could not write the run report: %s", e)
    return out


def status_main(args: argparse.Namespace) -> int:
    store = RunStore(args.run_dir)
    runs = [args.run] if args.run else store.run_names()
    if not runs:
        print(f"no runs in {args.run_dir}")
        return 1
    out = {}
    for name in runs:
        saved_url = store.run_url(name, "config.yaml")
        if args.config:
            cfg = load_config(args.config, args.overrides)
        else:
            import fsspec
            import yaml

            with fsspec.open(saved_url, "r") as f:
                cfg = build_config(yaml.safe_load(f), saved_url)
        rows = plan_status(cfg, store)
        # Stale: a finished output of this stage exists, but under other settings or inputs.
        for r in rows:
            others = [fp for fp in store.fingerprints(r["stage"]) if fp != r["fingerprint"]]
            r["stale"] = r["state"] != "done" and any(store.stage(r["stage"], fp).done for fp in others)
        out[name] = rows
        if not args.json:
            print(f"run {name} (variant {cfg.pipeline.variant})")
            print(f"  {'stage':<18} {'state':<8} {'rows':>8} {'secs':>8} {'calls':>7} {'tokens':>9} {'cpu_h':>7} "
                  f"{'gpu_h':>7} {'cost':>10}")
            total = 0.0
            for r in rows:
                m = r["manifest"] or {}
                c = m.get("cost", {})
                state = "stale" if r["stale"] else r["state"]
                dollars = usd(c, cfg.teacher.model, cfg.pricing)
                r["usd"] = dollars
                total += dollars["total_usd"]
                print(f"  {r['stage']:<18} {state:<8} {m.get('rows', 0):>8} {m.get('duration_s', 0):>8.1f} "
                      f"{c.get('calls', 0):>7} {c.get('total_tokens', 0):>9} {c.get('cpu_hours', 0):>7.3f} "
                      f"{c.get('gpu_hours', 0):>7.3f} {_money(dollars['total_usd']):>10}")
            print(f"  {'total':<18} {'':<8} {'':>8} {'':>8} {'':>7} {'':>9} {'':>7} {'':>7} {_money(total):>10}  "
                  f"(teacher {cfg.teacher.model} at {teacher_price(cfg.teacher.model, cfg.pricing) or 'no known price'}"
                  f" USD/1M in,out tokens; GPU h at {cfg.pricing.accelerator}'s; config `pricing`)")
    if args.json:
        print(json.dumps(out, default=str))
    return 0
