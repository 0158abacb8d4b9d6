"""Ray Data glue: run request rows through an engine on an autoscaling actor pool (HF/stub) or ray.data.llm (vLLM)."""

from __future__ import annotations

import os
from typing import Any

from speed_ray.generate.config import EngineConfig, torch_threads_for
from speed_ray.generate.engine import StubEngine, generate_batch, stub_options


class EngineUDF:
    """map_batches UDF: loads the engine once per actor (in __init__), then generates batch after batch."""

    def __init__(self, kind: str, model: str, dtype: str = "auto", batch_size: int = 8, max_model_len: int = 4096,
                 num_threads: int | None = None, adapter: str | None = None):
        self.kind = kind
        if kind == "stub":
            self.engine = StubEngine(model)
        elif kind == "hf":
            import torch

            if num_threads:  # match torch's threads to the CPUs Ray reserved for this actor
                torch.set_num_threads(num_threads)
            from speed_ray.generate.hf_engine import HFEngine

            self.engine = HFEngine(model, dtype=dtype, batch_size=batch_size, max_model_len=max_model_len,
                                   adapter=adapter)
        else:
            raise ValueError(f"EngineUDF runs the hf and stub engines, not {kind!r}")
        # fault injection for the stage tests (stub only): "stub:crash_once=<marker>" kills the actor process;
        # "stub:fail_once=<marker>,fail_when=<dir>" raises in the UDF once <dir> holds 2 shards
        opts = stub_options(model) if kind == "stub" else {}
        self._crash_marker = opts.get("crash_once")
        self._fail_marker, self._fail_when = opts.get("fail_once"), opts.get("fail_when")
        self._calls = 0

    def __call__(self, batch):
        import pyarrow as pa

        cols = batch.to_pydict() if isinstance(batch, pa.Table) else {k: list(v) for k, v in batch.items()}
        self._maybe_crash()
        self._maybe_fail()
        self._calls += 1
        return pa.Table.from_pydict(generate_batch(self.engine, cols, self.kind))

    def _maybe_fail(self) -> None:
        # A user-code error fails the whole Dataset (Ray retries only system failures), so the stage dies with
        # some shards written: the resume test's deterministic stand-in for a crash. After 3 batches it waits
        # for the downstream writer to land 2 shards, then raises once.
        m = self._fail_marker
        if not m or self._calls < 3 or not os.path.exists(m):
            return
        import glob
        import time

        deadline = time.time() + 120
        while len(glob.glob(os.path.join(self._fail_when or ".", "*.parquet"))) < 2 and time.time() < deadline:
            time.sleep(0.1)
        try:
            os.remove(m)
        except FileNotFoundError:
            return
        raise RuntimeError("injected stub failure (fail_once)")

    def _maybe_crash(self) -> None:
        # Tests kill one worker mid-stage: the first actor to see the marker file deletes it and dies hard.
        m = self._crash_marker
        if m and os.path.exists(m):
            try:
                os.remove(m)
            except FileNotFoundError:
                return
            os._exit(1)


def replicas_resources(cfg: EngineConfig) -> dict[str, float]:
    """Per-replica resources, as used for the actor pool and for cost accounting."""
    gpus = cfg.num_gpus_per_replica if cfg.kind != "vllm" else max(cfg.num_gpus_per_replica,
                                                                    float(cfg.tensor_parallel_size))
    return {"cpus": cfg.num_cpus_per_replica, "gpus": gpus}


def map_kwargs(cfg: EngineConfig, model: str, adapter: str | None = None) -> dict[str, Any]:
    """The map_batches arguments of the HF/stub engine stage (tested without running it)."""
    from ray.data import ActorPoolStrategy

    res = replicas_resources(cfg)
    # Ray Data's actor pools already restart dead actors and retry their batches forever (-1); pass the
    # (deprecated-style) remote args only when the config asks for something else.
    retries = {k: v for k, v in (("max_restarts", cfg.max_restarts), ("max_task_retries", cfg.max_task_retries))
               if v != -1}
    return dict(
        fn_constructor_kwargs={"kind": cfg.kind, "model": model, "dtype": cfg.dtype, "batch_size": cfg.batch_size,
                               "max_model_len": cfg.max_model_len,
                               "num_threads": torch_threads_for(cfg.torch_threads, cfg.num_cpus_per_replica),
                               "adapter": adapter if cfg.kind == "hf" else None},
        compute=ActorPoolStrategy(min_size=cfg.replicas_min, max_size=cfg.replicas_max),
        batch_size=cfg.batch_size * 4 if cfg.kind == "hf" else cfg.batch_size,
        batch_format="pyarrow",
        num_cpus=res["cpus"],
        num_gpus=res["gpus"] or None,
        **retries,
    )


def generate_dataset(ds, cfg: EngineConfig, model: str, adapter_path: str | None = None):
    """A Dataset of request rows (engine.REQUEST_COLUMNS + passthrough) -> the same rows with result columns."""
    if cfg.kind == "vllm":
        from speed_ray.generate.vllm_engine import generate_vllm

        return generate_vllm(ds, cfg, model, adapter_path if cfg.use_adapter else None)
    kw = map_kwargs(cfg, model, adapter_path if cfg.use_adapter else None)
    if kw["num_gpus"] is None:
        kw.pop("num_gpus")
    # One engine batch per block: a task's outputs leave the actor only when the task ends, so a 1024-row
    # planning block would hold hours of CPU generation back from the shard writer (and lose it on a crash).
    ds = ds.repartition(target_num_rows_per_block=kw["batch_size"])
    return ds.map_batches(EngineUDF, **kw)
