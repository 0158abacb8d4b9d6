"""Paper scale on one machine: the pipeline's own stage functions at SPEED's counts (1.15M raw samples) on a real
two-node Ray cluster started here, with stand-ins for the models: a fake OpenAI-compatible teacher, the tiny Llama
for the aligned generators, the stub engine for generation.

    .venv/bin/python benchmarks/paper_scale.py --sizes 100000 1150000     # the measurement
    .venv/bin/python benchmarks/paper_scale.py --quick                    # 20K rows, kills included
    .venv/bin/python benchmarks/paper_scale.py --stages dedup --sizes 100000 --keep /tmp/ps
    .venv/bin/python benchmarks/paper_scale.py --quick --stages brainstorm,seed_data,judge,revise_signals

Stages, in the default order (each reads the one before it from the same run directory):
  teacher    brainstorm, seed_data, judge, revise_signals: the teacher stages against tests/fake_openai.py, served
             from this process at 300 ms a request with 2% 429s (Retry-After: 1) and 1% 5xx (500/503), rolled per
             request arrival from a seed, answering each kind of request with valid JSON (the responder of
             tests/test_teacher_stages.py). SPEED's teacher work at n=1.15M: 20K topics brainstormed (4 calls each:
             STS takes E5's fixed task), 25K D_seed calls, 10K judge lists, 10K revisions; scaled with n, with a
             floor (TEACHER_FLOOR) so each stage does real work at --quick. brainstorm reads topics sampled from
             the IAB taxonomy, judge and revise_signals a synthetic finished root_data stage (per prompt: 3 valid
             outputs and one that does not parse, as the junior writes them).
  alignment  junior_sft (on seed_data), senior_dpo (on judge, from the junior), revisor_sft (on revise_signals):
             ALIGN_STEPS steps of the tiny Llama on Ray Train, one worker per node. What is measured is preparing
             all rows (the driver builds the examples, each worker tokenizes them), not training quality.
  generation synthesis, revision (the stub engine), dedup, embedder (a few MiniLM steps on the deduplicated rows).

Per stage and size: rows/s (the stage's own rows: teacher requests, training examples, else n), wall time, the
driver's peak RSS (its own ru_maxrss: each stage runs in a fresh driver process), the largest Ray worker's peak RSS
(psutil over the raylets' descendants, sampled), object-store spill (`ray memory` stats and the spill directories'
size); teacher stages also their calls, HTTP attempts, retries and valid share, and what the server saw (429s,
5xx, peak in flight); the teacher and alignment stages' output ids are checked against their input's after the
run. Kill runs (synthesis, revision and dedup at the smallest size, unless --kill-stages / --kill-sizes): the
driver is SIGKILLed at a random point of the stage, rerun, and the ids of the output are compared with the input's
(lost, duplicated), and with the uninterrupted run's. Prints ONE JSON line last, with the 1.15M/100K ratios and the
goals: driver peak <= 1.5 GiB and <= 1.2x from the smallest to the largest size, no worker above 3 GiB, 0 lost,
0 duplicated.

Stages are plain functions in STAGES (`name -> Stage(child, ids_in, ids_out, ...)`): to add one, write its
child-side runner (builds the StageContext, runs the stage function) and how to list its input and output ids,
and register it; the driver, the sampling, the kills and the report are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GIB = 1024 ** 3
DRIVER_LIMIT_MB = 1536
WORKER_LIMIT_MB = 3072
DRIVER_RATIO_LIMIT = 1.2
SEED = 0
TASK_TYPES = ("retrieval", "classification", "matching_short", "matching_long", "sts", "bitext")

# The teacher's work in SPEED at n = 1.15M raw samples: 20K topics brainstormed, and 45K calls (25K D_seed, 10K
# judge lists, 10K revisions); scaled with n, never below the floor (--quick must still exercise each stage).
PAPER_N = 1_150_000
TEACHER_PAPER = {"brainstorm": 20_000, "seed_data": 25_000, "judge": 10_000, "revise_signals": 10_000}
TEACHER_FLOOR = {"brainstorm": 100, "seed_data": 500, "judge": 500, "revise_signals": 500}
BRAINSTORM_TYPES = ("retrieval", "classification", "matching_short", "matching_long", "sts")   # SPEED's five
TEACHER_LATENCY_S, TEACHER_P429, TEACHER_P5XX = 0.3, 0.02, 0.01
TEACHER_CONCURRENCY = 128      # 45K calls at 300 ms: >= 2 minutes at 128 in flight (the CPU sets the real pace)
ROOT_K = 4                     # outputs per root prompt (paper: 4 per prompt)
ALIGN_STEPS = 3


def teacher_counts(n: int) -> dict[str, int]:
    """Topics to brainstorm, D_seed calls, judge lists, revisions at size n."""
    return {k: max(TEACHER_FLOOR[k], round(v * n / PAPER_N)) for k, v in TEACHER_PAPER.items()}


# ---- the cluster -----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    """Two nodes on one host (and other Ray clusters beside them) must not share agent/metrics ports."""
    return [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
            f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}"]


class Cluster:
    """`ray start --head` + `ray start --address` on loopback, with their own temp dir, ports and auth token.
    stop() ends only the processes of this cluster (found by its temp dir and GCS port)."""

    def __init__(self, head_cpus: int, worker_cpus: int, object_store_mb: int):
        self.temp = tempfile.mkdtemp(prefix="srps-")
        self.gcs = _free_port()
        self.address = f"127.0.0.1:{self.gcs}"
        self.head_cpus, self.worker_cpus, self.object_store_mb = head_cpus, worker_cpus, object_store_mb
        ray_bin = str(Path(sys.executable).parent / "ray")
        self.env = {**os.environ, "RAY_TMPDIR": self.temp, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "SPEED_RAY_PROGRESS": "0",
                    "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        store = f"--object-store-memory={object_store_mb * 1024 * 1024}"
        self.head_cmd = [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs}",
                         f"--num-cpus={head_cpus}", f"--temp-dir={self.temp}", "--include-dashboard=false",
                         "--disable-usage-stats", f"--ray-client-server-port={_free_port()}", store, *_node_ports()]
        self.worker_cmd = [ray_bin, "start", f"--address={self.address}", "--node-ip-address=127.0.0.1",
                           f"--num-cpus={worker_cpus}", "--disable-usage-stats", store, *_node_ports()]

    def start(self) -> None:
        """The head, then the worker node. The worker's `ray start` needs only the head's GCS, which answers about
        half-way through the head's start (its raylet and agents come after): it starts then, and if it fails
        there it is run again once the head is up."""
        def run(cmd: list[str]) -> subprocess.Popen:
            return subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def check(proc: subprocess.Popen, cmd: list[str]) -> tuple[int, str]:
            out, err = proc.communicate(timeout=300)
            return proc.returncode, f"{' '.join(cmd[:3])} failed:\n{out[-2000:]}\n{err[-2000:]}"

        head = run(self.head_cmd)
        deadline = time.time() + 120
        while head.poll() is None and time.time() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.gcs)) == 0:
                    break
            time.sleep(0.2)
        worker = run(self.worker_cmd)
        rc, msg = check(head, self.head_cmd)
        if rc == 0:
            rc, msg = check(worker, self.worker_cmd)
            if rc != 0:   # too early for the GCS after all: again, now that the head is up
                rc, msg = check(run(self.worker_cmd), self.worker_cmd)
        else:
            worker.kill()
            worker.communicate()
        if rc != 0:
            self.stop()
            raise RuntimeError(msg)

    @staticmethod
    def reap_stale() -> list[int]:
        """SIGKILL what is left of earlier benchmark clusters whose GCS is gone (a run killed with SIGKILL leaves
        its Ray agents behind): processes whose open files lie in a srps- temp dir without a live gcs_server."""
        import psutil

        by_dir: dict[str, list] = {}
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                paths = [f.path for f in p.open_files()] + list(p.info["cmdline"] or [])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            for path in paths:
                i = path.find("/srps-")
                if i >= 0 and "/srps-run-" not in path:
                    by_dir.setdefault(path[:i + 1] + path[i + 1:].split("/", 1)[0], []).append(p)
                    break
        killed = []
        for _, procs in by_dir.items():
            alive_gcs = any("gcs_server" in " ".join(p.info["cmdline"] or []) for p in procs)
            if not alive_gcs:
                for p in procs:
                    try:
                        p.kill()
                        killed.append(p.pid)
                    except psutil.NoSuchProcess:
                        pass
        return killed

    def processes(self) -> list:
        import psutil

        procs = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmd = p.info["cmdline"] or []
                if any(self.temp in part or f":{self.gcs}" in part for part in cmd):
                    procs.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return procs

    def raylets(self) -> list:
        return [p for p in self.processes() if any("raylet" in part for part in (p.info["cmdline"] or [])[:1])]

    def spill_bytes(self) -> int:
        total = 0
        for root, _, files in os.walk(self.temp):
            if "spill" in root:
                for f in files:
                    try:
                        total += os.path.getsize(os.path.join(root, f))
                    except OSError:
                        pass
        return total

    def stop(self) -> None:
        import psutil

        procs = {p.pid: p for p in self.processes()}
        for r in list(procs.values()):   # the raylets' workers carry no temp dir in their (renamed) cmdline
            try:
                procs.update({c.pid: c for c in r.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
        for p in procs.values():
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(procs.values()), timeout=5)   # gcs and raylets can take 20+ s
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(self.temp, ignore_errors=True)


class Sampler:
    """Samples, every `period` s, the RSS of every descendant of the cluster's raylets (the Ray workers; agents
    counted apart), the driver's, and the spill directories' size; keeps the peaks since the last reset()."""

    def __init__(self, cluster: Cluster, period: float = 0.5):
        self.cluster, self.period = cluster, period
        self.driver_pid: int | None = None
        self.progress: Callable[[dict], None] | None = None   # called with snapshot() every ~10 s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._raylets = cluster.raylets()
        self.reset()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        import psutil

        base = {}
        for r in self._raylets:   # CPU the workers already had counts against the stage before
            try:
                for p in r.children(recursive=True):
                    t = p.cpu_times()
                    base[p.pid] = t.user + t.system
            except psutil.NoSuchProcess:
                pass
        with getattr(self, "_lock", threading.Lock()):
            self.worker_peak = {"rss_mb": 0.0, "name": ""}
            self.worker_private_peak_mb = 0.0
            self.workers_private_sum_peak_mb = 0.0
            self.workers_peak = 0
            self.agent_peak_mb = 0.0
            self.driver_peak_mb = 0.0
            self.spill_peak_bytes = 0
            self.samples = 0
            self._cpu_base, self._cpu_last = base, {}

    def _run(self) -> None:
        import psutil

        tick = 0
        while not self._stop.is_set():
            tick += 1
            procs = []
            for r in self._raylets:
                try:
                    procs += r.children(recursive=True)
                except psutil.NoSuchProcess:
                    pass
            top, top_name, agents, private, private_sum, n_workers = 0.0, "", 0.0, 0.0, 0.0, 0
            cpu = {}
            for p in procs:
                try:
                    mem = p.memory_info()
                    name = " ".join(p.cmdline()[:2])[:80]
                    t = p.cpu_times()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                rss = mem.rss / 2 ** 20
                if "agent" in name or "runtime_env" in name:
                    agents = max(agents, rss)
                    continue
                cpu[p.pid] = t.user + t.system
                # rss counts the object-store pages a worker reads (shared with the plasma store); rss - shared
                # is what the worker itself holds (what Ray's memory monitor counts)
                private = max(private, (mem.rss - mem.shared) / 2 ** 20)
                private_sum += (mem.rss - mem.shared) / 2 ** 20
                n_workers += 1
                if rss > top:
                    top, top_name = rss, name
            drv = 0.0
            if self.driver_pid:
                try:
                    drv = psutil.Process(self.driver_pid).memory_info().rss / 2 ** 20
                except psutil.NoSuchProcess:
                    pass
            spill = self.cluster.spill_bytes() if tick % 20 == 0 else 0
            with self._lock:
                if top > self.worker_peak["rss_mb"]:
                    self.worker_peak = {"rss_mb": round(top, 1), "name": top_name}
                self.agent_peak_mb = max(self.agent_peak_mb, agents)
                self.worker_private_peak_mb = max(self.worker_private_peak_mb, private)
                self.workers_private_sum_peak_mb = max(self.workers_private_sum_peak_mb, private_sum)
                self.workers_peak = max(self.workers_peak, n_workers)
                self._cpu_last.update(cpu)
                self.driver_peak_mb = max(self.driver_peak_mb, drv)
                self.spill_peak_bytes = max(self.spill_peak_bytes, spill)
                self.samples += 1
            if tick % 20 == 0 and self.progress is not None:
                try:
                    self.progress(self.snapshot())
                except Exception:  # noqa: BLE001 - progress notes are best effort
                    pass
            self._stop.wait(self.period)

    def snapshot(self) -> dict:
        with self._lock:
            cpu_s = sum(v - self._cpu_base.get(pid, 0.0) for pid, v in self._cpu_last.items())
            return {"worker_peak_rss_mb": self.worker_peak["rss_mb"], "worker_peak_process": self.worker_peak["name"],
                    "worker_peak_private_mb": round(self.worker_private_peak_mb, 1),
                    "workers_cpu_s": round(cpu_s, 1),
                    "workers_peak_count": self.workers_peak,
                    "workers_private_sum_peak_mb": round(self.workers_private_sum_peak_mb, 1),
                    "agent_peak_rss_mb": round(self.agent_peak_mb, 1),
                    "driver_sampled_peak_rss_mb": round(self.driver_peak_mb, 1),
                    "spill_dir_peak_mb": round(max(self.spill_peak_bytes, self.cluster.spill_bytes()) / 2 ** 20, 1),
                    "samples": self.samples}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ---- the child driver: one stage in a fresh process ----------------------------------------------------------------
def _config(run_dir: str, n: int, dup: float, teacher_url: str | None = None):
    from speed_ray.run_config import build_config

    engine = {"kind": "stub", "batch_size": 1000, "num_cpus_per_replica": 0.5, "replicas_min": 1, "replicas_max": 2}
    counts = teacher_counts(n)
    # the aligned generators: a few steps of the tiny Llama, one Ray Train worker per node; what is measured is the
    # data preparation (examples built by the driver, tokenized by each worker), not the model
    align = {"base_model": "offline:tiny-llama", "lora": False, "learning_rate": 1e-3, "batch_size": 4,
             "per_device_batch_size": 2, "num_workers": 2, "max_steps": ALIGN_STEPS, "save_steps": ALIGN_STEPS,
             "max_length": 2048}
    return build_config({
        "run": {"run_dir": run_dir, "seed": SEED, "name": "paper_scale"},
        # the teacher: the benchmark's fake server (the parent's), one teacher_map actor (an aiohttp client keeps
        # 128 requests in flight on a fraction of a core). Not one per node: on these 1-CPU nodes two actors take
        # 0.25 CPU of each, and the 1-CPU ListFiles task of judge's and revise_signals' read_parquet then fits on
        # no node (seen: revise_signals waited forever)
        "teacher": {"model": "fake-gpt-4o", "base_url": teacher_url, "concurrency": TEACHER_CONCURRENCY,
                    "num_actors": 1, "request_batch_size": 64, "json_mode": "json_object", "timeout_s": 30.0},
        "topics": {"n_topics": counts["brainstorm"]},
        "brainstorm": {"task_types": list(BRAINSTORM_TYPES), "tasks_per_topic": 1},
        "seed_data": {"n_samples": counts["seed_data"]},
        "judge": {"n_lists": counts["judge"]},
        "revise_signals": {"n_samples": counts["revise_signals"]},
        "junior_sft": align, "senior_dpo": {**align, "beta": 0.1}, "revisor_sft": align,
        "synthesis": {"n_samples": n, "shard_size": 2000,
                      "engine": {**engine, "model": f"stub:dup={dup},rows={n}"}},
        "revision": {"shard_size": 2000, "engine": {**engine, "model": "stub:corpus=1"}},
        # dedup and filters: the config defaults (SPEED: MinHash 0.8, 128 permutations, query + positive)
        # the embedder: a few steps of MiniLM on the deduplicated rows, one Ray Train worker per node; what is
        # measured is the feed (triples, plan, epoch files) and the per-step reads, not the model
        "embedder": {"base_model": "offline:minilm", "lora": False, "pooling": "mean", "batch_size": 32,
                     "mini_batch_size": 0, "num_workers": 2, "max_steps": 4, "save_steps": 2, "warmup_steps": 0,
                     "max_query_length": 32, "max_doc_length": 32, "one_task_per_batch": True},
    })


def _tasks_output(store):
    """A finished brainstorm stage: 50 tasks per task type (the prompts draw from it)."""
    out = store.stage("brainstorm", "paper-scale")
    if not out.done:
        out.write_shard("part-0", [{"id": f"t-{t}-{i}", "topic": f"Topic {i}", "task_type": t,
                                    "task": f"Retrieve {t} documents about subject {i}.",
                                    "lineage": json.dumps({"topic": f"Topic {i}"})}
                                   for t in TASK_TYPES for i in range(50)])
        out.write_manifest({"rows": 50 * len(TASK_TYPES)})
    return out


def _fp(n: int, kill: bool) -> str:
    return f"n{n}-kill" if kill else f"n{n}"


def _done(store, stage: str, n: int):
    """The finished output of an earlier stage of this benchmark run (the stage that reads it needs it)."""
    out = store.stage(stage, _fp(n, False))
    if not out.done:
        raise SystemExit(f"no finished {stage} output at n={n} in {store.run_dir}: run --stages {stage} first "
                         f"(with the same --keep directory)")
    return out


def teacher_responder() -> Callable[[dict], str]:
    """The fake teacher's answers: the responder of tests/test_teacher_stages.py (valid JSON for each kind of SPEED
    request), except that a revision is a sample of the revised prompt's own task type (the tests' responder
    answers STS keys for every revision) and brainstormed tasks carry no test marker."""
    if str(REPO / "tests") not in sys.path:
        sys.path.insert(0, str(REPO / "tests"))
    from test_teacher_stages import POISON, responder

    head, sep = "A language model has been given a prompt: ", "\n\nThe output generated by the model is: "

    def respond(body: dict) -> str:
        user = next((m.get("content") or "" for m in reversed(body["messages"]) if m.get("role") == "user"), "")
        if user.startswith(head) and sep in user:      # revise: {"reason", "revision": <a sample of that task>}
            inner = responder({"messages": [{"role": "user", "content": user[len(head):user.index(sep)]}]})
            return json.dumps({"reason": f"revised {len(user)}", "revision": json.loads(inner)})
        return responder(body).replace(f" {POISON}", "")

    return respond


def _topics_output(store, n: int):
    """A finished topics stage: teacher_counts(n)["brainstorm"] topics drawn from the IAB taxonomy."""
    out = store.stage("topics", _fp(n, False))
    if not out.done:
        from speed_ray.teacher.taxonomy import load_taxonomy
        from speed_ray.teacher.topics import sample_topics

        rows = sample_topics(load_taxonomy("iab", None), teacher_counts(n)["brainstorm"], SEED)
        for k in range(0, len(rows), 5000):
            out.write_shard(f"part-{k // 5000:05d}", rows[k:k + 5000])
        out.write_manifest({"topics": len(rows)})
    return out


def _root_output(store, n: int):
    """A finished root_data stage (D_root, what the junior writes): teacher_counts(n)["judge"] synthesis prompts
    over the brainstorm types, each for its own task and topic (no two judge or revise requests alike, so none is
    a cache hit), with ROOT_K outputs, the last one not a sample; the columns judge and revise_signals read.
    Written in 1000-row shards (the driver never holds all of it)."""
    out = store.stage("root_data", _fp(n, False))
    if out.done:
        return out
    from speed_ray.synth.parsing import canonical_json, parse_sample
    from speed_ray.synth.prompts import synthesis_messages
    from speed_ray.synth.samples import lineage_extend, stable_id

    respond = teacher_responder()
    total = teacher_counts(n)["judge"]
    for start in range(0, total, 1000):
        rows = []
        for i in range(start, min(total, start + 1000)):
            tt = BRAINSTORM_TYPES[i % len(BRAINSTORM_TYPES)]
            t = {"task": f"Retrieve {tt} documents about subject {i}.", "topic": f"Topic {i}",
                 "lineage": json.dumps({"topic": f"Topic {i}"})}
            msgs, params = synthesis_messages(tt, t["task"], random.Random(i), t["topic"])
            outputs = [respond({"messages": msgs[:-1] + [{**msgs[-1], "content": f"{msgs[-1]['content']} #{j}"}]})
                       for j in range(ROOT_K - 1)] + ["I'm afraid this sample did not come out right."]
            parsed = [parse_sample(o, tt) for o in outputs]
            rows.append({"id": stable_id("root", SEED, i), "task_type": tt, "task": t["task"],
                         "prompt": json.dumps(msgs, ensure_ascii=False), "prompt_params": json.dumps(params),
                         "outputs": outputs, "samples": [canonical_json(p.sample) if p.ok else "" for p in parsed],
                         "generator": "junior:paper-scale",
                         "lineage": lineage_extend(t["lineage"], generator="junior:paper-scale"),
                         "valid": True, "n_valid": sum(p.ok for p in parsed)})
        out.write_shard(f"part-{start // 1000:05d}", rows)
    out.write_manifest({"rows": total, "samples_per_prompt": ROOT_K})
    return out


def _teacher_child(ctx_for, name: str, inputs: dict, fn) -> dict:
    ctx = ctx_for(name, inputs)
    return {**fn(ctx), "ledger": ctx.ledger.as_dict()}


def child_brainstorm(ctx_for, n: int, kill: bool):
    from speed_ray.teacher.stages import brainstorm_stage

    return _teacher_child(ctx_for, "brainstorm", {"topics": _topics_output(ctx_for.store, n)}, brainstorm_stage)


def child_seed_data(ctx_for, n: int, kill: bool):
    from speed_ray.teacher.stages import seed_data_stage

    return _teacher_child(ctx_for, "seed_data", {"tasks": _done(ctx_for.store, "brainstorm", n)}, seed_data_stage)


def child_judge(ctx_for, n: int, kill: bool):
    from speed_ray.teacher.stages import judge_stage

    return _teacher_child(ctx_for, "judge", {"root": _root_output(ctx_for.store, n)}, judge_stage)


def child_revise_signals(ctx_for, n: int, kill: bool):
    from speed_ray.teacher.stages import revise_signals_stage

    return _teacher_child(ctx_for, "revise_signals", {"root": _root_output(ctx_for.store, n)},
                          revise_signals_stage)


def _align_child(ctx_for, name: str, inputs: dict, fn) -> dict:
    src = inputs.get("data") or inputs["pairs"]
    return {**fn(ctx_for(name, inputs)), "rows_in": len(_ids(src))}


def child_junior_sft(ctx_for, n: int, kill: bool):
    from speed_ray.align.stages import junior_sft_stage

    return _align_child(ctx_for, "junior_sft", {"data": _done(ctx_for.store, "seed_data", n)}, junior_sft_stage)


def child_senior_dpo(ctx_for, n: int, kill: bool):
    from speed_ray.align.stages import senior_dpo_stage

    store = ctx_for.store
    return _align_child(ctx_for, "senior_dpo", {"pairs": _done(store, "judge", n),
                                                "reference": _done(store, "junior_sft", n)}, senior_dpo_stage)


def child_revisor_sft(ctx_for, n: int, kill: bool):
    from speed_ray.align.stages import revisor_sft_stage

    return _align_child(ctx_for, "revisor_sft", {"data": _done(ctx_for.store, "revise_signals", n)},
                        revisor_sft_stage)


def child_synthesis(ctx_for, n: int, kill: bool):
    from speed_ray.generate.stages import synthesis_stage

    return synthesis_stage(ctx_for("synthesis", {"tasks": _tasks_output(ctx_for.store)}))


def child_revision(ctx_for, n: int, kill: bool):
    from speed_ray.generate.stages import revision_stage

    return revision_stage(ctx_for("revision", {"samples": ctx_for.store.stage("synthesis", _fp(n, False))}))


def child_dedup(ctx_for, n: int, kill: bool):
    from speed_ray.dedup.stage import dedup_stage

    return dedup_stage(ctx_for("dedup", {"samples": ctx_for.store.stage("revision", _fp(n, False))}))


def child_embedder(ctx_for, n: int, kill: bool):
    from speed_ray.embedder.stage import train_embedder_stage

    return train_embedder_stage(ctx_for("train_embedder", {"data": ctx_for.store.stage("dedup", _fp(n, False))}))


def run_child(stage: str, run_dir: str, address: str, n: int, dup: float, kill: bool,
              teacher_url: str | None = None) -> None:
    """In the child driver process: connect to the cluster, run one stage function, print one JSON line."""
    import ray

    from speed_ray.stage import StageContext
    from speed_ray.store import RunStore

    ray.init(address=address, log_to_driver=False, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = _config(run_dir, n, dup, teacher_url)
    store = RunStore(run_dir)
    if STAGES[stage].prepare is not None:   # synthetic inputs, before the stage's clock starts
        STAGES[stage].prepare(store, n)

    def ctx_for(name, inputs):
        return StageContext(cfg=cfg, name=name, out=store.stage(name, _fp(n, kill)), inputs=inputs, store=store,
                            run_name="paper_scale")

    ctx_for.store = store
    print("STAGE_START", flush=True)
    t0 = time.time()
    man = STAGES[stage].child(ctx_for, n, kill)
    wall = time.time() - t0
    out = store.stage(STAGES[stage].name or stage, _fp(n, kill))
    out.write_manifest({"stage": stage, **(man or {})})
    spilled_mib = None
    try:
        from ray._private.internal_api import memory_summary

        import re

        m = re.search(r"Spilled (\d+) MiB", memory_summary(address, stats_only=True))
        spilled_mib = int(m.group(1)) if m else 0
    except Exception:  # noqa: BLE001 - the stats are a nicety
        pass
    summary = _summary(stage, man)
    if stage == "dedup":   # the sub-steps' wall times (the kept pass is the rest)
        from speed_ray.dedup.stage import STEPS
        from speed_ray.store import StepMarkers as _Steps

        marks = {name: (_Steps(out).get(name) or {}).get("wall_s") for name in STEPS}
        summary["steps_wall_s"] = {**marks, "kept": round(wall - sum(v or 0 for v in marks.values()), 3)}
    ru = resource.getrusage(resource.RUSAGE_SELF)
    rows = STAGES[stage].rows(man or {}) if STAGES[stage].rows is not None else n
    print(json.dumps({"stage": stage, "n": n, "rows": rows, "wall_s": wall,
                      "driver_cpu_s": ru.ru_utime + ru.ru_stime,
                      "driver_peak_rss_mb": ru.ru_maxrss / 1024,
                      "spilled_mib": spilled_mib, "summary": summary}), flush=True)


def _summary(stage: str, man: dict | None) -> dict:
    man = man or {}
    if stage in TEACHER_STAGES:
        led = man.get("ledger") or {}
        calls, attempts = led.get("calls", 0), led.get("http_attempts", 0)
        return {"requests": man.get("requests"), "calls": calls, "http_attempts": attempts,
                "retries": attempts - calls, "cached_calls": led.get("cached_calls"),
                "failed_calls": led.get("failed_calls"), "tokens": led.get("total_tokens"),
                "answered": man.get("answered"), "valid": man.get("valid"), "rejected": man.get("rejected"),
                "pending": man.get("pending"), "valid_share": man.get("valid_rate"),
                "parse_rate": man.get("parse_rate"), "reject_reasons": man.get("reject_reasons"),
                "failed_errors": man.get("failed_errors")}
    if stage in ALIGN_STAGES:
        m = man.get("metrics") or {}
        return {"rows_in": man.get("rows_in"), "rows_prepared": man.get("train_examples"),
                "skipped_rows": man.get("skipped_rows"),
                "examples_dropped_too_long": m.get("examples_dropped_too_long"),
                "steps": m.get("global_step"), "world_size": m.get("world_size"),
                "train_runtime_s": m.get("train_runtime"), "first_loss": m.get("first_loss"),
                "last_loss": m.get("last_loss")}
    if stage == "dedup":
        d = man.get("dedup", {})
        return {k: d.get(k) for k in ("rows_in", "rows_out", "removed", "exact_duplicates", "near_duplicates",
                                      "clusters", "filtered")}
    m = man.get("metrics", {})
    if stage == "embedder":
        return {"steps": m.get("steps"), "train_seconds": m.get("train_seconds"), **(m.get("data") or {})}
    return {k: m.get(k) for k in ("rows", "rejected", "generated_this_run", "parse_rate", "revised_total")}


# ---- ids: what a stage read and what it wrote ------------------------------------------------------------------------
def _ids(out, columns=("id",)) -> list[str]:
    ids: list[str] = []
    for batch in out.iter_batches(batch_size=65536, columns=list(columns)):
        ids += batch.column(0).to_pylist()
    return ids


def ids_synthesis_in(store, n: int) -> list[str]:
    from speed_ray.synth.samples import stable_id

    return [stable_id("synthesis", SEED, i) for i in range(n)]


def ids_synthesis_out(store, n: int, kill: bool) -> list[str]:
    from speed_ray.llm.shards import rejects_output

    out = store.stage("synthesis", _fp(n, kill))
    return _ids(out) + _ids(rejects_output(out))


def ids_revision_in(store, n: int) -> list[str]:
    return _ids(store.stage("synthesis", _fp(n, False)))


def ids_revision_out(store, n: int, kill: bool) -> list[str]:
    return _ids(store.stage("revision", _fp(n, kill)))


def ids_dedup_in(store, n: int) -> list[str]:
    return _ids(store.stage("revision", _fp(n, False)))


def ids_dedup_out(store, n: int, kill: bool) -> list[str]:
    from speed_ray.dedup.stage import shards_at

    out = store.stage("dedup", _fp(n, kill))
    return _ids(out) + _ids(shards_at(out, "removed"))


def kept_dedup(store, n: int, kill: bool) -> list[str]:
    return sorted(_ids(store.stage("dedup", _fp(n, kill))))


def ids_embedder_in(store, n: int) -> list[str]:
    return _ids(store.stage("dedup", _fp(n, False)))


def ids_embedder_out(store, n: int, kill: bool) -> list[str]:
    from speed_ray.store import StepMarkers

    out = store.stage("train_embedder", _fp(n, kill))
    out.data_url = StepMarkers(out).get("triples")["shared"]   # pass 1's shared triples (embedder/feed.py)
    return _ids(out)


def _request_ids(out) -> list[str]:
    """The request ids a teacher stage wrote: its valid rows' and its rejects' (each answered request once)."""
    from speed_ray.llm.shards import rejects_output

    return [i for o in (out, rejects_output(out)) if o.shard_names() for i in _ids(o, ("request_id",))]


def ids_brainstorm_in(store, n: int) -> list[str]:
    from speed_ray.synth.samples import stable_id

    return [stable_id("brainstorm", t, tt) for t in _ids(store.stage("topics", _fp(n, False)))
            for tt in BRAINSTORM_TYPES]


def ids_seed_data_in(store, n: int) -> list[str]:
    from speed_ray.teacher.config import MixtureConfig
    from speed_ray.teacher.stages import plan_samples

    tasks = store.stage("brainstorm", _fp(n, False)).read_rows(columns=["id", "task_type"])
    return [p["id"] for p in plan_samples(tasks, teacher_counts(n)["seed_data"], MixtureConfig().weights, SEED,
                                          "seed")]


def ids_judge_in(store, n: int) -> list[str]:
    from speed_ray.synth.samples import stable_id

    return [stable_id("judge", i) for i in sorted(_ids(store.stage("root_data", _fp(n, False))))]


def ids_revise_signals_in(store, n: int) -> list[str]:
    import pyarrow.compute as pc

    from speed_ray.synth.samples import stable_id
    from speed_ray.teacher.stages import pick_revise_targets

    root = store.stage("root_data", _fp(n, False)).read_table(columns=["id", "outputs"])
    lens = dict(zip(root.column("id").to_pylist(), pc.list_value_length(root.column("outputs")).to_pylist()))
    picked = pick_revise_targets(lens, teacher_counts(n)["revise_signals"], SEED)
    return [stable_id("revise", lid, j) for lid, js in picked.items() for j in js]


def _teacher_ids_out(stage: str) -> Callable:
    return lambda store, n, kill: _request_ids(store.stage(stage, _fp(n, kill)))


def _align_ids_in(source: str) -> Callable:
    return lambda store, n: _ids(store.stage(source, _fp(n, False)))


def _align_ids_out(stage: str) -> Callable:
    """The ids of the examples the stage prepared (its train_data.parquet artifact, which the workers read)."""
    def ids(store, n: int, kill: bool) -> list[str]:
        import fsspec
        import pyarrow.parquet as pq

        fs, path = fsspec.core.url_to_fs(store.stage(stage, _fp(n, kill)).artifact("train_data.parquet"))
        with fs.open(path, "rb") as f:
            return pq.read_table(f, columns=["id"]).column("id").to_pylist()
    return ids


@dataclass
class Stage:
    child: Callable          # (ctx_for, n, kill) -> manifest dict, in the child driver
    ids_in: Callable         # (store, n) -> the ids the stage must write, each exactly once
    ids_out: Callable        # (store, n, kill) -> the ids it wrote (data + rejects/removed), with repeats
    decision: Callable | None = None   # (store, n, kill) -> what must equal between the killed and the clean run
    name: str | None = None            # the pipeline's stage name, where it differs
    rows: Callable | None = None       # (manifest) -> the rows the stage handled, for rows/s (default: n)
    prepare: Callable | None = None    # (store, n) -> None: writes synthetic inputs, before the stage's clock
    teacher: bool = False              # talks to the benchmark's fake teacher server
    check_ids: bool = False            # ids checked after the clean run too (stages that are not killed)


TEACHER_STAGES = ("brainstorm", "seed_data", "judge", "revise_signals")
ALIGN_STAGES = ("junior_sft", "senior_dpo", "revisor_sft")


def _teacher_stage(child: Callable, ids_in: Callable, stage: str, prepare: Callable | None = None) -> Stage:
    return Stage(child, ids_in, _teacher_ids_out(stage), rows=lambda m: m.get("requests") or 0, prepare=prepare,
                 teacher=True, check_ids=True)


def _align_stage(child: Callable, source: str, stage: str) -> Stage:
    return Stage(child, _align_ids_in(source), _align_ids_out(stage), rows=lambda m: m.get("train_examples") or 0,
                 check_ids=True)


STAGES: dict[str, Stage] = {
    "brainstorm": _teacher_stage(child_brainstorm, ids_brainstorm_in, "brainstorm",
                                 lambda store, n: _topics_output(store, n)),
    "seed_data": _teacher_stage(child_seed_data, ids_seed_data_in, "seed_data"),
    "judge": _teacher_stage(child_judge, ids_judge_in, "judge", lambda store, n: _root_output(store, n)),
    "revise_signals": _teacher_stage(child_revise_signals, ids_revise_signals_in, "revise_signals",
                                     lambda store, n: _root_output(store, n)),
    "junior_sft": _align_stage(child_junior_sft, "seed_data", "junior_sft"),
    "senior_dpo": _align_stage(child_senior_dpo, "judge", "senior_dpo"),
    "revisor_sft": _align_stage(child_revisor_sft, "revise_signals", "revisor_sft"),
    "synthesis": Stage(child_synthesis, ids_synthesis_in, ids_synthesis_out),
    "revision": Stage(child_revision, ids_revision_in, ids_revision_out),
    "dedup": Stage(child_dedup, ids_dedup_in, ids_dedup_out, kept_dedup),
    "embedder": Stage(child_embedder, ids_embedder_in, ids_embedder_out, name="train_embedder"),
}
DEFAULT_STAGES = ",".join(STAGES)


# ---- the stand-in generator's own speed --------------------------------------------------------------------------
def stub_engine_rate(model: str = "stub:dup=0.2,rows=1150000", rows: int = 2000, seconds: float = 3.0) -> dict:
    """Rows per CPU-second of one stub actor's UDF (speed_ray.generate.ray_engines.EngineUDF: columns in, engine,
    columns out) on synthesis-like requests, in this process. CPU time, not wall time: on a shared machine the
    wall clock measures the neighbours."""
    import pyarrow as pa

    from speed_ray.generate.plan import plan_prompt, request_seed
    from speed_ray.generate.ray_engines import EngineUDF
    from speed_ray.synth.schemas import response_format, sample_schema

    pools = {t: [{"id": f"t{i}", "topic": f"Topic {i}", "task": f"task {t} {i}", "lineage": "{}"} for i in range(50)]
             for t in TASK_TYPES}
    batch = []
    for i in range(rows):
        t = TASK_TYPES[i % len(TASK_TYPES)]
        r = plan_prompt(i, t, pools[t], SEED, "synthesis")
        r.update(messages=r["prompt"], temperature=1.0, top_p=1.0, max_tokens=800,
                 response_format=json.dumps(response_format("json_schema", f"{t}_sample", sample_schema(t))),
                 seed=request_seed(SEED, r["id"]))
        batch.append(r)
    table = pa.Table.from_pylist(batch)
    udf = EngineUDF("stub", model)
    udf(table.slice(0, 10))
    t0, w0, done = time.process_time(), time.time(), 0
    while time.process_time() - t0 < seconds:
        out = udf(table)
        done += out.num_rows
    valid = sum(out.column("finish_reason").to_numpy(zero_copy_only=False) == "stop")
    return {"model": model, "rows_per_cpu_s": round(done / (time.process_time() - t0)),
            "rows_per_wall_s": round(done / (time.time() - w0)), "valid_share": valid / out.num_rows}


# ---- the fake teacher ----------------------------------------------------------------------------------------------
def start_teacher_server(latency_s: float = TEACHER_LATENCY_S, p429: float = TEACHER_P429,
                         p5xx: float = TEACHER_P5XX, seed: int = SEED):
    """tests/fake_openai.py in this process (its own event loop thread): `latency_s` per request, a share p429 of
    the requests answered 429 with Retry-After: 1 and p5xx answered 500 or 503 (half each), rolled per arrival."""
    if str(REPO / "tests") not in sys.path:
        sys.path.insert(0, str(REPO / "tests"))
    from fake_openai import FakeOpenAI, Fault

    srv = FakeOpenAI(latency_s=latency_s, responder=teacher_responder(), seed=seed, keep_bodies=False)
    srv.add_fault(Fault("status", status=429, retry_after="1", times=None, probability=p429,
                        message="Rate limit reached (injected)"),
                  Fault("status", status=500, times=None, probability=p5xx / 2),
                  Fault("status", status=503, times=None, probability=p5xx / 2))
    return srv.start()


def server_window(srv, mark: int, cpu0: float) -> dict:
    """What the fake teacher saw since log entry `mark`: requests by outcome, peak in flight, this process's CPU."""
    from collections import Counter

    seen = Counter(outcome for _, _, outcome in srv.log[mark:])
    return {"requests": sum(seen.values()), "ok": seen.get("ok", 0), "http_429": seen.get("429", 0),
            "http_5xx": sum(v for k, v in seen.items() if k.isdigit() and k.startswith("5")),
            "max_inflight": srv.max_inflight, "server_process_cpu_s": round(time.process_time() - cpu0, 1)}


# ---- how the parent starts a child driver ---------------------------------------------------------------------------
# What every stage's driver imports before its stage begins (about 1 s of a fresh interpreter's start on this
# machine, paid by each of a run's ~20 drivers). Nothing heavier: a stage's own imports (torch for the training
# stages) stay in its driver and in its wall time, and a driver's RSS stays that stage's.
ZYGOTE_PRELOAD = ["ray", "ray.data", "pyarrow.parquet", "speed_ray.stage", "speed_ray.store", "speed_ray.run_config"]


def _child_entry(argv: list[str], out: str, err: str, cwd: str) -> None:
    """In a driver forked from the zygote: stdout and stderr to files, then the child's main()."""
    for path, fd in ((out, 1), (err, 2)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.chdir(cwd)
    try:
        main(argv)
    finally:
        import ray

        if ray.is_initialized():   # a forked child ends with os._exit: atexit's ray.shutdown() would not run
            ray.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()


class ChildDriver:
    """One stage's driver process, its stdout and stderr in files under `logs`. Forked from a zygote (multiprocessing's
    forkserver, started with the cluster's environment, that imported ZYGOTE_PRELOAD once), or with zygote=False a
    fresh interpreter (subprocess). Either way a fresh process per stage: its own RSS peak, its own Ray job, and
    SIGKILL takes only it."""

    _forkserver = None

    def __init__(self, argv: list[str], logs: str, env: dict, zygote: bool = True):
        os.makedirs(os.path.dirname(logs), exist_ok=True)
        self.out, self.err = logs + ".out", logs + ".err"
        self._proc = None
        self._popen = None
        if zygote:
            ctx = self.zygote(env)
            self._proc = ctx.Process(target=_child_entry, args=(argv, self.out, self.err, str(REPO)))
            self._proc.start()
            self.pid = self._proc.pid
        else:
            with open(self.out, "w") as fo, open(self.err, "w") as fe:
                self._popen = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv], env=env,
                                               stdout=fo, stderr=fe, cwd=str(REPO))
            self.pid = self._popen.pid

    @classmethod
    def zygote(cls, env: dict):
        """The forkserver context, started once with `env` (the cluster's: RAY_TMPDIR, the auth token)."""
        if cls._forkserver is None:
            import multiprocessing as mp
            from multiprocessing import forkserver

            os.environ.update(env)   # the forkserver starts with this process's environment; this process runs no Ray
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(ZYGOTE_PRELOAD)
            forkserver.ensure_running()
            cls._forkserver = ctx
        return cls._forkserver

    def poll(self) -> int | None:
        if self._popen is not None:
            return self._popen.poll()
        return self._proc.exitcode

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        if self._popen is not None:
            return self._popen.wait(timeout=timeout)
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired("child driver", timeout)
        return self._proc.exitcode

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)

    @staticmethod
    def _readlines(path: str) -> list[str]:
        try:
            with open(path) as f:
                return f.readlines()
        except FileNotFoundError:   # the driver has not opened it yet
            return []

    def lines(self) -> list[str]:
        return self._readlines(self.out)

    def err_lines(self) -> list[str]:
        return self._readlines(self.err)

    def started(self) -> bool:
        return any(ln.startswith("STAGE_START") for ln in self.lines())


# ---- the parent: runs, kills, measures ----------------------------------------------------------------------------
class Bench:
    def __init__(self, args):
        self.args = args
        self.cluster = Cluster(args.head_cpus, args.worker_cpus, args.object_store_mb)
        self.run_dir = args.keep or tempfile.mkdtemp(prefix="srps-run-")
        self.server = None
        self._children = 0

    def _spawn(self, stage: str, n: int, kill: bool) -> ChildDriver:
        argv = ["--child", stage, "--run-dir", self.run_dir, "--address", self.cluster.address, "--n", str(n),
                "--dup", str(self.args.dup)]
        if kill:
            argv.append("--kill-run")
        if self.server is not None:
            argv += ["--teacher-url", self.server.base_url]
        self._children += 1
        logs = os.path.join(self.cluster.temp, "drivers", f"{self._children:03d}-{stage}")
        return ChildDriver(argv, logs, self.cluster.env, zygote=not self.args.spawn_drivers)

    def run_stage(self, stage: str, n: int, kill: bool = False, kill_after: float | None = None) -> dict:
        """One child driver for `stage`; with kill_after, SIGKILL it that many seconds after the stage began."""
        self.sampler.reset()
        mark, cpu0 = 0, time.process_time()
        if self.server is not None:
            mark = len(self.server.log)
            self.server.max_inflight = self.server.inflight
        proc = self._spawn(stage, n, kill)
        self.sampler.driver_pid = proc.pid
        t0 = time.time()
        killed = False
        if kill_after is not None:
            while not proc.started():
                if proc.poll() is not None:
                    break
                time.sleep(0.1)
            time.sleep(kill_after)
            if proc.poll() is None:
                proc.kill()
                killed = True
        proc.wait(timeout=self.args.stage_timeout)
        lines, err_lines = proc.lines(), proc.err_lines()
        res = {"stage": stage, "n": n, "killed": killed, "rc": proc.returncode, **self.sampler.snapshot()}
        if killed:
            res["killed_after_s"] = round(kill_after, 2)
            return res
        if proc.returncode != 0:
            raise RuntimeError(f"{stage} at {n} failed (rc {proc.returncode}):\n{''.join(err_lines)[-4000:]}")
        out = json.loads([ln for ln in lines if ln.startswith("{")][-1])
        res.update(out)
        rows = out.get("rows") or n
        res["rows_per_s"] = round(rows / max(out["wall_s"], 1e-9), 1)
        res["cpu_ms_per_row"] = round(1000 * (res["workers_cpu_s"] + out["driver_cpu_s"]) / rows, 3)
        if STAGES[stage].teacher and self.server is not None:
            res["summary"]["server"] = server_window(self.server, mark, cpu0)
            res["summary"]["calls_per_s"] = round(res["summary"]["calls"] / max(out["wall_s"], 1e-9), 1)
        res["wall_s"] = round(out["wall_s"], 1)
        res["driver_peak_rss_mb"] = round(out["driver_peak_rss_mb"], 1)
        res["parent_wall_s"] = round(time.time() - t0, 1)
        return res

    @staticmethod
    def _settle(path: str, quiet_s: float = 3.0, limit_s: float = 120.0) -> float:
        """Wait until nothing more lands under `path`: Ray reaps a dead driver's workers within seconds, and a
        rerun must not start while they still write (as in tests/test_generate_stages.py)."""
        def state():
            out = []
            for root, _, files in os.walk(path):
                for f in files:
                    try:
                        st = os.stat(os.path.join(root, f))
                        out.append((root, f, st.st_size, st.st_mtime_ns))
                    except OSError:
                        pass
            return sorted(out)

        t0 = time.time()
        last, since = state(), time.time()
        while time.time() - since < quiet_s and time.time() - t0 < limit_s:
            time.sleep(0.5)
            now = state()
            if now != last:
                last, since = now, time.time()
        return round(time.time() - t0, 1)

    def check_ids(self, stage: str, n: int, kill: bool) -> dict:
        """The ids a stage wrote against those it had to: lost, duplicated, unexpected."""
        from speed_ray.store import RunStore

        store = RunStore(self.run_dir)
        want = set(STAGES[stage].ids_in(store, n))
        got = STAGES[stage].ids_out(store, n, kill)
        got_set = set(got)
        return {"expected": len(want), "written": len(got), "lost": len(want - got_set),
                "duplicated": len(got) - len(got_set), "unexpected": len(got_set - want)}

    def kill_test(self, stage: str, n: int, clean: dict) -> dict:
        """SIGKILL the driver at random points of the stage, --kills-per-stage times (each run resumes the last
        one's output), then rerun it to the end, and compare the ids it wrote with its input."""
        from speed_ray.store import RunStore

        rng = random.Random(f"{self.args.seed}-{stage}-{n}")
        kill_dir = os.path.join(self.run_dir, "stages", STAGES[stage].name or stage, _fp(n, True))
        points, settle_s = [], 0.0
        done_s = 0.0   # roughly how much of the clean run's work the killed runs did (start-up discounted)
        for k in range(self.args.kills_per_stage):
            frac = rng.uniform(0.15, 0.6)
            remaining = max(clean["wall_s"] - 0.7 * done_s, 0.25 * clean["wall_s"])
            for _ in range(4):   # a run that ends before its kill point: kill earlier
                killed = self.run_stage(stage, n, kill=True, kill_after=frac * remaining)
                if killed["killed"] or k > 0:
                    break
                shutil.rmtree(kill_dir, ignore_errors=True)
                frac /= 2
            points.append({"kill_fraction": round(frac, 3), "killed": killed["killed"],
                           "killed_after_s": killed.get("killed_after_s")})
            done_s += killed.get("killed_after_s") or 0.0
            settle_s += self._settle(kill_dir)
            if not killed["killed"]:
                break   # the stage completed before this kill point: nothing left to kill
        resumed = self.run_stage(stage, n, kill=True)
        res = {"stage": stage, "n": n, "kind": "driver SIGKILL", "kills": sum(p["killed"] for p in points),
               "points": points, "killed": any(p["killed"] for p in points), "settle_s": round(settle_s, 1),
               "resume_wall_s": resumed["wall_s"], "resume_driver_peak_rss_mb": resumed["driver_peak_rss_mb"],
               **self.check_ids(stage, n, True)}
        spec = STAGES[stage]
        if spec.decision is not None:
            store = RunStore(self.run_dir)
            res["same_as_clean_run"] = spec.decision(store, n, True) == spec.decision(store, n, False)
        # checked: the killed run's output goes (at 1.15M rows a stage writes gigabytes; the clean one stays)
        shutil.rmtree(kill_dir, ignore_errors=True)
        return res

    def measure(self, stage: str, n: int) -> dict:
        """The clean run of `stage` at n; the teacher and alignment stages' ids checked after it (not killed)."""
        res = self.run_stage(stage, n)
        if STAGES[stage].check_ids:
            res["ids"] = self.check_ids(stage, n, False)
        return res

    def _progress(self, note: dict) -> None:
        """A progress line on stderr, with the seconds since the benchmark began ("t")."""
        print(json.dumps({**note, "t": round(time.time() - self.t_start, 1)}), file=sys.stderr, flush=True)

    def run(self) -> dict:
        args = self.args
        t_start = self.t_start = time.time()
        self.load_start = [round(x, 2) for x in os.getloadavg()]
        stale = Cluster.reap_stale()
        if stale:
            self._progress({"progress": "reaped stale benchmark processes", "pids": stale})
        # the cluster starts (two `ray start`s, mostly waiting) while this process measures the stub engine
        # (in CPU time, which the overlap leaves alone) and the zygote imports what the drivers share
        failed: list[BaseException] = []

        def start_cluster() -> None:
            try:
                self.cluster.start()
            except BaseException as e:  # noqa: BLE001 - re-raised below
                failed.append(e)

        starter = threading.Thread(target=start_cluster, daemon=True)
        starter.start()
        try:
            if not args.spawn_drivers:
                ChildDriver.zygote(self.cluster.env)
            self.stub = stub_engine_rate(f"stub:dup={args.dup},rows=1150000")
        except BaseException:
            starter.join()
            self.cluster.stop()
            raise
        self._progress({"progress": "stub engine", **self.stub})
        starter.join()
        if failed:
            raise failed[0]
        self._progress({"progress": "cluster started", "address": self.cluster.address})

        def on_term(signum, frame):   # stop our cluster (and only it) when this benchmark is terminated
            raise KeyboardInterrupt(f"signal {signum}")

        signal.signal(signal.SIGTERM, on_term)
        self.sampler = Sampler(self.cluster)
        results: dict[str, dict[str, dict]] = {}
        kills: list[dict] = []
        try:
            if any(STAGES[s].teacher for s in args.stages):
                self.server = start_teacher_server(args.teacher_latency, args.teacher_p429, args.teacher_p5xx)
                self._progress({"progress": "fake teacher", "url": self.server.base_url})
            for n in args.sizes:
                for stage in args.stages:
                    r = self._cached(f"{stage}-{_fp(n, False)}", stage, _fp(n, False),
                                     lambda: self.measure(stage, n), resumable=True)
                    results.setdefault(stage, {})[str(n)] = r
                    if "environment_kill" in r:
                        kills.append(r["environment_kill"])
                    self._progress({"progress": stage, "n": n, "wall_s": r["wall_s"], "rows": r.get("rows"),
                                    "rows_per_s": r["rows_per_s"], "cpu_ms_per_row": r["cpu_ms_per_row"],
                                    "driver_mb": r["driver_peak_rss_mb"], "worker_mb": r["worker_peak_rss_mb"],
                                    "worker_private_mb": r["worker_peak_private_mb"], "ids": r.get("ids"),
                                    "load": os.getloadavg()[0]})
                    if n in args.kill_sizes and stage in args.kill_stages:
                        k = self._cached(f"{stage}-{_fp(n, True)}", stage, _fp(n, True),
                                         lambda: self.kill_test(stage, n, r))
                        kills.append(k)
                        self._progress({"progress": f"{stage} kill", **k})
        finally:
            self.sampler.close()
            self.cluster.stop()
            if self.server is not None:
                self.server.stop()
            if not args.keep:
                shutil.rmtree(self.run_dir, ignore_errors=True)
        return self.report(results, kills, time.time() - t_start)

    def _cached(self, key: str, stage: str, fp: str, measure: Callable[[], dict], resumable: bool = False) -> dict:
        """With --keep, a measurement already made in that run directory is reused, so a long run that something
        killed goes on where it stopped. An interrupted kill test starts over; an interrupted clean run
        (`resumable`) resumes its stage from the shards it wrote: its segments' walls add up, its peaks are the
        segments' largest (an interrupted segment's from the sampler's notes, written every ~10 s), and its output
        ids are checked like a kill test's (the whole cluster went down, not only the driver)."""
        base = os.path.join(self.run_dir, "bench", key)
        os.makedirs(os.path.dirname(base), exist_ok=True)
        if self.args.keep and os.path.exists(base + ".json"):
            with open(base + ".json") as f:
                return {**json.load(f), "reused": True}
        notes = base + ".progress.json"
        earlier = []
        if os.path.exists(notes):
            with open(notes) as f:
                earlier = json.load(f)["segments"]
        partial = os.path.join(self.run_dir, "stages", stage, fp)
        if not (resumable and earlier) and os.path.exists(partial):
            shutil.rmtree(partial)
        if not resumable:
            earlier = []
        t0 = time.time()

        def note(snap: dict) -> None:
            tmp = notes + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"segments": earlier + [{**snap, "wall_s": round(time.time() - t0, 1)}]}, f)
            os.replace(tmp, notes)

        self.sampler.progress = note
        try:
            res = measure()
        finally:
            self.sampler.progress = None
        if earlier:
            segs = earlier + [res]
            res = {**res, "segments": len(segs), "interrupted_walls_s": [e["wall_s"] for e in earlier]}
            res["wall_s"] = round(sum(e["wall_s"] for e in segs), 1)
            rows = res.get("rows") or res["n"]
            res["rows_per_s"] = round(rows / max(res["wall_s"], 1e-9), 1)
            for k in ("worker_peak_rss_mb", "worker_peak_private_mb", "spill_dir_peak_mb"):
                res[k] = max(e.get(k, 0.0) for e in segs)
            res["driver_peak_rss_mb"] = max([res["driver_peak_rss_mb"]]
                                            + [e.get("driver_sampled_peak_rss_mb", 0.0) for e in earlier])
            cpu = sum(e.get("workers_cpu_s", 0.0) for e in segs) + res.get("driver_cpu_s", 0.0)
            res["cpu_ms_per_row"] = round(1000 * cpu / rows, 3)   # without the killed drivers' own CPU
            res["environment_kill"] = {"stage": stage, "n": res["n"], "kind": "cluster killed (environment)",
                                       "segments": len(segs), **self.check_ids(stage, res["n"], False)}
        with open(base + ".json", "w") as f:
            json.dump(res, f)
        return res

    def report(self, results: dict, kills: list[dict], total_s: float) -> dict:
        args = self.args
        merged_from = []
        for path in args.merge or []:   # earlier runs' JSON lines (e.g. 100K and 1.15M run apart): one report
            prev = json.loads([ln for ln in Path(path).read_text().splitlines() if ln.startswith("{")][-1])
            merged_from.append({"file": path, "sizes": prev["sizes"], "load_avg": prev.get("load_avg")})
            for stage, by_n in prev["results"].items():
                for n, r in by_n.items():
                    results.setdefault(stage, {}).setdefault(n, r)
            kills = prev.get("kills", []) + kills
        sizes = sorted({int(n) for by_n in results.values() for n in by_n})
        ratios = {}
        for stage, by_n in results.items():
            have = sorted(by_n, key=int)
            lo, hi = have[0], have[-1]
            if lo == hi:
                continue
            a, b = by_n[lo], by_n[hi]
            ratios[stage] = {
                f"driver_rss_{hi}_over_{lo}": round(b["driver_peak_rss_mb"] / a["driver_peak_rss_mb"], 3),
                f"worker_rss_{hi}_over_{lo}": round(b["worker_peak_rss_mb"] / max(a["worker_peak_rss_mb"], 1e-9), 3),
                f"worker_private_{hi}_over_{lo}": round(b["worker_peak_private_mb"]
                                                        / max(a["worker_peak_private_mb"], 1e-9), 3),
                f"rows_per_s_{hi}_over_{lo}": round(b["rows_per_s"] / a["rows_per_s"], 3),
                f"cpu_ms_per_row_{hi}_over_{lo}": round(b["cpu_ms_per_row"] / max(a["cpu_ms_per_row"], 1e-9), 3)}
        flat = [r for by_n in results.values() for r in by_n.values()]
        driver_peak = max((r["driver_peak_rss_mb"] for r in flat), default=0.0)
        worker_peak = max((r["worker_peak_rss_mb"] for r in flat), default=0.0)
        goals = {
            "driver_peak_rss_mb": driver_peak, "driver_peak_ok": driver_peak <= DRIVER_LIMIT_MB,
            "driver_ratio_ok": all(x <= DRIVER_RATIO_LIMIT for v in ratios.values() for k, x in v.items()
                                   if k.startswith("driver_rss_")),
            "worker_peak_rss_mb": worker_peak, "worker_peak_ok": worker_peak <= WORKER_LIMIT_MB,
            "worker_peak_private_mb": max((r["worker_peak_private_mb"] for r in flat), default=0.0),
            "kills": sum(k.get("kills", int(bool(k.get("killed")))) for k in kills),
            "kill_runs": len(kills), "lost": sum(k["lost"] for k in kills),
            "duplicated": sum(k["duplicated"] for k in kills),
            "unexpected": sum(k["unexpected"] for k in kills),
            "kills_same_as_clean": all(k.get("same_as_clean_run", True) for k in kills),
            # the teacher and alignment stages: every request answered once, every row prepared once
            "stage_ids_ok": all(r["ids"]["lost"] == 0 and r["ids"]["duplicated"] == 0 and r["ids"]["unexpected"] == 0
                                for r in flat if r.get("ids")),
        }
        goals["ok"] = bool(goals["driver_peak_ok"] and goals["driver_ratio_ok"] and goals["worker_peak_ok"]
                           and goals["lost"] == 0 and goals["duplicated"] == 0 and goals["unexpected"] == 0
                           and goals["kills_same_as_clean"] and goals["stage_ids_ok"])
        slim = {stage: {n: {k: r.get(k) for k in ("rows", "rows_per_s", "wall_s", "cpu_ms_per_row",
                                                  "driver_peak_rss_mb",
                                                  "worker_peak_rss_mb", "worker_peak_private_mb",
                                                  "workers_peak_count", "workers_private_sum_peak_mb",
                                                  "worker_peak_process", "spilled_mib", "spill_dir_peak_mb",
                                                  "segments", "ids", "summary")}
                        for n, r in by_n.items()} for stage, by_n in results.items()}
        teacher = None
        if any(STAGES[s].teacher for s in args.stages if s in STAGES):
            teacher = {"server": "tests/fake_openai.py", "latency_s": args.teacher_latency, "p429": args.teacher_p429,
                       "p5xx": args.teacher_p5xx, "concurrency": TEACHER_CONCURRENCY,
                       "counts": {str(n): teacher_counts(n) for n in sizes}}
        return {"benchmark": "paper_scale", "engine": "stub", "sizes": sizes, "stages": args.stages,
                "cluster": {"nodes": 2, "head_cpus": args.head_cpus, "worker_cpus": args.worker_cpus,
                            "object_store_mb_per_node": args.object_store_mb},
                "teacher": teacher, "align_steps": ALIGN_STEPS,
                "results": slim, "ratios": ratios, "kills": kills, "goals": goals, "ok": goals["ok"],
                "merged_from": merged_from,
                "stub_engine": self.stub, "total_s": round(total_s, 1), "load_avg_start": self.load_start,
                "load_avg": [round(x, 2) for x in os.getloadavg()],
                "cpu_count": os.cpu_count()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_150_000])
    ap.add_argument("--quick", action="store_true", help="20K rows, kills included (a check, not a measurement)")
    ap.add_argument("--stages", default=DEFAULT_STAGES,
                    help=f"comma-separated, run in this order (each reads the one before it); known: {DEFAULT_STAGES}")
    ap.add_argument("--kill-sizes", type=int, nargs="*", default=None,
                    help="sizes to run the SIGKILL+resume check at (default: the smallest; none: no kills)")
    ap.add_argument("--kill-stages", default="synthesis,revision,dedup",
                    help="comma-separated stages to kill (the issue's three; add embedder to kill it too); the "
                         "teacher and alignment stages are checked for lost and duplicated ids after their clean run")
    ap.add_argument("--kills-per-stage", type=int, default=None, help="default: 3 (1 with --quick)")
    ap.add_argument("--dup", type=float, default=0.2, help="share of near duplicates the stub engine plants")
    ap.add_argument("--seed", type=int, default=0, help="seeds the kill points")
    ap.add_argument("--head-cpus", type=int, default=1)
    ap.add_argument("--worker-cpus", type=int, default=1)
    ap.add_argument("--object-store-mb", type=int, default=1024)
    ap.add_argument("--stage-timeout", type=float, default=6 * 3600)
    ap.add_argument("--teacher-latency", type=float, default=TEACHER_LATENCY_S, help="fake teacher, s per request")
    ap.add_argument("--teacher-p429", type=float, default=TEACHER_P429, help="share of requests answered 429")
    ap.add_argument("--teacher-p5xx", type=float, default=TEACHER_P5XX, help="share answered 500/503")
    ap.add_argument("--keep", default=None, help="run directory to keep (default: a temp dir, removed)")
    ap.add_argument("--spawn-drivers", action="store_true",
                    help="start each stage's driver as a fresh interpreter, not forked from the preloaded zygote")
    ap.add_argument("--merge", nargs="*", default=None,
                    help="output files of earlier runs: their results join this report (ratios across runs)")
    ap.add_argument("--report-only", action="store_true", help="with --merge: no run, only the merged report")
    # the child driver
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--address", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--kill-run", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--teacher-url", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        run_child(args.child, args.run_dir, args.address, args.n, args.dup, args.kill_run, args.teacher_url)
        return
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    args.kill_stages = [s.strip() for s in args.kill_stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        ap.error(f"unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
    if args.quick:
        args.sizes = [20_000]
    if args.kills_per_stage is None:
        args.kills_per_stage = 1 if args.quick else 3
    args.sizes = sorted(set(args.sizes))
    args.kill_sizes = set(args.sizes[:1] if args.kill_sizes is None else args.kill_sizes)
    bench = Bench(args)
    if args.report_only:
        bench.stub, bench.load_start = {}, [round(x, 2) for x in os.getloadavg()]
        print(json.dumps(bench.report({}, [], 0.0)), flush=True)
        return
    print(json.dumps(bench.run()), flush=True)


if __name__ == "__main__":
    main()
