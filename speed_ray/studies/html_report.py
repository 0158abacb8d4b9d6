"""The run report as one self-contained HTML file (runs/<name>/report/report.html, beside report.md): inline CSS,
inline SVG figures and base64 PNGs, no network. It holds the stage timeline (a Gantt chart from the manifests'
started_at/ended_at), the loss curve of every trained model, per-task and per-category scores against the
baselines, the scaling fit and the influence heatmap when the run has them, the cost table and the data-quality
counts (rejects by reason, dedup's removals by reason).

A small inline script marks <body data-figures-ok="true"> once every figure has a nonzero size (and every image
decoded); tests/test_html_report.py reads that back from a headless Chromium.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from typing import Any

from speed_ray.progress import STEPS_LOG, read_steps
from speed_ray.store import RunStore

log = logging.getLogger("speed_ray")

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")

def _trained(run: dict) -> list[str]:
    """The stages that train a model, from the run's plan (plan.json's stage facts; older plans: the variant's)."""
    stages = run["plan"].get("stages", [])
    if stages and all("produces" in s for s in stages):
        return [s["stage"] for s in stages if s["produces"] == "model"]
    from speed_ray.pipeline import build_plan

    return [s.name for s in build_plan(run["plan"].get("variant") or "full") if s.produces == "model"]


CSS = """body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}th,td{border:1px solid #ddd;padding:3px 8px;
text-align:right}th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}figure{margin:1em 0}
figcaption{color:#555;font-size:12px}svg text{font:11px system-ui,sans-serif;fill:#333}.muted{color:#777}
img{max-width:100%}"""

CHECK_JS = """(function(){function check(){var figs=document.querySelectorAll('figure'),bad=[];
figs.forEach(function(f){var el=f.querySelector('svg,img');var r=el?el.getBoundingClientRect():null;
var ok=el&&r.width>0&&r.height>0&&(el.tagName.toLowerCase()!=='img'||(el.complete&&el.naturalWidth>0));
if(!ok)bad.push(f.id||'?');});document.body.setAttribute('data-figures',String(figs.length));
document.body.setAttribute('data-figures-ok',bad.length===0?'true':'false: '+bad.join(','));}
check();window.addEventListener('load',check);})();"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def _num(v: Any, nd: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return _e(v)


def table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, Markup) else _num(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


class Markup(str):
    """Already-escaped HTML in a table cell."""


def figure(fid: str, body: str, caption: str) -> str:
    return f'<figure id="{_e(fid)}">{body}<figcaption>{_e(caption)}</figcaption></figure>'


# ---- SVG charts (pure: data in, markup out) --------------------------------------------------------------------
def svg_gantt(bars: list[tuple[str, float, float]], width: int = 900) -> str:
    """One bar per stage from its start to its end (seconds since the epoch), on a shared time axis."""
    t0 = min(b[1] for b in bars)
    span = max(max(b[2] for b in bars) - t0, 1e-9)
    left, row, top = 130, 22, 10
    plot = width - left - 20
    h = top + row * len(bars) + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" viewBox="0 0 {width} {h}">']
    for i, (name, s, e) in enumerate(bars):
        x, w, y = left + plot * (s - t0) / span, max(1.5, plot * (e - s) / span), top + i * row
        parts.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{_e(name)}</text>'
                     f'<rect x="{x:.1f}" y="{y + 3}" width="{w:.1f}" height="{row - 6}" fill="{COLORS[i % 8]}">'
                     f'<title>{_e(name)}: {e - s:.1f} s</title></rect>'
                     f'<text x="{min(x + w + 4, width - 60):.1f}" y="{y + 14}">{_dur(e - s)}</text>')
    axis_y = top + row * len(bars) + 4
    parts.append(f'<line x1="{left}" x2="{left + plot}" y1="{axis_y}" y2="{axis_y}" stroke="#999"/>')
    for k in range(5):
        x = left + plot * k / 4
        parts.append(f'<text x="{x:.1f}" y="{axis_y + 16}" text-anchor="middle">+{_dur(span * k / 4)}</text>')
    return "".join(parts) + "</svg>"


def _dur(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else (f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s")


def svg_lines(series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, width: int = 640,
              height: int = 300) -> str:
    """Line chart of several series of (x, y) points (the loss curves)."""
    pts = [p for s in series.values() for p in s]
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    left, right, top, bottom = 55, 150, 10, 40
    pw, ph = width - left - right, height - top - bottom

    def xy(x: float, y: float) -> str:
        return f"{left + pw * (x - x0) / (x1 - x0):.1f},{top + ph * (1 - (y - y0) / (y1 - y0)):.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}"><rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" '
             f'stroke="#ccc"/>']
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        yy = top + ph * (1 - k / 4)
        parts.append(f'<text x="{left - 5}" y="{yy + 4:.1f}" text-anchor="end">{yv:.3g}</text>')
        xv = x0 + (x1 - x0) * k / 4
        parts.append(f'<text x="{left + pw * k / 4:.1f}" y="{top + ph + 15}" text-anchor="middle">{xv:.4g}</text>')
    for i, (name, s) in enumerate(series.items()):
        c = COLORS[i % 8]
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.6" points="{" ".join(xy(*p) for p in s)}">'
                     f'<title>{_e(name)}</title></polyline>')
        parts.append(f'<rect x="{width - right + 10}" y="{top + 16 * i}" width="10" height="10" fill="{c}"/>'
                     f'<text x="{width - right + 24}" y="{top + 16 * i + 9}">{_e(name)}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 5}" text-anchor="middle">{_e(xlabel)}</text>'
                 f'<text x="12" y="{top + ph / 2}" transform="rotate(-90 12 {top + ph / 2})" '
                 f'text-anchor="middle">{_e(ylabel)}</text></svg>')
    return "".join(parts)


def svg_bars(labels: list[str], series: dict[str, list[float]], width: int = 720, row: int = 18) -> str:
    """Horizontal grouped bars (scores per task against the baselines, removals per reason)."""
    vmax = max([v for vs in series.values() for v in vs if v is not None] + [1e-9])
    left, right, top = 200, 60, 10
    pw = width - left - right
    group = row * len(series) + 6
    h = top + group * len(labels) + 16 * len(series) + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" viewBox="0 0 {width} {h}">']
    for j, lab in enumerate(labels):
        y = top + j * group
        parts.append(f'<text x="{left - 6}" y="{y + group / 2 + 3:.1f}" text-anchor="end">{_e(lab)}</text>')
        for i, (name, vs) in enumerate(series.items()):
            v = vs[j] if j < len(vs) and vs[j] is not None else 0.0
            w = max(0.0, pw * v / vmax)
            parts.append(f'<rect x="{left}" y="{y + i * row}" width="{w:.1f}" height="{row - 3}" '
                         f'fill="{COLORS[i % 8]}"><title>{_e(name)}: {v:.4g}</title></rect>'
                         f'<text x="{left + w + 4:.1f}" y="{y + i * row + row - 6}">{v:.4g}</text>')
    ly = top + group * len(labels) + 4
    for i, name in enumerate(series):
        parts.append(f'<rect x="{left}" y="{ly + 16 * i}" width="10" height="10" fill="{COLORS[i % 8]}"/>'
                     f'<text x="{left + 14}" y="{ly + 16 * i + 9}">{_e(name)}</text>')
    return "".join(parts) + "</svg>"


# ---- what the run holds -----------------------------------------------------------------------------------------
def _fingerprints(run: dict) -> dict[str, str]:
    return {s["stage"]: s["fingerprint"] for s in run["plan"].get("stages", [])}


def loss_curves(store: RunStore, run: dict) -> dict[str, list[tuple[float, float]]]:
    """Per trained model: (step, loss) from its step log, else from what its manifest or metrics file kept."""
    out = {}
    fps = _fingerprints(run)
    for stage in _trained(run):
        m = run["manifests"].get(stage)
        if stage not in fps or not m:
            continue
        so = store.stage(stage, fps[stage])
        pts: list[tuple[float, float]] = []
        url = f"{so.artifacts_url}/{STEPS_LOG}"
        if store.exists(url):
            with store.fs.open(so._path(url), "r") as f:
                pts = [(float(s["step"]), float(s["loss"])) for s in read_steps(f.read())
                       if isinstance(s.get("loss"), (int, float))]
        if not pts:
            curve = (((m.get("metrics") or {}).get("loss") or {}).get("curve")) or []
            pts = [(float(i + 1), float(v)) for i, v in curve]
        if not pts and store.exists(f"{so.artifacts_url}/train_metrics.json"):
            hist = store.read_json(f"{so.artifacts_url}/train_metrics.json").get("log_history") or []
            pts = [(float(e.get("step", i + 1)), float(e["loss"])) for i, e in enumerate(hist) if "loss" in e]
        if pts:
            out[stage] = pts
    return out


def _scores(run: dict) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """({model label: {task: score}}, {task: category}) of the evaluate stage: this run's model first."""
    ev = run["manifests"].get("evaluate") or {}
    models: dict[str, dict[str, float]] = {}
    types: dict[str, str] = {}
    if ev.get("scores"):
        models[f"{run['name']} (this run)"] = dict(ev["scores"])
    for name, b in (ev.get("baselines") or {}).items():
        models[f"{name} ({b.get('model')})" if b.get("model") else name] = dict(b.get("scores") or {})
    if ev.get("results_path"):
        import fsspec

        try:
            with fsspec.open(ev["results_path"], "r") as f:
                res = json.load(f)
            for m in (res.get("models") or {}).values():
                types.update(m.get("types") or {})
        except (OSError, ValueError):   # no categories: every task counts as "all"
            pass
    return models, types


def _png(store: RunStore, url: str) -> str | None:
    if not store.exists(url):
        return None
    with store.fs.open(url.split("://", 1)[-1] if "://" in url else url, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


# ---- sections ------------------------------------------------------------------------------------------------
def _timeline(run: dict) -> list[str]:
    bars = [(s, float(m["started_at"]), float(m["ended_at"])) for s, m in run["manifests"].items()
            if m and isinstance(m.get("started_at"), (int, float)) and isinstance(m.get("ended_at"), (int, float))]
    if not bars:
        return ["<h2>Timeline</h2><p class=muted>No stage has finished yet.</p>"]
    bars.sort(key=lambda b: b[1])
    return ["<h2>Timeline</h2>", figure("fig-timeline", svg_gantt(bars), "When each stage ran (from its manifest's "
                                        "started_at and ended_at).")]


def _losses(store: RunStore, run: dict) -> list[str]:
    curves = loss_curves(store, run)
    if not curves:
        return []
    out = ["<h2>Training loss</h2>"]
    for stage, pts in curves.items():
        out.append(figure(f"fig-loss-{stage}", svg_lines({stage: pts}, "step", "loss"),
                          f"{stage}: loss per logged step ({len(pts)} points, last {pts[-1][1]:.4f})."))
    return out


def _evaluation(run: dict) -> list[str]:
    models, types = _scores(run)
    if not models:
        return ["<h2>Evaluation</h2><p class=muted>The evaluate stage has not finished.</p>"]
    tasks = sorted({t for s in models.values() for t in s})
    out = ["<h2>Evaluation</h2>", table(["task", "category", *models],
                                         [[t, types.get(t, "–"), *[s.get(t) for s in models.values()]]
                                          for t in tasks])]
    out.append(figure("fig-tasks", svg_bars(tasks, {m: [s.get(t) for t in tasks] for m, s in models.items()}),
                      "Score per task, this run against the baselines."))
    cats = sorted({types.get(t, "all") for t in tasks})
    per_cat = {m: [_mean([s[t] for t in tasks if t in s and types.get(t, "all") == c]) for c in cats]
               for m, s in models.items()}
    out.append(figure("fig-categories", svg_bars(cats, per_cat), "Mean score per task category."))
    return out


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _studies(store: RunStore, name: str) -> list[str]:
    out = []
    for study, pngs in (("sweep", ("scaling.png", "axis.png")), ("influence", ("heatmap.png",
                                                                               "heatmap_by_category.png"))):
        for p in pngs:
            uri = _png(store, store.run_url(name, study, p))
            if uri:
                if not out or not out[-1].startswith(f"<h2>{study.capitalize()}"):
                    out.append(f"<h2>{study.capitalize()}</h2>")
                out.append(figure(f"fig-{study}-{p[:-4]}", f'<img alt="{_e(p)}" src="{uri}">',
                                  f"{study}/{p}" + (" (fit and its bootstrap band)" if p == "scaling.png" else "")))
    return out


def _cost(cost: dict) -> list[str]:
    rows = [[r["stage"], r["rows"], r["calls"], r["total_tokens"], r["cpu_hours"], r["gpu_hours"],
             r.get("total_usd")] for r in cost["stages"]]
    t = cost["total"]
    rows.append([Markup("<b>total</b>"), None, t["calls"], t["total_tokens"], t["cpu_hours"], t["gpu_hours"],
                 t.get("total_usd")])
    return ["<h2>Cost</h2>", table(["stage", "rows", "teacher calls", "tokens", "CPU h", "GPU h", "USD"], rows)]


def _quality(store: RunStore, run: dict) -> list[str]:
    out = []
    d = (run["manifests"].get("dedup") or {}).get("dedup")
    if d:
        reasons = {"exact_duplicate": d.get("exact_duplicates", 0), "near_duplicate": d.get("near_duplicates", 0),
                   **(d.get("filtered") or {})}
        reasons = {k: v for k, v in reasons.items() if v}
        out.append(f"<p>dedup kept {_num(d.get('rows_out'))} of {_num(d.get('rows_in'))} rows; removed "
                   f"{_num(d.get('removed'))}.</p>")
        if reasons:
            labels = sorted(reasons, key=lambda k: -reasons[k])
            out.append(figure("fig-dedup", svg_bars(labels, {"removed rows": [float(reasons[k]) for k in labels]}),
                              "Rows dedup removed, by reason."))
    for stage, m in run["manifests"].items():
        rr = (m or {}).get("reject_reasons")
        if isinstance(rr, dict) and any(rr.values()):
            labels = sorted(rr, key=lambda k: -rr[k])[:12]
            out.append(figure(f"fig-rejects-{stage}", svg_bars(labels, {"rejects": [float(rr[k]) for k in labels]}),
                              f"{stage}: rejects by reason."))
    sc = next((m for m in run["manifests"].values() if m and isinstance(m.get("screen"), dict)), None)
    if sc:
        removed = {k: v for k, v in (sc["screen"].get("removed") or {}).items() if v}
        if removed:
            labels = sorted(removed, key=lambda k: -removed[k])
            out.append(figure("fig-screen", svg_bars(labels, {"removed rows": [float(removed[k]) for k in labels]}),
                              f"The screen removed {_num(sum(removed.values()))} of {_num(sc['screen'].get('rows_in'))}"
                              " rows, by reason."))
        changed = {k: v for k, v in (sc["screen"].get("actions") or {}).items() if v}
        if changed:
            labels = sorted(changed, key=lambda k: -changed[k])
            bars = svg_bars(labels, {"kept rows": [float(changed[k]) for k in labels]})
            out.append(figure("fig-screen-actions", bars,
                              f"The screen kept {_num(sum(changed.values()))} rows with their negative changed: "
                              "removed (trained as a pair), re-mined in the batch or mined from the corpus."))
        uri = _png(store, store.run_url(run["name"], "report", "quality.png"))
        if uri:
            out.append(figure("fig-quality", f'<img alt="guide scores per task type" src="{uri}">',
                              "The guide's scores per task type: p05-p95, p25-p75 and the median."))
    return (["<h2>Data quality</h2>"] + out) if out else []


def html_report(store: RunStore, run: dict, cost: dict, summary: dict, stage_rows: list[list[Any]]) -> str:
    """The whole page as a string."""
    body = [f"<h1>Run report: {_e(run['name'])}</h1>",
            f"<p>Variant <code>{_e(summary.get('variant'))}</code>, generator {_e(summary.get('generator'))}, "
            f"run dir <code>{_e(store.run_dir)}</code>. Average {_num(summary.get('average'))}"
            + (f" (paper {_num(summary.get('paper'), 1)})" if summary.get("paper") is not None else "") + ".</p>",
            "<h2>Stages</h2>", table(["stage", "state", "rows", "secs", "teacher calls", "tokens"], stage_rows)]
    body += _timeline(run) + _losses(store, run) + _evaluation(run) + _studies(store, run["name"])
    body += _cost(cost) + _quality(store, run)
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>Run report: " + _e(run["name"])
            + f"</title><style>{CSS}</style></head><body>" + "\n".join(body)
            + f"<script>{CHECK_JS}</script></body></html>\n")


def write_html_report(store: RunStore, run: dict, cost: dict, summary: dict, url: str) -> str:
    from speed_ray.studies.sweep import _write_text

    rows = []
    for stage, m in run["manifests"].items():
        c = (m or {}).get("cost") or {}
        rows.append([stage, "done" if m else "pending", (m or {}).get("rows"),
                     float(m["duration_s"]) if m and m.get("duration_s") is not None else None,
                     c.get("calls"), c.get("total_tokens")])
    _write_text(store, url, html_report(store, run, cost, summary, rows))
    return url
