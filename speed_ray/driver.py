"""The driver: load a config, connect to Ray, run the stage graph, print where everything is."""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

from speed_ray.pipeline import StageSpec, build_plan, fingerprints, plan_status, run_pipeline
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
    for line in _where(build_plan(cfg.pipeline.variant), store, fps, cfg.run.name):
        print(line, flush=True)


def _where(plan: list[StageSpec], store: RunStore, fps: dict[str, str], run_name: str) -> list[str]:
    """Where the data, the models, the evaluation table and the report of this run are (the stages' shows_as)."""
    out = []
    for spec in plan:
        if not spec.shows_as:
            continue
        st = store.stage(spec.name, fps[spec.name])
        if st.done:
            m = st.manifest
            out.append(f"{spec.shows_as:>18}: {m.get('model_path') or st.data_url}")
    ev = next((store.stage(s.name, fps[s.name]) for s in plan if s.produces == "evaluation"), None)
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

        out.append(f"{'report':>18}: {write_report(store, run_name)}")
    except ImportError:
        pass
    except Exception as e:  # a report problem never hides the run's own outcome
        log.warning("could not write the run report: %s", e)
    return out


def quality_lines(rows: list[dict]) -> list[str]:
    """`status`'s lines on the screened data: removals by reason, and the guide's median scores per task type."""
    m = next((r["manifest"] for r in rows if r["manifest"] and isinstance(r["manifest"].get("screen"), dict)), None)
    if m is None:
        return []
    sc = m["screen"]
    removed = ", ".join(f"{k} {v}" for k, v in sorted((sc.get("removed") or {}).items(), key=lambda kv: -kv[1]))
    changed = ", ".join(f"{k} {v}" for k, v in sorted((sc.get("actions") or {}).items(), key=lambda kv: -kv[1]) if v)
    out = [f"  quality: the screen kept {sc.get('rows_out')} of {sc.get('rows_in')} rows"
           + (f"; removed {removed}" if removed else "") + (f"; changed in place {changed}" if changed else "")
           + f" (guide {sc.get('guide')})"]
    for t, q in sorted(((m.get("quality") or {}).get("by_task_type") or {}).items()):
        med = {k: (q.get(k) or {}).get("p50") for k in ("guide_pos_score", "guide_neg_score", "guide_margin")}
        cells = "  ".join(f"{label} {v:.2f}" if isinstance(v, (int, float)) else f"{label} -"
                          for label, v in zip(("q-pos", "q-neg", "margin"), med.values()))
        out.append(f"    {t:<16} {q.get('rows', 0):>7} rows  median {cells}")
    return out


def status_main(args: argparse.Namespace) -> int:
    store = RunStore(args.run_dir)
    if not store.fs.exists(store.root):
        raise FileNotFoundError(f"run directory {args.run_dir} does not exist")
    runs = [args.run] if args.run else store.run_names()
    if not runs:
        print(f"no runs in {args.run_dir}")
        return 1
    if getattr(args, "watch", False):
        return watch_main(store, runs, args.interval, args.json)
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
            for line in quality_lines(rows):
                print(line)
    if args.json:
        print(json.dumps(out, default=str))
    return 0


def watch_main(store: RunStore, runs: list[str], interval: float = 5.0, as_json: bool = False,
               max_frames: int | None = None) -> int:
    """`speed-ray status RUN_DIR --watch`: every `interval` seconds, each stage's progress (the lines the run's own
    driver shows and writes to runs/<name>/progress.log) until every watched run finished, or Ctrl-C."""
    import sys

    from speed_ray.monitor import RunWatch, watch_frame

    watches = [RunWatch(store, n) for n in runs if store.exists(store.run_url(n, "plan.json"))]
    if not watches:
        raise FileNotFoundError(f"no run with a plan.json in {store.run_dir} (runs: {', '.join(runs)})")
    tty = sys.stdout.isatty() and not as_json
    frames = 0
    try:
        while True:
            now = time.time()
            done = all(w.finished() for w in watches)
            if as_json:
                print(json.dumps({w.run_name: [r if isinstance(r, dict) else r.as_dict() for r in w.records(now)]
                                  for w in watches}, default=str), flush=True)
            else:
                frame = "\n".join(line for w in watches for line in watch_frame(w, now))
                print(("\x1b[2J\x1b[H" if tty else "") + frame + ("" if tty else "\n"), flush=True)
            frames += 1
            if done:
                if not as_json:
                    print("finished: every stage is done" if all(
                        store.stage(s["stage"], s["fingerprint"]).done for w in watches for s in w.stages())
                        else "finished: the run wrote its summary", flush=True)
                return 0
            if max_frames is not None and frames >= max_frames:
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0
