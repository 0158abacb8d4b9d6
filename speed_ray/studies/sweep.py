"""The scaling-law sweep (SPEED Sec. 4.4, Fig. 4) and one-setting alignment-factor grids (Fig. 3, Tables 3-4).

A grid over data size x extra axes x seeds. The shared upstream stages (everything before train_embedder) run once
per distinct upstream config in the driver; only the per-point stages (train_embedder, evaluate) fan out as Ray
tasks. The store is content-addressed, so finished points are skipped and an interrupted sweep resumes point by point.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from speed_ray.config import to_dict
from speed_ray.pipeline import Loader, build_plan, fingerprints, load_stage, plan_status, run_pipeline
from speed_ray.run_config import RunConfig, load_config, replace
from speed_ray.store import RunStore, stable_hash

log = logging.getLogger("speed_ray")

PER_POINT = ("train_embedder", "evaluate")     # the stages that depend on the point's data size / category subset


@dataclass
class Point:
    """One grid point: its label (run name), the overrides that make its config, and its coordinates."""

    name: str
    overrides: list[str]
    n: int | None
    seed: int
    axes: dict[str, Any] = field(default_factory=dict)

    @property
    def setting(self) -> str:
        """The point's axis setting (what one fitted curve shares), e.g. 'synthesis.temperature=0.2'."""
        return ", ".join(f"{k}={v}" for k, v in self.axes.items()) or "all"


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", str(value)).strip("_")[:40] or "x"


def grid_points(cfg: RunConfig) -> list[Point]:
    """sizes x axes x seeds, in a stable order; names are '<run>-n<N>[-<axis><value>]-s<seed>'."""
    sw = cfg.sweep
    keys = list(sw.axes)
    for k in keys:
        if not sw.axes[k]:
            from speed_ray.config import ConfigError

            raise ConfigError("an axis needs at least one value", f"sweep.axes.{k}")
    points = []
    for n, combo, seed in itertools.product(sw.sizes, itertools.product(*[sw.axes[k] for k in keys]), sw.seeds):
        axes = dict(zip(keys, combo))
        parts = [cfg.run.name, f"n{n}"] + [f"{k.split('.')[-1]}{_slug(v)}" for k, v in axes.items()] + [f"s{seed}"]
        overrides = [f"embedder.n_samples={n}", f"run.seed={seed}"] + [f"{k}={_yaml(v)}" for k, v in axes.items()]
        points.append(Point("-".join(parts), overrides, n, seed, axes))
    return points


def _yaml(v: Any) -> str:
    import json

    return json.dumps(v) if not isinstance(v, str) else v


def point_config(cfg: RunConfig, point: Point) -> RunConfig:
    return replace(cfg, point.overrides + [f"run.name={point.name}"])


# ---- running points -------------------------------------------------------------------------------------------------

def upstream_stages(cfg: RunConfig) -> list[str]:
    return [s.name for s in build_plan(cfg.pipeline.variant) if s.name not in PER_POINT]


def upstream_key(cfg: RunConfig) -> str:
    """Points with equal keys share every upstream stage output."""
    fps = fingerprints(cfg, build_plan(cfg.pipeline.variant))
    return stable_hash([fps[s] for s in upstream_stages(cfg)])


def pool_rows(cfg: RunConfig) -> int | None:
    """Rows of the finished stage that feeds train_embedder (the synthesized pool the points subsample)."""
    plan = {s.name: s for s in build_plan(cfg.pipeline.variant)}
    up = plan["train_embedder"].inputs["data"]
    out = RunStore(cfg.run.run_dir).stage(up, fingerprints(cfg, list(plan.values()))[up])
    return int(out.manifest.get("rows", 0)) if out.done else None


def _run_point(cfg_dict: dict, stages: list[str], loader: Loader | None = None) -> dict:
    """Run one point's per-point stages (in a Ray task or in the driver) with the caller's stage loader (None: the
    real stages, imported where the point runs)."""
    from speed_ray.run_config import build_config

    cfg = build_config(cfg_dict, "sweep point")
    return run_pipeline(cfg, stages=stages, loader=loader or load_stage)


def point_slots(max_concurrent: int, num_cpus: float, trainer_cpus: float, total_cpus: float) -> tuple[int, float]:
    """How many points may be in flight, and the CPUs each point task reserves, so the trainers the points start
    (which request their own CPUs) can always be placed. E.g. a 2-CPU Ray with 1 CPU per point task and 1 per
    trainer worker runs one point at a time instead of deadlocking with two tasks holding both CPUs."""
    if total_cpus and num_cpus + trainer_cpus > total_cpus:
        log.warning("sweep: a point needs %.2g CPU(s) + %.2g for its trainer but the cluster has %.2g; the point "
                    "task reserves %.2g instead", num_cpus, trainer_cpus, total_cpus,
                    max(0.0, total_cpus - trainer_cpus))
        num_cpus = max(0.0, total_cpus - trainer_cpus)
    footprint = num_cpus + trainer_cpus
    if not total_cpus or footprint <= 0:   # an autoscaling cluster with nothing up yet: trust the config
        return max_concurrent, num_cpus
    fit = max(1, int(total_cpus // footprint))
    if fit < max_concurrent:
        log.warning("sweep: max_concurrent=%d points do not fit in %.2g CPUs (%.2g each); running %d at a time",
                    max_concurrent, total_cpus, footprint, fit)
    return min(max_concurrent, fit), num_cpus


def _slots(max_concurrent: int, num_cpus: float, cfg: RunConfig) -> tuple[int, float]:
    import ray

    emb = cfg.embedder
    return point_slots(max_concurrent, num_cpus, 0.0 if emb.use_gpu else float(emb.num_workers),
                       float(ray.cluster_resources().get("CPU", 0.0)))


def run_points(cfgs: list[RunConfig], max_concurrent: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0,
               run_upstream: bool = True, loader: Loader | None = None) -> list[dict]:
    """Run each config: its upstream stages once per distinct upstream config (in the driver, in order), then its
    per-point stages, as Ray tasks with at most max_concurrent in flight. Returns each config's run summary
    (stage states: ran / skipped). Points already finished run nothing. `loader` (default: the real stages) goes
    with each point to where it runs."""
    if not cfgs:
        return []
    first = cfgs[0]
    seen: set[str] = set()
    for cfg in cfgs if run_upstream else []:
        key = upstream_key(cfg)
        if key not in seen:
            log.info("sweep: upstream stages for %s (%s)", cfg.run.name, key)
            run_pipeline(cfg, stages=upstream_stages(cfg), loader=loader or load_stage)
            seen.add(key)
    results: list[dict | None] = [None] * len(cfgs)
    todo = []
    for i, cfg in enumerate(cfgs):
        status = [r for r in plan_status(cfg) if r["stage"] in PER_POINT]
        stages = [r["stage"] for r in status]
        if all(r["state"] == "done" for r in status):
            results[i] = run_pipeline(cfg, stages=stages)   # all skipped; writes the point's plan/summary
        else:
            todo.append((i, cfg, stages))
    if not todo:
        return results  # type: ignore[return-value]
    if max_concurrent == 1 and not num_gpus:
        slots, cpus = 1, num_cpus     # sequential on the driver: the stages start Ray themselves when they need it
    else:
        from speed_ray.raylocal import ensure_ray

        ensure_ray(first.run.ray_address, first.run.num_cpus)
        slots, cpus = _slots(max_concurrent, num_cpus, first)
    if slots == 1 and not num_gpus:
        for i, cfg, stages in todo:   # one at a time on the driver's CPU: no task needed (a GPU point needs one)
            log.info("sweep: point %s", cfg.run.name)
            results[i] = _run_point(to_dict(cfg), stages, loader)
        return results  # type: ignore[return-value]
    import ray

    remote = ray.remote(_run_point).options(num_cpus=cpus, num_gpus=num_gpus, max_retries=0)
    pending: dict[Any, int] = {}
    queue = list(todo)
    errors = []
    while queue or pending:
        while queue and len(pending) < slots:
            i, cfg, stages = queue.pop(0)
            log.info("sweep: point %s -> Ray task", cfg.run.name)
            pending[remote.remote(to_dict(cfg), stages, loader)] = i
        ready, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready[0])
        try:
            results[i] = ray.get(ready[0])
        except Exception as e:  # keep the other points running; finished ones are in the store
            errors.append(f"{cfgs[i].run.name}: {e}")
    if errors:
        from speed_ray.stage import StageError

        raise StageError(f"{len(errors)} sweep point(s) failed (finished points are kept; rerun to resume):\n"
                         + "\n".join(errors))
    return results  # type: ignore[return-value]


# ---- analysis --------------------------------------------------------------------------------------------------------

def collect(cfgs: list[RunConfig], points: list[Point]) -> list[dict]:
    """Each point's coordinates and evaluation scores from its evaluate manifest."""
    out = []
    for cfg, p in zip(cfgs, points):
        rows = {r["stage"]: r for r in plan_status(cfg)}
        ev = rows["evaluate"]["manifest"] or {}
        tr = rows["train_embedder"]["manifest"] or {}
        data = (tr.get("metrics") or {}).get("data") or {}
        out.append({"name": p.name, "n": p.n, "seed": p.seed, "axes": p.axes, "setting": p.setting,
                    "scores": ev.get("scores", {}), "average": (ev.get("averages") or {}).get("average"),
                    "rows_used": data.get("rows_selected"), "evaluate_fingerprint": rows["evaluate"]["fingerprint"],
                    "state": "done" if ev else "missing"})
    return out


def fit_settings(points: list[dict], n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Per axis setting: mean over seeds per size, the log-linear and power-law fits with CIs, 2x/10x predictions,
    and the plotting bands. Settings with too few sizes get a reason instead of a fit."""
    from speed_ray.studies.scaling import fit_note, fit_with_bootstrap

    out: dict[str, dict] = {}
    for setting in dict.fromkeys(p["setting"] for p in points):
        pts = [p for p in points if p["setting"] == setting and p["scores"]]
        tasks = sorted(set.intersection(*[set(p["scores"]) for p in pts])) if pts else []
        sizes = sorted({p["n"] for p in pts})
        mat = np.array([[np.mean([p["scores"][t] for p in pts if p["n"] == n]) for t in tasks] for n in sizes])
        entry: dict[str, Any] = {"sizes": sizes, "tasks": tasks,
                                 "means": mat.mean(axis=1).tolist() if tasks else [], "fits": {}, "bands": {}}
        for kind, need in (("loglinear", 2), ("power", 3)):
            if len(sizes) < need or not tasks:
                entry["fits"][kind] = {"skipped": f"needs {need} distinct sizes with scores, got {len(sizes)}"}
                continue
            try:
                fit, band = fit_with_bootstrap(sizes, mat, kind, n_boot=n_boot, seed=seed)
            except ValueError as e:
                entry["fits"][kind] = {"skipped": str(e)}
                continue
            entry["fits"][kind] = {"params": fit.params, "r2": fit.r2, "ci": fit.ci, "predictions": fit.predictions,
                                   "note": fit_note(kind, fit.params)}
            entry["bands"][kind] = band
        out[setting] = entry
    return out


def _fit_objects(entry: dict):
    from speed_ray.studies.scaling import Fit

    return {k: Fit(k, f["params"], f["r2"], f["ci"], f["predictions"]) for k, f in entry["fits"].items()
            if "params" in f}


def unit_costs(cfg: RunConfig) -> dict[str, float] | None:
    """Unit cost (hours of the stages with cost_role "unit", per synthesized sample) and fixed cost (the "fixed"
    stages: aligning the generators), in GPU-or-CPU hours, from a point's upstream manifests."""
    roles = {s.name: s for s in build_plan(cfg.pipeline.variant)}
    rows = {r["stage"]: r["manifest"] for r in plan_status(cfg) if r["manifest"]}
    hours = lambda m: float(m.get("cost", {}).get("gpu_hours", 0.0)) + float(m.get("cost", {}).get("cpu_hours", 0.0))  # noqa: E731
    synth = [s for s in rows if roles[s].cost_role == "unit"]
    produced = max((rows[s].get("rows", 0) for s in synth if roles[s].generator_role == "synthesizer"), default=0)
    if not produced:
        return None
    fixed_stages = [s for s in rows if roles[s].cost_role == "fixed"]
    return {"unit": sum(hours(rows[s]) for s in synth) / produced, "fixed": sum(hours(rows[s]) for s in fixed_stages),
            "fixed_stages": fixed_stages, "unit_stages": synth, "produced": produced}


# ---- outputs ---------------------------------------------------------------------------------------------------------

def write_outputs(store: RunStore, run_name: str, points: list[dict], fits: dict[str, dict],
                  costs: dict | None = None) -> dict[str, str]:
    """runs/<name>/sweep/{points.json, fits.json, scaling.png (+ one PNG per further setting), sweep.md}."""
    from speed_ray.studies.cost import cost_per_point
    from speed_ray.studies.plots import axis_plot, scaling_plot

    base = store.run_url(run_name, "sweep")
    paths = {"points": f"{base}/points.json", "fits": f"{base}/fits.json", "markdown": f"{base}/sweep.md"}
    store.write_json(paths["points"], points)
    store.write_json(paths["fits"], {k: {kk: vv for kk, vv in v.items() if kk != "bands"} | {"bands": v["bands"]}
                                     for k, v in fits.items()})
    md = [f"# Sweep: {run_name}", "", "| point | N | seed | setting | rows used | average |", "|---|---|---|---|---|---|"]
    for p in points:
        avg = f"{p['average']:.2f}" if isinstance(p["average"], (int, float)) else "–"
        md.append(f"| {p['name']} | {p['n']} | {p['seed']} | {p['setting']} | {p['rows_used'] or '–'} | {avg} |")
    for i, (setting, entry) in enumerate(fits.items()):
        md += ["", f"## {setting}", ""]
        objs = _fit_objects(entry)
        if objs:
            png = "scaling.png" if i == 0 else f"scaling-{_slug(setting)}.png"
            paths[png] = _local_png(store, f"{base}/{png}", lambda path: scaling_plot(
                path, entry["sizes"], entry["means"], objs, {k: entry["bands"][k] for k in objs}, title=setting))
            md.append(f"![scaling]({png})")
            md.append("")
        md += ["| fit | parameters (95% CI over tasks) | R² | pred. 2x | pred. 10x |", "|---|---|---|---|---|"]
        for kind, f in entry["fits"].items():
            if "params" not in f:
                md.append(f"| {kind} | {f['skipped']} | | | |")
                continue
            ps = ", ".join(f"{k}={v:.3g} [{f['ci'][k][0]:.3g}, {f['ci'][k][1]:.3g}]" if k in f["ci"] else
                           f"{k}={v:.3g}" for k, v in f["params"].items())
            pr = {m: f["predictions"][m] for m in ("2x", "10x") if m in f["predictions"]}
            cell = lambda d: f"{d['mean']:.2f} [{d['lo']:.2f}, {d['hi']:.2f}] at N={d['n']:.0f}" if d else "–"  # noqa: E731
            note = f" ({f['note']})" if f.get("note") else ""
            md.append(f"| {kind} | {ps}{note} | {f['r2']:.3f} | {cell(pr.get('2x'))} | {cell(pr.get('10x'))} |")
        if costs and entry["sizes"]:
            md += ["", f"Cost per point (fixed {costs['fixed']:.3f} h from {', '.join(costs['fixed_stages']) or '–'}, "
                       f"unit {costs['unit']:.3g} h/sample from {', '.join(costs['unit_stages'])}):", "",
                   "| N | average | cost (h) | marginal h / point |", "|---|---|---|---|"]
            for r in cost_per_point([{"n": n, "score": s} for n, s in zip(entry["sizes"], entry["means"])],
                                    costs["fixed"], costs["unit"]):
                mc = r["marginal_cost_per_point"]
                md.append(f"| {r['n']} | {r['score']:.2f} | {r['cost']:.3f} | {'–' if mc is None else f'{mc:.3g}'} |")
    single = [s for s, e in fits.items() if len(e["sizes"]) == 1]
    if len(single) > 1:   # a one-setting grid: score against the axis value
        paths["axis.png"] = _local_png(store, f"{base}/axis.png", lambda path: axis_plot(
            path, single, [fits[s]["means"][0] if fits[s]["means"] else math.nan for s in single],
            title=f"N={fits[single[0]]['sizes'][0]}"))
        md += ["", "![axis](axis.png)"]
    _write_text(store, paths["markdown"], "\n".join(md) + "\n")
    return paths


def _write_text(store: RunStore, url: str, text: str) -> None:
    import fsspec

    with fsspec.open(url, "w", auto_mkdir=True) as f:
        f.write(text)


def _local_png(store: RunStore, url: str, draw) -> str:
    """Draw to a local file, then copy to the run dir (matplotlib writes local paths only)."""
    import os
    import tempfile

    import fsspec

    with tempfile.TemporaryDirectory() as d:
        tmp = os.path.join(d, "plot.png")
        draw(tmp)
        with open(tmp, "rb") as src, fsspec.open(url, "wb", auto_mkdir=True) as dst:
            dst.write(src.read())
    return url


def run_sweep(cfg: RunConfig, loader: Loader | None = None) -> dict[str, Any]:
    """Run (or resume) the grid, fit, plot, and write the outputs. Returns points, fits, paths and point states.
    `loader`: the stage functions (default: the real ones)."""
    points = grid_points(cfg)
    cfgs = [point_config(cfg, p) for p in points]
    log.info("sweep %s: %d point(s)", cfg.run.name, len(points))
    # Upstream first, so the pool size is known before any point trains on a subset it does not have.
    done_keys: set[str] = set()
    keep_cfgs, keep_points, too_big = [], [], []
    for c, p in zip(cfgs, points):
        key = upstream_key(c)
        if key not in done_keys:
            run_pipeline(c, stages=upstream_stages(c), loader=loader or load_stage)
            done_keys.add(key)
        pool = pool_rows(c)
        if pool is not None and p.n is not None and p.n > pool:
            too_big.append(f"{p.name} (N={p.n} > {pool} rows in the pool)")
            continue
        keep_cfgs.append(c)
        keep_points.append(p)
    if too_big:
        log.warning("sweep: skipping %d point(s) larger than the synthesized pool; raise synthesis.n_samples: %s",
                    len(too_big), "; ".join(too_big))
    summaries = run_points(keep_cfgs, cfg.sweep.max_concurrent, cfg.sweep.num_cpus_per_point,
                           cfg.sweep.num_gpus_per_point, run_upstream=False, loader=loader)
    collected = collect(keep_cfgs, keep_points)
    for row, s in zip(collected, summaries):
        row["stages"] = {k: v["state"] for k, v in s["stages"].items() if k in PER_POINT}
    fits = fit_settings(collected, cfg.sweep.n_bootstrap, cfg.run.seed)
    store = RunStore(cfg.run.run_dir)
    paths = write_outputs(store, cfg.run.name, collected, fits, unit_costs(keep_cfgs[0]) if keep_cfgs else None)
    return {"points": collected, "fits": fits, "paths": paths, "skipped_points": too_big}


def sweep_main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, list(getattr(args, "overrides", None) or []))
    logging.getLogger("speed_ray").setLevel(cfg.run.log_level)
    res = run_sweep(cfg)
    print(f"sweep {cfg.run.name}: {len(res['points'])} point(s)")
    for setting, e in res["fits"].items():
        for kind, f in e["fits"].items():
            if "params" in f:
                p10 = f["predictions"].get("10x", {})
                ps = ", ".join(f"{k}={v:.4g}" for k, v in f["params"].items())
                print(f"  [{setting}] {kind}: {ps}; R2={f['r2']:.3f}; at 10x N: {p10.get('mean', float('nan')):.2f} "
                      f"[{p10.get('lo', float('nan')):.2f}, {p10.get('hi', float('nan')):.2f}]"
                      + (f"\n      note: {f['note']}" if f.get("note") else ""))
    print(f"outputs: {res['paths']['markdown']}")
    return 0
