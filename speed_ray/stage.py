"""What a stage function is given (the stage's side of the orchestrator's contract).

Stage modules (teacher, generate, align, dedup, embedder, evaluate, studies) import StageContext from here, never
from the orchestrator (speed_ray.pipeline), so no arrow runs from a stage back up to the pipeline that runs it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from speed_ray.store import CostLedger, RunStore, StageOutput

log = logging.getLogger("speed_ray.pipeline")


class StageError(RuntimeError):
    """A stage failed; what it already wrote stays in the store for the next run to resume from."""


class Services:
    """Long-lived helpers that stages of one pipeline run share (the local teacher server): started once by the
    first stage that asks, stopped by the orchestrator when the run ends, whatever its outcome."""

    def __init__(self):
        self._lock = threading.RLock()   # a starter may read other services
        self._values: dict[str, Any] = {}
        self._stops: list[tuple[str, Callable[[], None]]] = []

    def get(self, key: str, start: Callable[[], Any], stop: Callable[[], None] | None = None) -> Any:
        """The value under key, starting it (once, under a lock: concurrent stages share it) when absent."""
        with self._lock:
            if key not in self._values:
                self._values[key] = start()
                if stop is not None:
                    self._stops.append((key, stop))
            return self._values[key]

    def setdefault(self, key: str, value: Any) -> Any:
        with self._lock:
            return self._values.setdefault(key, value)

    def stop_all(self) -> None:
        """Stop every started service, newest first; a failure is logged, never raised (the run's own outcome
        must not be masked)."""
        with self._lock:
            stops, self._stops = self._stops[::-1], []
            for key, stop in stops:
                try:
                    stop()
                    log.info("stopped %s", key)
                except Exception as e:
                    log.warning("could not stop %s: %s", key, e)
                self._values.pop(key, None)


@dataclass
class StageContext:
    """What a stage function gets: its config, its output dir, its inputs by role, a cost ledger, and the run's
    shared services. When the pipeline runs a stage, cfg is a speed_ray.config_view.ConfigView of the RunConfig:
    it reads like one and records which settings the stage reads."""

    cfg: Any                      # a RunConfig (or a ConfigView of one)
    name: str
    out: StageOutput
    inputs: dict[str, StageOutput]
    store: RunStore
    run_name: str
    ledger: CostLedger = field(default_factory=CostLedger)
    services: Services = field(default_factory=Services)

    def log(self, msg: str, *args: Any) -> None:
        log.info(f"[{self.name}] " + msg, *args)
