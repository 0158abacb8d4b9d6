"""A fault-injecting engine for the stage tests: the stub engine plus failures, selected with
engine.kind=custom, engine.factory=faulty_engine:FaultyEngine (the Ray workers of tests/conftest.py's cluster import
it from tests/). Production engines carry no such hooks.

Options ride on the model string like the stub's own: "stub:crash_once=<marker>" kills the actor process the
first time a replica sees the marker file (deleting it); "stub:fail_once=<marker>,fail_when=<dir>" raises
EngineFatalError once, after 3 batches, when <dir> holds 2 shards (it fails the whole Dataset with shards written:
a deterministic stand-in for a crash). A user message containing FAIL_ME fails that request alone.
"""

from __future__ import annotations

import glob
import os
import time

from speed_ray.generate.engine import EngineFatalError, StubEngine, stub_options
from speed_ray.llm.rows import error_result

FAIL_ME = "FAIL_ME"


class FaultyEngine:
    def __init__(self, model: str):
        self.stub = StubEngine(model)
        opts = stub_options(model)
        self.crash_marker, self.fail_marker, self.fail_when = opts.get("crash_once"), opts.get("fail_once"), \
            opts.get("fail_when")
        self.calls = 0

    def generate(self, requests):
        self._maybe_crash()
        self._maybe_fail()
        self.calls += 1
        failing = [any(FAIL_ME in str(m.get("content", "")) for m in r.messages) for r in requests]
        done = iter(self.stub.generate([r for r, f in zip(requests, failing) if not f]))
        return [error_result(f"asked to fail ({FAIL_ME})") if f else next(done) for f in failing]

    def _maybe_fail(self) -> None:
        m = self.fail_marker
        if not m or self.calls < 3 or not os.path.exists(m):
            return
        deadline = time.time() + 120
        while len(glob.glob(os.path.join(self.fail_when or ".", "*.parquet"))) < 2 and time.time() < deadline:
            time.sleep(0.1)
        try:
            os.remove(m)
        except FileNotFoundError:
            return
        raise EngineFatalError("injected failure (fail_once)")

    def _maybe_crash(self) -> None:
        m = self.crash_marker
        if m and os.path.exists(m):
            try:
                os.remove(m)
            except FileNotFoundError:
                return
            os._exit(1)
