"""The HTML report (runs/<name>/report/report.html) over a fake-stage run directory with real manifests, step logs,
study PNGs and a dedup's removals, opened in a real headless Chromium: no console errors, every figure rendered
(the page's own check sets <body data-figures-ok="true">), and a screenshot saved to tests/artifacts/report.png.
Chromium comes from scripts/setup.sh (apt-get, as root); without it the browser tests skip saying so."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import studies_fakes
from speed_ray import pipeline
from speed_ray.run_config import build_config
from speed_ray.studies.html_report import svg_bars, svg_gantt, svg_lines
from speed_ray.studies.report import write_report

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (scripts/setup.sh installs "
                                                              "Debian's chromium when run as root with apt-get)")


def _stage(ctx) -> dict:
    """studies_fakes' stage, plus what real stages also leave: step logs, rejects by reason, dedup's removals,
    a baseline's scores."""
    from speed_ray.steplog import StepLog, steps_url

    extra = studies_fakes.fake_stage(ctx)
    if ctx.name in ("junior_sft", "senior_dpo", "train_embedder"):
        log = StepLog(steps_url(ctx.out.artifacts_url), min_interval_s=0)
        for s in range(1, 21):
            log.log(s, 20, loss=2.5 / (1 + 0.2 * s) + (0.05 if s % 3 == 0 else 0.0))
    if ctx.name == "synthesis":
        extra["reject_reasons"] = {"no_json": 7, "truncated": 3, "schema": 1}
    if ctx.name == "dedup":
        extra["dedup"] = {"rows_in": 60, "rows_out": 50, "removed": 10, "exact_duplicates": 4,
                          "near_duplicates": 3, "filtered": {"too_short": 2, "degenerate_task": 1}}
    if ctx.name == "evaluate":
        extra["baselines"] = {"base": {"model": "offline:minilm", "scores": {t: s - 3.0 for t, s in
                                                                             extra["scores"].items()}}}
    return extra


def _run(tmp_path) -> tuple[str, Path]:
    from speed_ray.studies.plots import axis_plot, bar_plot

    cfg = build_config({"run": {"name": "full", "run_dir": str(tmp_path / "run")}, "synthesis": {"n_samples": 50},
                        "pipeline": {"variant": "full", "paper_result": 63.2}})
    pipeline.run_pipeline(cfg, loader=lambda fn: _stage)
    runs = tmp_path / "run" / "runs" / "full"
    (runs / "sweep").mkdir()
    (runs / "influence").mkdir()
    axis_plot(str(runs / "sweep" / "scaling.png"), ["1k", "2k", "4k"], [55.0, 57.5, 59.0], "scaling")
    bar_plot(str(runs / "influence" / "heatmap.png"), ["retrieval", "sts"], {"SciFact": [1.0, -0.5]}, "influence")
    md = write_report(cfg.run.run_dir, "full")
    return md, Path(md).with_name("report.html")


def test_html_report_holds_every_section_and_needs_no_network(tmp_path):
    _, page = _run(tmp_path)
    text = page.read_text()
    for part in ("fig-timeline", "fig-loss-junior_sft", "fig-loss-senior_dpo", "fig-loss-train_embedder",
                 "fig-tasks", "fig-categories", "fig-sweep-scaling", "fig-influence-heatmap", "fig-dedup",
                 "fig-rejects-synthesis", "<h2>Cost</h2>", "base (offline:minilm)", "SciFact", "Retrieval",
                 "near_duplicate", "degenerate_task"):
        assert part in text, part
    assert text.count("data:image/png;base64,") == 2
    # self-contained: nothing is fetched (no http(s) URL in a src/href, no external stylesheet or script)
    assert not re.search(r'(src|href)="(https?:)?//', text) and "<link" not in text


def test_svg_charts_are_pure_markup():
    g = svg_gantt([("a", 100.0, 160.0), ("b", 160.0, 400.0)])
    assert g.count("<rect") == 2 and "4.0 min" in g
    lines = svg_lines({"loss": [(1, 2.0), (2, 1.5), (3, 1.0)]}, "step", "loss")
    assert "<polyline" in lines and lines.count(",") >= 3
    bars = svg_bars(["x", "y"], {"m": [1.0, None]})
    assert bars.count("<rect") == 3       # two bars (a missing value draws an empty one) and the legend's swatch


def _chromium(url: str, *args: str, tmp: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={tmp / 'chrome-profile'}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=3000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


def _console(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]


@needs_chromium
def test_html_report_renders_in_headless_chromium(tmp_path):
    _, page = _run(tmp_path)
    dom = _chromium(page.as_uri(), "--dump-dom", tmp=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _console(dom.stderr) == [], _console(dom.stderr)
    figures = int(re.search(r'data-figures="(\d+)"', dom.stdout).group(1))
    assert figures >= 10 and 'data-figures-ok="true"' in dom.stdout, re.search(r"<body[^>]*>", dom.stdout)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    res = _chromium(page.as_uri(), f"--screenshot={shot}", "--window-size=1200,5400", tmp=tmp_path)
    assert res.returncode == 0 and shot.stat().st_size > 20_000, res.stderr[-2000:]
    assert _console(res.stderr) == []


@needs_chromium
def test_the_browser_check_catches_a_broken_page(tmp_path):
    """The harness itself: a script error reaches stderr, an undecodable image fails the page's figure check."""
    from speed_ray.studies.html_report import CHECK_JS

    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><figure id="f1"><img src="data:image/png;base64,AAAA"></figure>'
                    f'<script>{CHECK_JS}</script><script>undefinedFunction()</script></body></html>')
    dom = _chromium(page.as_uri(), "--dump-dom", tmp=tmp_path)
    assert 'data-figures-ok="false: f1"' in dom.stdout
    assert any("undefinedFunction" in ln for ln in _console(dom.stderr)), dom.stderr[-2000:]
