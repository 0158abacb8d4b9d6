"""Ray Data glue: run request rows through an engine on an autoscaling actor pool (HF/stub) or ray.data.llm (vLLM)."""

from __future__ import annotations

import os
from typing import Any

from speed_ray.generate.config import EngineConfig, torch_threads_for
from speed_ray.generate.engine import StubEngine, generate_table


class EngineUDF:
    """map_batches UDF: loads the engine once per actor (in __init__), then generates batch after batch."""

    def __init__(self, kind: str, model: str, dtype: str = "auto", batch_size: int = 8, max_model_len: int = 4096,
                 num_threads: int | None = None, adapter: str | None = None, factory: str | None = None,
                 endpoint: dict[str, Any] | None = None):
        self.kind = kind
        if kind == "openai":
            from speed_ray.generate.openai_engine import OpenAIEngine

            self.engine = OpenAIEngine(model, **(endpoint or {}))
        elif kind == "stub":
            self.engine = StubEngine(model)
        elif kind == "custom":
            self.engine = load_factory(factory)(model)
        elif kind == "hf":
            import torch

            if num_threads:  # match torch's threads to the CPUs Ray reserved for this actor
                torch.set_num_threads(num_threads)
            from speed_ray.generate.hf_engine import HFEngine

            self.engine = HFEngine(model, dtype=dtype, batch_size=batch_size, max_model_len=max_model_len,
                                   adapter=adapter)
        else:
            raise ValueError(f"EngineUDF runs the hf, stub, custom and openai engines, not {kind!r}")

    def __call__(self, batch):
        import pyarrow as pa

        if not isinstance(batch, pa.Table):
            batch = pa.Table.from_pydict({k: list(v) for k, v in batch.items()})
        return generate_table(self.engine, batch, self.kind)


def load_factory(factory: str | None):
    """engine.factory ("module:callable") -> the callable; the error names what could not be found."""
    import importlib

    mod, _, attr = (factory or "").partition(":")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"engine.factory {factory!r} cannot be loaded in this worker ({type(e).__name__}: {e}); "
                         "it must be importable where the replicas run (e.g. shipped with the job's runtime_env)"
                         ) from e


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
                               "adapter": adapter if cfg.kind == "hf" else None, "factory": cfg.factory,
                               "endpoint": endpoint_kwargs(cfg)},
        compute=ActorPoolStrategy(min_size=cfg.replicas_min, max_size=cfg.replicas_max),
        batch_size=cfg.batch_size * 4 if cfg.kind == "hf" else cfg.batch_size,
        batch_format="pyarrow",
        num_cpus=res["cpus"],
        num_gpus=res["gpus"] or None,
        **retries,
    )


def endpoint_kwargs(cfg: EngineConfig) -> dict[str, Any] | None:
    """kind openai: the client's settings; the driver's API key travels wrapped in Secret (never printed), so a
    replica on a node without the env var still authenticates."""
    if cfg.kind != "openai":
        return None
    from speed_ray.llm.client import Secret

    key = os.environ.get(cfg.api_key_env)
    return {"base_url": cfg.base_url, "api_key_env": cfg.api_key_env, "api_key": Secret(key) if key else None,
            "concurrency": cfg.concurrency, "timeout_s": cfg.timeout_s, "max_retries": cfg.max_retries}


def generate_dataset(ds, cfg: EngineConfig, model: str, adapter_path: str | None = None):
    """A Dataset of request rows (speed_ray.llm.rows + passthrough) -> the same rows with result columns."""
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
