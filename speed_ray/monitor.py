"""The driver-side progress monitor: a thread per running stage that polls the stage's output in the store and
renders one line per interval (a tqdm bar on a terminal, plain lines otherwise) and appends the same line to
`runs/<name>/progress.log`. No stage needs a hook: what a stage wrote is its progress (speed_ray/progress.py).

SPEED_RAY_PROGRESS=0 turns it off; SPEED_RAY_PROGRESS_INTERVAL sets the seconds between lines (default 10).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from typing import Any, Iterator

import pyarrow.parquet as pq

from speed_ray.errors import DataError
from speed_ray.llm.shards import rejects_output
from speed_ray.progress import (DEDUP_STEPS, STAT_COLUMNS, STEPS_LOG, Expectation, Progress, ShardStats,
                                expectation, format_line, progress_record, read_steps, shard_stats)
from speed_ray.store import RunStore, StageOutput

log = logging.getLogger("speed_ray.progress")

_positions: list[int] = []          # tqdm rows taken by the bars of stages that run together
_positions_lock = threading.Lock()


class Snapshot:
    """Reads a stage's output into progress inputs; shards already read are not read again (they are written
    once, atomically), so each poll reads only the new ones."""

    def __init__(self, out: StageOutput):
        self.out = out
        self.rejects = rejects_output(out)
        self._cache: dict[str, ShardStats] = {}

    def _stats(self, view: StageOutput, is_rej: bool) -> list[ShardStats]:
        out = []
        for name in view.shard_names():
            key = f"{is_rej}/{name}"
            if key not in self._cache:
                try:
                    with view.fs.open(view._path(view.shard_url(name)), "rb") as f:
                        pf = pq.ParquetFile(f)
                        cols = [c for c in STAT_COLUMNS if c in pf.schema_arrow.names]
                        self._cache[key] = shard_stats(pf.read(columns=cols), rejects=is_rej) if cols else \
                            ShardStats(pf.metadata.num_rows, pf.metadata.num_rows)
                except (OSError, ValueError):     # vanished (a forced re-run moved it) or unreadable: skip it
                    continue
            out.append(self._cache[key])
        return out

    def steps(self) -> list[dict]:
        path = self.out._path(f"{self.out.artifacts_url}/{STEPS_LOG}")
        try:
            with self.out.fs.open(path, "r") as f:
                return read_steps(f.read())
        except (OSError, ValueError):
            return []

    def markers(self) -> int:
        fs = self.out.fs
        return sum(fs.exists(self.out._path(f"{self.out.artifacts_url}/steps/{s}.json")) for s in DEDUP_STEPS)

    def record(self, exp: Expectation, elapsed_s: float, done_at_start: int = 0,
               usd_per_mtok: tuple[float, float] | None = None) -> Progress:
        stage = self.out.stage
        if exp.counted_by == "markers":
            return progress_record(stage, exp, elapsed_s, markers=self.markers(), done_at_start=done_at_start)
        if exp.counted_by == "step_log":
            return progress_record(stage, exp, elapsed_s, steps=self.steps(), done_at_start=done_at_start)
        return progress_record(stage, exp, elapsed_s, self._stats(self.out, False), self._stats(self.rejects, True),
                               done_at_start=done_at_start, usd_per_mtok=usd_per_mtok)


def stage_expectation(cfg_dict: dict, stage: str, inputs: dict[str, StageOutput], unit: str = "rows",
                      counted_by: str = "rows") -> Expectation:
    rows = {}
    for role, up in inputs.items():
        try:
            rows[role] = int(up.manifest.get("rows", 0))
        except (OSError, ValueError):
            pass
    return expectation(stage, cfg_dict, rows, unit, counted_by)


def append_line(store: RunStore, url: str, line: str) -> None:
    """Append a line to a local file; a remote run directory's file is rewritten whole (no append there)."""
    fs, path = store.fs, url.split("://", 1)[-1] if "://" in url else url
    if "://" not in store.run_dir:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f:
            f.write(line + "\n")
        return
    old = ""
    if fs.exists(path):
        with fs.open(path, "r") as f:
            old = f.read()
    with fs.open(path, "w") as f:
        f.write(old + line + "\n")


def started_url(out: StageOutput) -> str:
    return f"{out.artifacts_url}/progress/started.json"


def progress_log_url(store: RunStore, run_name: str) -> str:
    return store.run_url(run_name, "progress.log")


def enabled() -> bool:
    return os.environ.get("SPEED_RAY_PROGRESS", "1") != "0"


def interval_s() -> float:
    return float(os.environ.get("SPEED_RAY_PROGRESS_INTERVAL", "10"))


class StageMonitor:
    """One thread per running stage: every interval, a snapshot -> a Progress -> a line (tqdm on a TTY)."""

    def __init__(self, out: StageOutput, exp: Expectation, log_url: str, store: RunStore,
                 usd_per_mtok: tuple[float, float] | None = None, interval: float | None = None,
                 stream: Any = None):
        self.snap, self.exp, self.log_url, self.store = Snapshot(out), exp, log_url, store
        self.usd_per_mtok = usd_per_mtok
        self.interval = interval if interval is not None else interval_s()
        self.stream = stream or sys.stderr
        self.t0 = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None
        self._pos: int | None = None
        self.done_at_start = 0
        self.last: Progress | None = None

    def _tick(self, state: str = "running") -> Progress:
        p = self.snap.record(self.exp, time.time() - self.t0, self.done_at_start, self.usd_per_mtok)
        if state != "running":
            from dataclasses import replace

            p = replace(p, state=state, eta_s=None)
        self.last = p
        line = format_line(p)
        try:
            append_line(self.store, self.log_url, f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}")
        except OSError as e:
            log.debug("could not write %s: %s", self.log_url, e)
        self._render(p, line)
        return p

    def _render(self, p: Progress, line: str) -> None:
        if not (hasattr(self.stream, "isatty") and self.stream.isatty()):
            print(line, file=self.stream, flush=True)
            return
        from tqdm import tqdm

        from speed_ray.progress import details

        if self._bar is None:
            with _positions_lock:
                self._pos = next(i for i in range(len(_positions) + 1) if i not in _positions)
                _positions.append(self._pos)
            self._bar = tqdm(total=p.total, desc=p.stage, unit=f" {p.unit}", position=self._pos, file=self.stream,
                             dynamic_ncols=True, leave=True, initial=p.done,
                             bar_format="{desc} {n_fmt}/{total_fmt}{unit} |{bar:20}| {percentage:3.0f}%{postfix}")
        self._bar.total = p.total
        self._bar.n = p.done
        self._bar.set_postfix_str(details(p), refresh=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._tick()
            except Exception as e:  # noqa: BLE001 - progress is best effort; the stage's outcome is what counts
                log.debug("progress poll failed: %s", e)

    def start(self) -> "StageMonitor":
        try:
            self.done_at_start = self.snap.record(self.exp, 0.0).done
            # for `speed-ray status --watch` in another process: when this run of the stage began, from where
            self.store.write_json(started_url(self.snap.out), {"started_at": self.t0, "done_at_start":
                                                              self.done_at_start, "unit": self.exp.unit,
                                                              "total": self.exp.total})
        except Exception as e:  # noqa: BLE001
            log.debug("progress start for %s: %s", self.snap.out.stage, e)
        self._thread = threading.Thread(target=self._loop, name=f"progress-{self.snap.out.stage}", daemon=True)
        self._thread.start()
        return self

    def stop(self, state: str) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self._tick(state)
        except Exception as e:  # noqa: BLE001
            log.debug("final progress poll failed: %s", e)
        if self._bar is not None:
            self._bar.close()
            with _positions_lock:
                _positions.remove(self._pos)


@contextlib.contextmanager
def watch(cfg: Any, out: StageOutput, inputs: dict[str, StageOutput], store: RunStore, run_name: str,
          uses_teacher: bool = False, unit: str = "rows", counted_by: str = "rows") -> Iterator[StageMonitor | None]:
    """Around a stage's run: its progress every interval, and a last line with how it ended. uses_teacher, unit and
    counted_by are the stage's StageSpec facts."""
    if not enabled():
        yield None
        return
    from speed_ray.config import to_dict
    from speed_ray.pricing import teacher_price

    try:
        exp = stage_expectation(to_dict(cfg), out.stage, inputs, unit, counted_by)
        price = teacher_price(cfg.teacher.model, cfg.pricing) if uses_teacher else None
        mon = StageMonitor(out, exp, progress_log_url(store, run_name), store, price).start()
    except Exception as e:  # noqa: BLE001 - never keep a stage from running
        log.debug("no progress monitor for %s: %s", out.stage, e)
        yield None
        return
    state = "failed"
    try:
        yield mon
        state = "done"
    finally:
        mon.stop(state)


# ---- a run seen from another process (`speed-ray status RUN_DIR --watch`) -------------------------------------
def _mtime(store: RunStore, url: str) -> float | None:
    try:
        info = store.fs.info(url.split("://", 1)[-1] if "://" in url else url)
    except (OSError, ValueError):
        return None
    m = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    return m.timestamp() if hasattr(m, "timestamp") else (float(m) if m is not None else None)


class RunWatch:
    """The progress of a run started elsewhere, from its run directory alone: plan.json and config.yaml say what
    it runs and how many of each unit; each unfinished stage's output says how far it got."""

    def __init__(self, store: RunStore, run_name: str):
        import yaml

        from speed_ray.config import from_dict
        from speed_ray.pricing import PricingConfig, teacher_price

        self.store, self.run_name = store, run_name
        plan_url = store.run_url(run_name, "plan.json")
        if not store.exists(plan_url):
            raise FileNotFoundError(f"no run {run_name!r} in {store.run_dir} (no {plan_url})")
        try:
            self.plan = store.read_json(plan_url)
        except ValueError as e:
            raise DataError(f"{plan_url} is not valid JSON: {e}") from e
        cfg_url = store.run_url(run_name, "config.yaml")
        self.cfg: dict = {}
        if store.exists(cfg_url):
            with store.fs.open(cfg_url.split("://", 1)[-1] if "://" in cfg_url else cfg_url, "r") as f:
                self.cfg = yaml.safe_load(f) or {}
        t = self.cfg.get("teacher") or {}
        self.price = teacher_price(t.get("model") or "", from_dict(PricingConfig, self.cfg.get("pricing") or {})) \
            if t.get("model") else None
        self.snaps: dict[str, Snapshot] = {}

    def stages(self) -> list[dict]:
        return self.plan.get("stages", [])

    def finished(self) -> bool:
        """Every planned stage done, or the run's summary written after its plan (a run of some --stages)."""
        if all(self.store.stage(s["stage"], s["fingerprint"]).done for s in self.stages()):
            return True
        sm = _mtime(self.store, self.store.run_url(self.run_name, "summary.json"))
        pm = _mtime(self.store, self.store.run_url(self.run_name, "plan.json"))
        return sm is not None and pm is not None and sm >= pm

    def records(self, now: float | None = None) -> list[Progress | dict]:
        """Per planned stage: a Progress (running, or done with its manifest's numbers) or {"stage", "state":
        "pending"}."""
        now = now or time.time()
        out: list[Progress | dict] = []
        for s in self.stages():
            so = self.store.stage(s["stage"], s["fingerprint"])
            if so.done:
                try:
                    m = so.manifest
                except ValueError as e:
                    raise DataError(f"{so.manifest_url} is not valid JSON (a corrupt manifest): {e}") from e
                exp = Expectation(s.get("unit", "rows"), None, s.get("counted_by", "rows"))
                snap = self.snaps.get(s["stage"])
                if snap is not None:     # it was running while we watched: its last counts, marked done
                    from dataclasses import replace

                    p = snap.record(exp, float(m.get("duration_s") or 0), usd_per_mtok=self._price(s))
                    out.append(replace(p, state="done", rate=None, eta_s=None, total=p.total or p.done))
                else:
                    out.append(Progress(s["stage"], "rows", int(m.get("rows") or 0), None,
                                        float(m.get("duration_s") or 0), state="done"))
                continue
            started = self._started(so)
            if started is None and not so.shard_names():
                out.append({"stage": s["stage"], "state": "pending"})
                continue
            inputs = {role: self.store.stage(up, next((x["fingerprint"] for x in self.stages()
                                                        if x["stage"] == up), ""))
                      for role, up in (s.get("inputs") or {}).items()}
            exp = stage_expectation(self.cfg, s["stage"], {r: o for r, o in inputs.items() if o.done},
                                    s.get("unit", "rows"), s.get("counted_by", "rows"))
            snap = self.snaps.setdefault(s["stage"], Snapshot(so))
            t0 = (started or {}).get("started_at") or now
            out.append(snap.record(exp, max(0.0, now - t0), int((started or {}).get("done_at_start") or 0),
                                   self._price(s)))
        return out

    def _price(self, entry: dict) -> tuple[float, float] | None:
        """The teacher's prices for a stage that calls it (plan.json's uses_teacher)."""
        return self.price if entry.get("uses_teacher") else None

    def _started(self, so: StageOutput) -> dict | None:
        url = started_url(so)
        try:
            return self.store.read_json(url) if self.store.exists(url) else None
        except (OSError, ValueError):
            return None

    def last_activity(self) -> float | None:
        """When the run's driver last wrote a progress line (None: no progress log)."""
        return _mtime(self.store, progress_log_url(self.store, self.run_name))


def watch_frame(w: RunWatch, now: float | None = None) -> list[str]:
    """The lines `status --watch` shows for one run."""
    now = now or time.time()
    lines = [f"run {w.run_name} ({w.plan.get('variant')})  {time.strftime('%H:%M:%S', time.localtime(now))}"]
    for r in w.records(now):
        lines.append("  " + (format_line(r) if isinstance(r, Progress) else f"{r['stage']} [pending]"))
    last = w.last_activity()
    if last is not None and not w.finished() and now - last > max(60.0, 6 * interval_s()):
        lines.append(f"  (no progress line for {now - last:.0f}s: the run may have stopped; "
                     f"see {progress_log_url(w.store, w.run_name)})")
    return lines
