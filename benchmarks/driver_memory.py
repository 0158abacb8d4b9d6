"""Driver peak RSS of the synthesis stage (stub engine) at 10K and 100K prompts: rows must never gather in the
driver, so the peak should barely grow with n. Each size runs in a fresh process. Last line: JSON.

    .venv/bin/python benchmarks/driver_memory.py --sizes 10000 100000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, {repo!r})
import ray
ray.init(num_cpus=2, include_dashboard=False)
ray.data.DataContext.get_current().enable_progress_bars = False
from speed_ray.stage import StageContext
from speed_ray.run_config import build_config
from speed_ray.store import RunStore
from speed_ray.generate.stages import synthesis_stage
run_dir = {run_dir!r}
store = RunStore(run_dir)
tasks = store.stage("brainstorm", "fp")
types = ["retrieval", "classification", "matching_short", "matching_long"]
tasks.write_shard("p", [{{"id": f"{{t}}{{i}}", "topic": f"T{{i}}", "task_type": t, "task": f"task {{t}} {{i}}",
                         "lineage": "{{}}"}} for t in types for i in range(50)])
cfg = build_config({{"run": {{"run_dir": run_dir, "seed": 0}}, "synthesis": {{"n_samples": {n}, "shard_size": 2000,
                   "engine": {{"kind": "stub", "model": "stub", "batch_size": 500, "num_cpus_per_replica": 0.5}}}}}})
ctx = StageContext(cfg=cfg, name="synthesis", out=store.stage("synthesis", "fp"), inputs={{"tasks": tasks}},
                   store=store, run_name="b")
t0 = time.time()
man = synthesis_stage(ctx)
print(json.dumps({{"n": {n}, "rows": man["metrics"]["rows"], "wall_s": time.time() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    args = ap.parse_args()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="srmem-") as d:
            code = _CHILD.format(repo=repo, run_dir=os.path.join(d, "run"), n=n)
            env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="srr-"), "HF_HUB_OFFLINE": "1"}
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    peaks = {str(r["n"]): round(r["peak_rss_mb"], 1) for r in results}
    print(json.dumps({"benchmark": "driver_memory", "engine": "stub", "peak_rss_mb": peaks, "runs": results,
                      "ratio": round(results[-1]["peak_rss_mb"] / results[0]["peak_rss_mb"], 3)}))


if __name__ == "__main__":
    main()
