"""The run report: stage table, evaluation, our result next to the paper's, the studies' plots and the cost report,
as markdown + PNG under runs/<name>/report/; and the cross-run table (ablations, generator comparison)."""

from __future__ import annotations

import argparse
import json
import logging
import re
from typing import Any

from speed_ray.store import RunStore

log = logging.getLogger("speed_ray")

_RATE = re.compile(r"(rate|ratio|valid|parse|reject|loss|accuracy)", re.I)


def _fmt(v: Any, nd: int = 2) -> str:
    if isinstance(v, bool) or v is None:
        return "–" if v is None else str(v)
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) >= 10 ** -nd or v == 0 else f"{v:.2g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _delta(v: Any) -> str:
    return "–" if v is None else f"{v:+.2f}"


def _read_text(url: str) -> str | None:
    import fsspec

    try:
        with fsspec.open(url, "r") as f:
            return f.read()
    except (OSError, ValueError):
        return None


def load_run(store: RunStore, run_name: str) -> dict[str, Any]:
    """A run's plan, saved config (as a dict) and each planned stage's manifest (None when not finished)."""
    import yaml

    plan_url = store.run_url(run_name, "plan.json")
    if not store.exists(plan_url):
        raise FileNotFoundError(f"no run {run_name!r} in {store.run_dir} (no {plan_url}); runs: "
                                f"{', '.join(store.run_names()) or 'none'}")
    plan = store.read_json(plan_url)
    cfg = yaml.safe_load(_read_text(store.run_url(run_name, "config.yaml")) or "{}") or {}
    stages: dict[str, dict | None] = {}
    for s in plan.get("stages", []):
        out = store.stage(s["stage"], s["fingerprint"])
        stages[s["stage"]] = out.manifest if out.done else None
    return {"name": run_name, "plan": plan, "config": cfg, "manifests": stages}


def _metrics(m: dict) -> str:
    """Parse/valid rates, reject counts and training losses, wherever the stage put them."""
    found: list[str] = []

    def walk(d: dict, prefix: str = "") -> None:
        for k, v in d.items():
            if k in ("cost", "versions", "settings", "inputs", "variant_inputs", "scores", "baselines", "train_config"):
                continue
            if isinstance(v, dict) and len(prefix) < 20:
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and _RATE.search(k):
                found.append(f"{prefix}{k}={_fmt(float(v), 3)}")

    walk(m)
    return "; ".join(found[:6])


def stage_table(run: dict) -> str:
    lines = ["| stage | state | rows | secs | teacher calls | tokens | CPU h | GPU h | rates / metrics |",
             "|---|---|---|---|---|---|---|---|---|"]
    for stage, m in run["manifests"].items():
        if m is None:
            lines.append(f"| {stage} | pending | | | | | | | |")
            continue
        c = m.get("cost", {})
        lines.append(f"| {stage} | done | {_fmt(m.get('rows', 0))} | {_fmt(float(m.get('duration_s', 0.0)), 1)} | "
                     f"{_fmt(int(c.get('calls', 0)))} | {_fmt(int(c.get('total_tokens', 0)))} | "
                     f"{float(c.get('cpu_hours', 0.0)):.3f} | {float(c.get('gpu_hours', 0.0)):.3f} | {_metrics(m)} |")
    return "\n".join(lines)


def generator_of(cfg: dict) -> str:
    """The model that wrote the run's synthetic data (what the generator comparison varies), from the plan's stage
    facts: the synthesizer stage's teacher, its engine's model, or the generator stage feeding it."""
    from speed_ray.pipeline import build_plan

    plan = {s.name: s for s in build_plan((cfg.get("pipeline") or {}).get("variant", "full"))}
    synth = next((s for s in plan.values() if s.generator_role == "synthesizer"), None)
    if synth is None:
        return "–"
    if synth.uses_teacher:
        return str((cfg.get("teacher") or {}).get("model"))
    engine_model = ((cfg.get(synth.name) or {}).get("engine") or {}).get("model")
    if engine_model:
        return str(engine_model)
    gen = plan.get(synth.inputs.get("generator", ""))
    if gen is None:
        return "–"
    return f"{(cfg.get(gen.name) or {}).get('base_model')} ({gen.generator_role})"


def _synthetic_rows(run: dict, done: dict) -> int:
    from speed_ray.pipeline import build_plan

    synth = [s.name for s in build_plan(run["plan"].get("variant") or "full") if s.generator_role == "synthesizer"]
    return max((done[s].get("rows", 0) for s in synth if s in done), default=0)


def run_prices(cfg: dict) -> tuple[str, Any]:
    """(teacher model, PricingConfig) of a run's saved config (a dict)."""
    from speed_ray.config import from_dict
    from speed_ray.pricing import PricingConfig
    from speed_ray.teacher.config import TeacherConfig

    return ((cfg.get("teacher") or {}).get("model") or TeacherConfig.model,
            from_dict(PricingConfig, cfg.get("pricing") or {}))


def summary_row(run: dict) -> dict[str, Any]:
    """One line of the cross-run table: variant, generator, score vs the paper, and cost."""
    from speed_ray.studies.cost import cost_table

    done = {k: m for k, m in run["manifests"].items() if m}
    tot = cost_table(done, *run_prices(run["config"]))["total"]
    ev = done.get("evaluate") or {}
    ours = (ev.get("averages") or {}).get("average")
    paper = (run["config"].get("pipeline") or {}).get("paper_result")
    return {"run": run["name"], "variant": run["plan"].get("variant"), "generator": generator_of(run["config"]),
            "average": ours, "paper": paper,
            "delta": ours - paper if isinstance(ours, (int, float)) and isinstance(paper, (int, float)) else None,
            "comparable": paper_comparable(run["config"]),
            "n_tasks": (ev.get("averages") or {}).get("n_tasks"), "calls": tot["calls"],
            "tokens": tot["total_tokens"], "gpu_hours": tot["gpu_hours"], "cpu_hours": tot["cpu_hours"],
            "usd": tot["total_usd"],
            "synthetic_rows": _synthetic_rows(run, done),
            "done": all(run["manifests"].values())}


def paper_comparable(cfg: dict) -> bool:
    """The paper's numbers are MTEB(eng, v1) averages over whole tasks: only such an evaluation compares."""
    ev = cfg.get("evaluate") or {}
    return (ev.get("benchmark") == "MTEB(eng, v1)" and not ev.get("limit") and not ev.get("local_tasks")
            and not ev.get("tasks"))


def _is_study_point(name: str, names: list[str]) -> bool:
    """Sweep and influence points are runs named '<study>-n<N>...' or '<study>-infl-...'."""
    return any(name.startswith(f"{o}-") and re.match(r"(n\d+|infl-)", name[len(o) + 1:]) for o in names if o != name)


def runs_table(store: RunStore) -> list[dict]:
    """summary_row for every run in the run directory (study points left out)."""
    names = store.run_names()
    rows = []
    for n in names:
        if _is_study_point(n, names) or not store.exists(store.run_url(n, "plan.json")):
            continue
        rows.append(summary_row(load_run(store, n)))
    return rows


def comparison_markdown(rows: list[dict]) -> str:
    """Ablations / baselines / generator comparison: score next to the paper's, and what each run cost."""
    lines = ["| run | variant | generator | average | paper | Δ | tasks | synthetic rows | teacher calls | tokens | "
             "GPU h | CPU h |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = _delta(r["delta"]) if r.get("comparable", True) or r["delta"] is None else "n/c"
        lines.append(f"| {r['run']} | {r['variant']} | {r['generator']} | {_fmt(r['average'])} | {_fmt(r['paper'], 1)} | "
                     f"{delta} | {_fmt(r['n_tasks'])} | "
                     f"{_fmt(r['synthetic_rows'])} | {_fmt(r['calls'])} | {_fmt(r['tokens'])} | "
                     f"{r['gpu_hours']:.3f} | {r['cpu_hours']:.3f} |")
    if any(r["delta"] is not None and not r.get("comparable", True) for r in rows):
        lines += ["", "n/c: not comparable. The paper's numbers are MTEB(eng, v1) averages over whole tasks; that run "
                      "evaluates other tasks or a subsample."]
    return "\n".join(lines)


def _evaluation_section(run: dict) -> list[str]:
    ev = run["manifests"].get("evaluate")
    if not ev:
        return ["## Evaluation", "", "The evaluate stage has not finished.", ""]
    md = _read_text(ev["results_md"]) if ev.get("results_md") else None
    if md:
        md = re.sub(r"^# .*\n", "", md, count=1)
        return ["## Evaluation", "", md.strip(), ""]
    lines = ["## Evaluation", "", "| task | score |", "|---|---|"]
    lines += [f"| {t} | {_fmt(s)} |" for t, s in sorted((ev.get("scores") or {}).items())]
    lines.append(f"| **average** | {_fmt((ev.get('averages') or {}).get('average'))} |")
    return lines + [""]


def _paper_section(row: dict, cfg: dict) -> list[str]:
    lines = ["## Our result next to the paper's", ""]
    ev = cfg.get("evaluate") or {}
    if row["paper"] is None:
        lines.append(f"Our average: {_fmt(row['average'])} over {_fmt(row['n_tasks'])} task(s); this config sets no "
                     "`pipeline.paper_result`.")
    else:
        lines += ["| | average |", "|---|---|", f"| this run ({row['variant']}) | {_fmt(row['average'])} |",
                  f"| SPEED paper | {row['paper']:.1f} |",
                  f"| Δ | {_delta(row['delta'])} |"]
    if ev.get("limit") or ev.get("local_tasks") and not ev.get("benchmark"):
        lines += ["", "Not comparable with the paper's number: this run evaluates "
                  + ("a subsample of each task" if ev.get("limit") else "local tasks, not the MTEB benchmark") + "."]
    return lines + [""]


def _studies_section(store: RunStore, name: str) -> list[str]:
    lines = []
    for study, md, pngs in (("sweep", "sweep.md", ("scaling.png", "axis.png")),
                            ("influence", "influence.md", ("heatmap.png", "heatmap_by_category.png"))):
        url = store.run_url(name, study, md)
        if not store.exists(url):
            continue
        lines += [f"## {study.capitalize()}", "", f"Full tables: [../{study}/{md}](../{study}/{md})", ""]
        lines += [f"![{p}](../{study}/{p})" for p in pngs if store.exists(store.run_url(name, study, p))]
        if study == "sweep":
            fits = store.read_json(store.run_url(name, "sweep", "fits.json"))
            for setting, e in fits.items():
                for kind, f in e.get("fits", {}).items():
                    if "params" in f and "10x" in f.get("predictions", {}):
                        p = f["predictions"]["10x"]
                        lines.append(f"- {setting}, {kind}: predicted {p['mean']:.2f} [{p['lo']:.2f}, {p['hi']:.2f}] "
                                     f"at N={p['n']:.0f} (10x the largest size)")
        lines.append("")
    return lines


def _stage_png(store: RunStore, url: str, run: dict) -> str | None:
    from speed_ray.studies.plots import bar_plot
    from speed_ray.studies.sweep import _local_png

    done = {k: m for k, m in run["manifests"].items() if m}
    if not done:
        return None
    labels = list(done)
    series = {"wall h": [float(m.get("duration_s", 0.0)) / 3600 for m in done.values()],
              "CPU h": [float(m.get("cost", {}).get("cpu_hours", 0.0)) for m in done.values()],
              "GPU h": [float(m.get("cost", {}).get("gpu_hours", 0.0)) for m in done.values()]}
    return _local_png(store, url, lambda p: bar_plot(p, labels, series, f"{run['name']}: time per stage", "hours"))


def quality_section(store: RunStore, base: str, run: dict) -> list[str]:
    """The screen stage's removals by reason and the guide's score distributions per task type (quality.png)."""
    from speed_ray.studies.plots import quality_plot
    from speed_ray.studies.sweep import _local_png

    m = next((m for m in run["manifests"].values() if m and isinstance(m.get("screen"), dict)), None)
    if m is None:
        return []
    sc, q = m["screen"], m.get("quality") or {}
    lines = ["## Data quality", "", f"The screen kept {_fmt(sc.get('rows_out'))} of {_fmt(sc.get('rows_in'))} rows "
             f"(guide `{sc.get('guide')}`, margin {sc.get('margin')}, action `{sc.get('action')}`)."]
    removed = {k: v for k, v in (sc.get("removed") or {}).items() if v}
    if removed:
        lines += ["", "| removed because | rows |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(removed.items(), key=lambda kv: -kv[1])]
    else:
        lines += ["", "It removed no row."]
    changed = {k: v for k, v in (sc.get("actions") or {}).items() if v}
    if changed:   # kept rows whose negative the screen took away (a pair), re-mined or mined
        lines += ["", "| kept, negative changed | rows |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(changed.items(), key=lambda kv: -kv[1])]
    hits = ((sc.get("decontamination") or {}).get("hits_by_task") or {})
    if hits:
        lines += ["", "Contamination hits per evaluation task: " + ", ".join(f"{t} {_fmt(n)}" for t, n in
                                                                             sorted(hits.items()))]
    by_type = q.get("by_task_type") or {}
    if by_type:
        _local_png(store, f"{base}/quality.png", lambda p: quality_plot(p, by_type, "guide scores per task type"))
        lines += ["", "![guide scores per task type](quality.png)"]
    return lines + [""]


def write_report(store: RunStore | str, run_name: str) -> str:
    """Write runs/<run_name>/report/{report.md, report.html, stages.png, quality.png (with a screen stage),
    report.json}; returns the markdown's URL."""
    from speed_ray.studies.cost import cost_table, markdown
    from speed_ray.studies.sweep import _write_text

    store = store if isinstance(store, RunStore) else RunStore(store)
    run = load_run(store, run_name)
    row = summary_row(run)
    base = store.run_url(run_name, "report")
    cost = cost_table({k: m for k, m in run["manifests"].items() if m}, *run_prices(run["config"]))
    png = _stage_png(store, f"{base}/stages.png", run)
    lines = [f"# Run report: {run_name}", "", f"Variant `{row['variant']}`, generator {row['generator']}, run dir "
             f"`{store.run_dir}`. {sum(1 for m in run['manifests'].values() if m)}/{len(run['manifests'])} stages "
             "done.", "", "## Stages", "", stage_table(run), ""]
    if png:
        lines += ["![stages](stages.png)", ""]
    lines += _evaluation_section(run) + _paper_section(row, run["config"]) + _studies_section(store, run_name)
    lines += quality_section(store, base, run)
    lines += ["## Cost", "", "Teacher calls and tokens per stage, CPU/GPU hours and dollars, and the paper's Table 5 "
              "(E5-mistral's and SPEED's teacher budgets) at the same prices.", "", markdown(cost), ""]
    url = f"{base}/report.md"
    _write_text(store, url, "\n".join(lines))
    store.write_json(f"{base}/report.json", {"summary": row, "cost": cost})
    from speed_ray.studies.html_report import write_html_report

    write_html_report(store, run, cost, row, f"{base}/report.html")   # the same run as one self-contained page
    return url


def report_main(args: argparse.Namespace) -> int:
    """`speed-ray report RUN_DIR [--run NAME]`: one report per run, plus RUN_DIR/report.md comparing the runs."""
    from speed_ray.studies.sweep import _write_text

    store = RunStore(args.run_dir)
    names = [args.run] if args.run else store.run_names()
    if not names:
        raise FileNotFoundError(f"no runs in {args.run_dir}")
    for n in names:
        if args.run:
            print(f"{n}: {write_report(store, n)} (and report.html beside it)")
        elif _is_study_point(n, names):
            continue
        elif not store.exists(store.run_url(n, "plan.json")):
            # a sweep or influence study: its own markdown is its report (the points are runs of their own)
            found = [store.run_url(n, d, f"{d}.md") for d in ("sweep", "influence")
                     if store.exists(store.run_url(n, d, f"{d}.md"))]
            if found:
                print(f"{n}: {', '.join(found)}")
        else:
            print(f"{n}: {write_report(store, n)} (and report.html beside it)")
    if not args.run:
        rows = runs_table(store)
        md = comparison_markdown(rows)
        _write_text(store, f"{store.run_dir}/report.md", "# Runs compared (ablations, baselines, generators)\n\n"
                    + md + "\n")
        print(md)
        print(f"comparison: {store.run_dir}/report.md")
    return 0


__all__ = ["write_report", "report_main", "runs_table", "comparison_markdown", "summary_row", "load_run"]
