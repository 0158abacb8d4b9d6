"""The local teacher: an OpenAI-compatible /v1/chat/completions on Ray Serve (HF engine on CPU, or vLLM)."""

# No `from __future__ import annotations` here: FastAPI reads handler annotations (Request) at definition time.

import asyncio
import logging
import time
import uuid
from typing import Any

from speed_ray.generate.config import torch_threads_for
from speed_ray.serve.protocol import (APIError, apply_stop, chat_response, error_body, models_response,
                                      parse_chat_request, parse_json)

log = logging.getLogger("speed_ray.generate.server")

APP_NAME = "speed-ray-teacher"
MAX_BODY_BYTES = 8 << 20
_STATE: dict[str, Any] = {}   # this driver's running server: base_url, and whether it started Serve itself


def vllm_llm_config(cfg, model_source: str) -> dict:
    """The ray.serve.llm LLMConfig kwargs for a LocalServerConfig (pure, so it is testable without vLLM)."""
    return {
        "model_loading_config": {"model_id": cfg.model, "model_source": model_source},
        "deployment_config": {"autoscaling_config": {"min_replicas": cfg.replicas, "max_replicas": cfg.replicas},
                              "max_ongoing_requests": max(64, 4 * cfg.max_batch_size)},
        # vLLM batches continuously: max_num_seqs is its concurrent-sequence cap; json_schema response_format is
        # honoured by vLLM's own structured-output backend. Requests must name model_id (the config's model).
        "engine_kwargs": {"max_num_seqs": max(cfg.max_batch_size, 1), "tensor_parallel_size": 1,
                          "enable_prefix_caching": True},
    }


def build_vllm_app(cfg, model_source: str):
    """vLLM behind Ray Serve LLM's own OpenAI ingress (GPU clusters; `ray.serve.llm` needs vllm installed)."""
    try:
        from ray.serve.llm import LLMConfig, build_openai_app
    except ImportError as e:
        raise RuntimeError(f"engine 'vllm' needs vllm and ray[llm] installed ({e}); use engine: hf on CPU") from e
    return build_openai_app({"llm_configs": [LLMConfig(**vllm_llm_config(cfg, model_source))]})


def build_hf_app(cfg, token_digest: str | None = None):
    """The HF-engine chat app: one FastAPI ingress deployment, requests batched into one generate() call."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from ray import serve
    from starlette.exceptions import HTTPException

    from speed_ray.serve.auth import authorized

    api = FastAPI(title="speed-ray chat completions")

    @api.exception_handler(HTTPException)
    async def _http_error(request, exc):  # 404/405 and friends in the OpenAI shape
        return JSONResponse(error_body(exc.status_code, str(exc.detail), code=str(exc.status_code)), exc.status_code)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return JSONResponse(error_body(422, str(exc), code="invalid_request"), 422)

    @serve.deployment(name="ChatServer", num_replicas=cfg.replicas,
                      max_ongoing_requests=max(64, 4 * cfg.max_batch_size),
                      ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus})
    @serve.ingress(api)
    class ChatServer:
        def __init__(self, model: str, max_new_tokens: int, max_batch_size: int, batch_wait_timeout_s: float,
                     digest: str | None, torch_threads: int | None = None):
            import torch

            from speed_ray.generate.hf_engine import HFEngine

            if torch_threads:
                torch.set_num_threads(torch_threads)

            self.model_name = model
            self.max_new_tokens = max_new_tokens
            self.digest = digest
            self.engine = HFEngine(model, batch_size=max_batch_size)
            self.created = int(time.time())
            self._generate.set_max_batch_size(max_batch_size)
            self._generate.set_batch_wait_timeout_s(batch_wait_timeout_s)

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
        async def _generate(self, reqs: list) -> list:
            # generate() is blocking CPU/GPU work: a thread keeps the replica's event loop (and health checks) alive.
            return await asyncio.to_thread(self.engine.generate, reqs)

        def _denied(self, request):
            if authorized(request.headers.get("authorization"), self.digest):
                return None
            return JSONResponse(error_body(401, "missing or invalid bearer token", code="invalid_api_key"), 401)

        @api.get("/health")
        async def health(self):
            return {"status": "ok"}

        @api.get("/v1/models")
        async def models(self, request: Request):
            return self._denied(request) or models_response(self.model_name, self.created)

        @api.post("/v1/chat/completions")
        async def chat(self, request: Request):
            denied = self._denied(request)
            if denied is not None:
                return denied
            try:
                raw = await request.body()
                if len(raw) > MAX_BODY_BYTES:
                    raise APIError(413, f"request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}",
                                   code="request_too_large")
                p = parse_chat_request(parse_json(raw), self.max_new_tokens)
                return await self._complete(p)
            except APIError as e:
                return JSONResponse(e.body(), e.status)
            except Exception as e:  # a bug or an engine crash: a 500 body, never a dead replica
                log.exception("chat completion failed")
                return JSONResponse(error_body(500, f"{type(e).__name__}: {e}", "server_error"), 500)

        async def _complete(self, p):
            from speed_ray.generate.engine import GenRequest

            reqs = [GenRequest(messages=p.messages, temperature=p.temperature, top_p=p.top_p,
                               max_tokens=p.max_tokens, json_schema=p.json_schema,
                               seed=None if p.seed is None else p.seed + i) for i in range(p.n)]
            results = await asyncio.gather(*(self._generate(r) for r in reqs))
            errors = [r.error for r in results if r.finish_reason == "error"]
            if errors:
                # The engine rejects a prompt it cannot encode (too long, bad template) per row: the caller's fault.
                raise APIError(400, f"generation failed: {errors[0]}", code="generation_failed")
            choices = [apply_stop(r.text, r.finish_reason, p.stop) for r in results]
            return chat_response(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.model_name, choices,
                                 results[0].prompt_tokens, sum(r.completion_tokens for r in results))

    return ChatServer.bind(cfg.model, cfg.max_new_tokens, cfg.max_batch_size, cfg.batch_wait_timeout_s, token_digest,
                           torch_threads_for(cfg.torch_threads, cfg.num_cpus))


def build_app(cfg, token_digest: str | None = None):
    """The Serve application for a LocalServerConfig."""
    if cfg.engine == "vllm":
        from speed_ray.models.offline import resolve_model

        return build_vllm_app(cfg, resolve_model(cfg.model))
    return build_hf_app(cfg, token_digest)


def app_builder(args: dict[str, str]):
    """`serve run speed_ray.generate.server:app_builder model=offline:smollm2 engine=hf max_new_tokens=512`."""
    from speed_ray.config import from_dict
    from speed_ray.generate.config import LocalServerConfig

    ints = {"port", "replicas", "max_batch_size", "max_new_tokens"}
    floats = {"num_cpus", "num_gpus", "batch_wait_timeout_s"}
    typed = {k: int(v) if k in ints else float(v) if k in floats else v for k, v in args.items()}
    return build_app(from_dict(LocalServerConfig, typed))


def start(cfg, token: str | None = None, app_name: str = APP_NAME, timeout_s: float = 600.0) -> str:
    """Deploy the app on the connected Ray's Serve and return its base URL once /v1/models answers."""
    from ray import serve

    from speed_ray.serve.auth import check_bind, token_digest
    from speed_ray.serve.lifecycle import connect_host, ensure_serve, wait_healthy

    check_bind(cfg.host, token is not None, allow_unauthenticated_public=False)
    host, port, started = ensure_serve(cfg.host, cfg.port)
    _STATE["started_serve"] = _STATE.get("started_serve", False) or started
    log.info("deploying %s (%s engine, %s replica(s)) on Ray Serve at %s:%s", cfg.model, cfg.engine, cfg.replicas,
             host, port)
    serve.run(build_app(cfg, token_digest(token) if token else None), name=app_name, route_prefix="/",
              blocking=False)
    base_url = f"http://{connect_host(host)}:{port}/v1"
    wait_healthy(base_url, timeout_s, {"Authorization": f"Bearer {token}"} if token else None)
    return base_url


def start_local_server(server_cfg, run_cfg) -> str:
    """The pipeline's teacher endpoint: start (once per driver) and return e.g. http://127.0.0.1:8011/v1."""
    if _STATE.get("base_url"):
        from speed_ray.serve.lifecycle import wait_healthy

        try:
            wait_healthy(_STATE["base_url"], 10)
            return _STATE["base_url"]
        except RuntimeError:
            log.warning("the local model server at %s stopped answering; redeploying", _STATE["base_url"])
    from speed_ray.raylocal import ensure_ray

    ensure_ray(run_cfg.ray_address, run_cfg.num_cpus)
    _STATE["base_url"] = start(server_cfg)
    log.info("local teacher %s serving at %s", server_cfg.model, _STATE["base_url"])
    return _STATE["base_url"]


def stop_local_server() -> None:
    """Delete the teacher app; shut Serve down too when this driver started it (never someone else's apps)."""
    from speed_ray.serve.lifecycle import stop_app

    if _STATE.pop("base_url", None):
        stop_app(APP_NAME, _STATE.pop("started_serve", False))


def server_main(args) -> int:
    """`speed-ray llm-server MODEL --engine hf --host 127.0.0.1 --port 8011`: serve until Ctrl-C."""
    import os

    from speed_ray.generate.config import LocalServerConfig
    from speed_ray.raylocal import ensure_ray
    from speed_ray.serve.auth import load_token

    cfg = LocalServerConfig(model=args.model, engine=args.engine, host=args.host, port=args.port,
                            num_gpus=1.0 if args.engine == "vllm" else 0.0)
    token = load_token("SPEED_RAY_API_TOKEN", None)
    ensure_ray(os.environ.get("RAY_ADDRESS"))
    base_url = start(cfg, token)
    _STATE.update(base_url=base_url)
    print(f"serving {cfg.model} at {base_url} (POST /chat/completions, GET /models"
          f"{'; bearer token from $SPEED_RAY_API_TOKEN' if token else ''}); Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        stop_local_server()
    return 0
