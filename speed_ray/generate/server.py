"""The local teacher: an OpenAI-compatible /v1/chat/completions on Ray Serve (HF engine on CPU, or vLLM on GPU).

Both engines sit behind the same ingress (speed_ray.serve.ingress: bearer auth, /health, /v1/models, model routing,
body limits, OpenAI error bodies). Below it, the engine boundary is one method, `async chat(ChatParams) -> ChatOutput`:
HFChatEngine (transformers, requests batched into one generate()) or VLLMChatEngine (vLLM's AsyncLLM, imported only
in the replica that builds it).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from speed_ray.generate.config import torch_threads_for
from speed_ray.serve.protocol import APIError, ChatParams, apply_stop, chat_response, parse_chat_request

log = logging.getLogger("speed_ray.generate.server")

APP_NAME = "speed-ray-teacher"
MAX_BODY_BYTES = 8 << 20
_STATE: dict[str, Any] = {}   # this driver's running server: base_url, and whether it started Serve itself


@dataclass
class ChatOutput:
    """What an engine answers for one ChatParams: n (text, finish_reason) choices and the token counts."""

    choices: list[tuple[str, str]]
    prompt_tokens: int
    completion_tokens: int


# ---------------------------------------------------------------- the engines

class HFChatEngine:
    """The CPU engine: transformers generate; concurrent requests are batched into one generate() call."""

    def __init__(self, model: str, max_batch_size: int, batch_wait_timeout_s: float, torch_threads: int | None = None):
        import torch
        from ray import serve

        from speed_ray.generate.hf_engine import HFEngine

        if torch_threads:
            torch.set_num_threads(torch_threads)
        engine = HFEngine(model, batch_size=max_batch_size)

        async def generate(reqs: list) -> list:
            # generate() is blocking CPU/GPU work: a thread keeps the replica's event loop (and health checks) alive.
            return await asyncio.to_thread(engine.generate, reqs)

        self._generate = serve.batch(max_batch_size=max_batch_size,
                                     batch_wait_timeout_s=batch_wait_timeout_s)(generate)

    async def chat(self, p: ChatParams) -> ChatOutput:
        from speed_ray.llm.rows import LLMRequest

        reqs = [LLMRequest(messages=p.messages, temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens,
                           json_schema=p.json_schema, seed=None if p.seed is None else p.seed + i)
                for i in range(p.n)]
        results = await asyncio.gather(*(self._generate(r) for r in reqs))
        errors = [r.error for r in results if r.finish_reason == "error"]
        if errors:
            # The engine rejects a prompt it cannot encode (too long, bad template) per row: the caller's fault.
            raise APIError(400, f"generation failed: {errors[0]}", code="generation_failed")
        return ChatOutput([apply_stop(r.text, r.finish_reason, p.stop) for r in results], results[0].prompt_tokens,
                          sum(r.completion_tokens for r in results))


def vllm_engine_args(cfg, model_source: str) -> dict:
    """vLLM AsyncEngineArgs kwargs for a LocalServerConfig (pure, so it is testable without vLLM)."""
    return {"model": model_source, "served_model_name": cfg.model, "tensor_parallel_size": 1,
            # vLLM batches continuously: max_num_seqs is its concurrent-sequence cap.
            "max_num_seqs": max(cfg.max_batch_size, 1), "enable_prefix_caching": True}


def vllm_sampling_kwargs(p: ChatParams) -> dict:
    """vLLM SamplingParams kwargs for a parsed request (pure). `structured_outputs` is StructuredOutputsParams's kwargs:
    {"json": schema}, which vLLM's structured-output backend honours. vLLM seeds the n samples seed, seed+1, ..."""
    kw: dict[str, Any] = {"n": p.n, "temperature": p.temperature, "top_p": p.top_p, "max_tokens": p.max_tokens}
    if p.seed is not None:
        kw["seed"] = p.seed
    if p.stop:
        kw["stop"] = list(p.stop)
    if p.json_schema is not None:
        kw["structured_outputs"] = {"json": p.json_schema}
    return kw


class VLLMChatEngine:
    """The GPU engine: vLLM's AsyncLLM in this replica (continuous batching, structured outputs). Needs vllm."""

    def __init__(self, model_source: str, engine_args: dict):
        try:
            from vllm import TokensPrompt
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as e:
            raise RuntimeError(f"engine 'vllm' needs vllm installed on the GPU nodes ({e}); use engine: hf on CPU") \
                from e
        try:
            from vllm.exceptions import VLLMClientError
            self._client_errors: tuple = (ValueError, VLLMClientError)
        except ImportError:   # older vLLM: its validation errors are ValueErrors
            self._client_errors = (ValueError,)
        from speed_ray.models.remote import local_model_dir

        self._TokensPrompt, self._SamplingParams = TokensPrompt, SamplingParams
        self._StructuredOutputsParams, self._final_only = StructuredOutputsParams, RequestOutputKind.FINAL_ONLY
        # an s3:// checkpoint (a trained generator) is fetched once per node
        engine_args = {**engine_args, "model": local_model_dir(model_source)}
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args))
        self.max_model_len = int(self.llm.model_config.max_model_len)
        self._tokenizer = None

    async def _encode(self, messages: list[dict]) -> list[int]:
        if self._tokenizer is None:
            tok = self.llm.get_tokenizer()
            self._tokenizer = await tok if inspect.isawaitable(tok) else tok
        ids = await asyncio.to_thread(self._tokenizer.apply_chat_template, messages, add_generation_prompt=True,
                                      tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def sampling_params(self, p: ChatParams, prompt_len: int):
        kw = vllm_sampling_kwargs(p)
        kw["max_tokens"] = min(kw["max_tokens"], self.max_model_len - prompt_len)
        so = kw.pop("structured_outputs", None)
        return self._SamplingParams(**kw, output_kind=self._final_only,
                                    structured_outputs=self._StructuredOutputsParams(**so) if so else None)

    async def chat(self, p: ChatParams) -> ChatOutput:
        try:
            ids = await self._encode(p.messages)
            if len(ids) >= self.max_model_len:
                raise ValueError(f"prompt of {len(ids)} tokens exceeds max_model_len {self.max_model_len}")
            final, prompt = None, self._TokensPrompt(prompt_token_ids=ids)
            async for out in self.llm.generate(prompt, self.sampling_params(p, len(ids)), f"req-{uuid.uuid4().hex}"):
                final = out
        except APIError:
            raise
        except self._client_errors as e:   # the request's fault (too long, a schema vLLM cannot compile, ...)
            raise APIError(400, f"generation failed: {type(e).__name__}: {e}", code="generation_failed") from None
        except Exception as e:
            if type(e).__name__ == "TemplateError":   # jinja: a conversation the chat template refuses
                raise APIError(400, f"chat template: {e}", code="generation_failed") from None
            raise
        if final is None or any(o.finish_reason == "abort" for o in final.outputs):
            raise RuntimeError("vLLM aborted the request")
        outs = sorted(final.outputs, key=lambda o: o.index)
        return ChatOutput([(o.text, "length" if o.finish_reason == "length" else "stop") for o in outs],
                          len(final.prompt_token_ids or ids), sum(len(o.token_ids) for o in outs))

    async def check_health(self) -> None:
        await self.llm.check_health()


# ---------------------------------------------------------------- the app

class ChatBackend:
    """POST /v1/chat/completions behind the shared ingress: parse, hand ChatParams to the engine, answer."""

    def __init__(self, engine_factory, served_models: tuple[str, ...], max_new_tokens: int):
        self.engine = engine_factory()
        self.served_models = tuple(served_models)
        self.max_new_tokens = max_new_tokens

    async def chat_completions(self, body: dict) -> dict:
        p = parse_chat_request(body, self.max_new_tokens)
        out = await self.engine.chat(p)
        return chat_response(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), p.model or self.served_models[0],
                             out.choices, out.prompt_tokens, out.completion_tokens)

    async def check_health(self) -> None:
        check = getattr(self.engine, "check_health", None)
        if check is not None:
            await check()


def _deployment_options(cfg) -> dict:
    return {"num_replicas": cfg.replicas, "max_ongoing_requests": max(64, 4 * cfg.max_batch_size),
            "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus}}


def _served_names(cfg, aliases) -> tuple[str, ...]:
    return tuple(dict.fromkeys([cfg.model, *(a for a in aliases if a)]))


def _build(cfg, engine_factory, token_digest: str | None, aliases) -> Any:
    import functools

    from speed_ray.serve.ingress import build_ingress

    backend = functools.partial(ChatBackend, engine_factory, _served_names(cfg, aliases), cfg.max_new_tokens)
    return build_ingress(backend, name="ChatServer", title="speed-ray chat completions", token_digest=token_digest,
                         max_body_bytes=MAX_BODY_BYTES, deployment_options=_deployment_options(cfg))


def build_hf_app(cfg, token_digest: str | None = None, aliases: tuple[str, ...] = ()):
    """The HF-engine chat app (CPU, or a GPU with transformers)."""
    import functools

    return _build(cfg, functools.partial(HFChatEngine, cfg.model, cfg.max_batch_size, cfg.batch_wait_timeout_s,
                                         torch_threads_for(cfg.torch_threads, cfg.num_cpus)), token_digest, aliases)


def build_vllm_app(cfg, model_source: str, token_digest: str | None = None, aliases: tuple[str, ...] = (),
                   engine_class: type | None = None):
    """The vLLM chat app: our ingress over VLLMChatEngine(model_source, engine_args) in each GPU replica.

    engine_class replaces VLLMChatEngine (same constructor, same chat()) and nothing else: a CPU rehearsal passes a
    stand-in here explicitly; there is no default other than vLLM.
    """
    import functools

    cls = engine_class or VLLMChatEngine
    return _build(cfg, functools.partial(cls, model_source, vllm_engine_args(cfg, model_source)), token_digest,
                  aliases)


def build_app(cfg, token_digest: str | None = None, aliases: tuple[str, ...] = (),
              vllm_engine_class: type | None = None):
    """The Serve application for a LocalServerConfig; requests may name cfg.model or one of `aliases`."""
    if cfg.engine == "vllm":
        from speed_ray.models.offline import resolve_model

        return build_vllm_app(cfg, resolve_model(cfg.model), token_digest, aliases, vllm_engine_class)
    return build_hf_app(cfg, token_digest, aliases)


def app_builder(args: dict[str, str]):
    """`serve run speed_ray.generate.server:app_builder model=offline:smollm2 engine=hf max_new_tokens=512`.

    The bearer token comes from $SPEED_RAY_API_TOKEN, read here; only its digest travels to the replicas.
    """
    from speed_ray.config import from_dict
    from speed_ray.generate.config import LocalServerConfig
    from speed_ray.serve.auth import load_token, token_digest

    ints = {"port", "replicas", "max_batch_size", "max_new_tokens"}
    floats = {"num_cpus", "num_gpus", "batch_wait_timeout_s"}
    typed = {k: int(v) if k in ints else float(v) if k in floats else v for k, v in args.items()}
    token = load_token("SPEED_RAY_API_TOKEN", None)
    return build_app(from_dict(LocalServerConfig, typed), token_digest(token) if token else None)


def start(cfg, token: str | None = None, app_name: str = APP_NAME, timeout_s: float = 600.0,
          aliases: tuple[str, ...] = (), route_prefix: str = "/", vllm_engine_class: type | None = None) -> str:
    """Deploy the app on the connected Ray's Serve and return its base URL once /v1/models answers.

    A non-loopback bind needs a token, checked both for cfg.host and for the address Serve really listens on (Serve
    has one HTTP address per cluster, and one already running keeps its own).
    """
    from ray import serve

    from speed_ray.serve.auth import check_bind, token_digest
    from speed_ray.serve.lifecycle import connect_host, ensure_serve, wait_healthy

    check_bind(cfg.host, token is not None, allow_unauthenticated_public=False)
    host, port, started = ensure_serve(cfg.host, cfg.port)
    _STATE["started_serve"] = _STATE.get("started_serve", False) or started
    check_bind(host, token is not None, allow_unauthenticated_public=False)
    log.info("deploying %s (%s engine, %s replica(s)) on Ray Serve at %s:%s", cfg.model, cfg.engine, cfg.replicas,
             host, port)
    serve.run(build_app(cfg, token_digest(token) if token else None, aliases, vllm_engine_class), name=app_name,
              route_prefix=route_prefix, blocking=False)
    base_url = f"http://{connect_host(host)}:{port}{route_prefix.rstrip('/')}/v1"
    wait_healthy(base_url, timeout_s, {"Authorization": f"Bearer {token}"} if token else None)
    return base_url


def start_local_server(server_cfg, run_cfg, aliases: tuple[str, ...] = ()) -> str:
    """The pipeline's teacher endpoint: start (once per driver) and return e.g. http://127.0.0.1:8011/v1.

    aliases: other model names the teacher client may send (teacher.model), answered by server_cfg.model.
    """
    if _STATE.get("base_url"):
        from speed_ray.serve.lifecycle import wait_healthy

        try:
            wait_healthy(_STATE["base_url"], 10)
            return _STATE["base_url"]
        except RuntimeError:
            log.warning("the local model server at %s stopped answering; redeploying", _STATE["base_url"])
    from speed_ray.raylocal import ensure_ray

    ensure_ray(run_cfg.ray_address, run_cfg.num_cpus)
    _STATE["base_url"] = start(server_cfg, aliases=tuple(aliases))
    log.info("local teacher %s serving at %s", server_cfg.model, _STATE["base_url"])
    return _STATE["base_url"]


def stop_local_server() -> None:
    """Delete the teacher app; shut Serve down too when this driver started it (never someone else's apps)."""
    from speed_ray.serve.lifecycle import stop_app

    if _STATE.pop("base_url", None):
        stop_app(APP_NAME, _STATE.pop("started_serve", False))


def server_config(args):
    """The LocalServerConfig of `speed-ray llm-server MODEL --engine E --host H --port P` (vLLM: one GPU a replica)."""
    from speed_ray.generate.config import LocalServerConfig

    return LocalServerConfig(model=args.model, engine=args.engine, host=args.host, port=args.port,
                             num_gpus=1.0 if args.engine == "vllm" else 0.0)


def server_main(args) -> int:
    """`speed-ray llm-server MODEL --engine hf --host 127.0.0.1 --port 8011`: serve until Ctrl-C.

    The bearer token comes from $SPEED_RAY_API_TOKEN; with none, only a loopback bind is allowed.
    """
    import os

    from speed_ray.raylocal import ensure_ray
    from speed_ray.serve.auth import load_token

    cfg = server_config(args)
    token = load_token("SPEED_RAY_API_TOKEN", None)
    ensure_ray(os.environ.get("RAY_ADDRESS"))
    base_url = start(cfg, token)
    _STATE.update(base_url=base_url)
    print(f"serving {cfg.model} at {base_url} (POST /chat/completions, GET /models"
          f"{'; bearer token from $SPEED_RAY_API_TOKEN' if token else ''}); Ctrl-C to stop", flush=True)
    from speed_ray.serve.lifecycle import serve_until_interrupted

    serve_until_interrupted(stop_local_server)
    return 0
