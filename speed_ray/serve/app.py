"""Serve a trained embedder on Ray Serve with an OpenAI-compatible /v1/embeddings (auth, limits, batching)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

from speed_ray.serve.protocol import embeddings_response, parse_embeddings_request, query_prefix, truncate_normalize
from speed_ray.store import find_run_model  # one implementation, shared with `speed-ray evaluate RUN_DIR`

log = logging.getLogger("speed_ray.serve")

APP_NAME = "speed-ray-embeddings"


def resolve_served_model(spec: str) -> str:
    """MODEL_OR_RUN_DIR -> a local model dir or hub id SentenceTransformer loads."""
    from speed_ray.models.offline import resolve_model

    if not spec.startswith("offline:") and ("://" in spec or os.path.isdir(spec)):
        path = find_run_model(spec)
        if path is not None:
            log.info("serving the embedder of run %s: %s", spec, path)
            return path
    return resolve_model(spec)


def deployment_options(cfg) -> dict:
    """Serve deployment options from a ServeConfig (pure: replicas or autoscaling, resources, queue depth)."""
    opts: dict[str, Any] = {"ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
                            "max_ongoing_requests": max(64, 2 * cfg.target_ongoing_requests)}
    if cfg.replicas_max > cfg.replicas_min:
        opts["autoscaling_config"] = {"min_replicas": cfg.replicas_min, "max_replicas": cfg.replicas_max,
                                      "target_ongoing_requests": cfg.target_ongoing_requests}
    else:
        opts["num_replicas"] = cfg.replicas_min
    opts["max_ongoing_requests"] = int(opts["max_ongoing_requests"])
    return opts


def _count_texts(items: list) -> int:
    return sum(len(texts) for _, texts in items)


class EmbeddingsBackend:
    """POST /v1/embeddings behind the shared ingress (speed_ray.serve.ingress): concurrent requests are batched into
    shared encodes, bounded in texts rather than in requests."""

    def __init__(self, model_path: str, cfg, served_name: str):
        import torch
        from ray import serve
        from sentence_transformers import SentenceTransformer

        from speed_ray.models.remote import local_model_dir

        if cfg.num_gpus == 0:
            # Ray pins a fractional-CPU actor to one thread; the config says how many this replica may use.
            torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.num_cpus)))
        device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.cfg = cfg
        self.model = SentenceTransformer(local_model_dir(model_path), device=device)   # s3:// run dirs too
        self.dim = self.model.get_sentence_embedding_dimension()
        self.prompts = dict(getattr(self.model, "prompts", None) or {})
        self.served_models = (served_name,)

        async def embed(items: list) -> list:
            return await asyncio.to_thread(self._encode, items)

        self._embed = serve.batch(max_batch_size=max(cfg.max_batch_size, cfg.max_inputs),
                                  batch_wait_timeout_s=cfg.batch_wait_timeout_s, batch_size_fn=_count_texts)(embed)

    def _encode(self, items: list) -> list:
        """(prefix, texts) per request -> (normalized float32 vectors, token count) per request."""
        import numpy as np

        by_prefix: dict[str, list[tuple[int, int]]] = {}
        for i, (prefix, texts) in enumerate(items):
            by_prefix.setdefault(prefix, []).extend((i, j) for j in range(len(texts)))
        out = [np.zeros((len(t), self.dim), np.float32) for _, t in items]
        tokens = [0] * len(items)
        for prefix, slots in by_prefix.items():
            texts = [items[i][1][j] for i, j in slots]
            vecs = self.model.encode(texts, prompt=prefix or None, batch_size=self.cfg.encode_batch_size,
                                     normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
            lens = self.model.tokenize([prefix + t for t in texts])["attention_mask"].sum(dim=1).tolist()
            for (i, j), v, n in zip(slots, vecs, lens):
                out[i][j] = v
                tokens[i] += int(n)
        return list(zip(out, tokens))

    async def embeddings(self, body: dict) -> dict:
        p = parse_embeddings_request(body, self.cfg.max_inputs, self.cfg.max_input_chars, self.dim)
        vecs, n_tokens = await self._embed((query_prefix(p, self.prompts), tuple(p.texts)))
        return embeddings_response(truncate_normalize(vecs, p.dimensions), p.model or self.served_models[0],
                                   p.encoding_format, n_tokens)


def max_body_bytes(cfg) -> int:
    """The largest body a ServeConfig's limits allow (every input at its longest, \\uXXXX-escaped), then a 413."""
    return cfg.max_inputs * (cfg.max_input_chars * 6 + 16) + 65536


def build_embeddings_app(model_path: str, cfg, served_name: str | None = None, token_digest: str | None = None):
    """The Serve application: the shared OpenAI ingress over an EmbeddingsBackend, one per replica."""
    import functools

    from speed_ray.serve.ingress import build_ingress

    backend = functools.partial(EmbeddingsBackend, model_path, cfg, served_name or cfg.model_name or model_path)
    return build_ingress(backend, name="Embedder", title="speed-ray embeddings", token_digest=token_digest,
                         max_body_bytes=max_body_bytes(cfg), deployment_options=deployment_options(cfg))


def start(model: str, cfg, ray_address: str | None = None, timeout_s: float = 600.0, app_name: str = APP_NAME,
          route_prefix: str = "/") -> tuple[str, bool]:
    """Resolve the model, check auth and binding, deploy; returns (base URL once /v1/models answers, started Serve)."""
    from ray import serve

    from speed_ray.raylocal import ensure_ray
    from speed_ray.serve.auth import check_bind, load_token, token_digest
    from speed_ray.serve.lifecycle import connect_host, ensure_serve, wait_healthy

    token = load_token(cfg.token_env, cfg.token_file)
    check_bind(cfg.host, token is not None, cfg.allow_unauthenticated_public)
    if token is None:
        log.warning("no API token configured ($%s or serve.token_file): the server is unauthenticated",
                    cfg.token_env)
    path = resolve_served_model(model)
    ensure_ray(ray_address)
    host, port, started = ensure_serve(cfg.host, cfg.port)
    # Serve has one HTTP address per cluster: one already running elsewhere (0.0.0.0) is where this app is reachable.
    check_bind(host, token is not None, cfg.allow_unauthenticated_public)
    serve.run(build_embeddings_app(path, cfg, cfg.model_name or model, token_digest(token) if token else None),
              name=app_name, route_prefix=route_prefix, blocking=False)
    base_url = f"http://{connect_host(host)}:{port}{route_prefix.rstrip('/')}/v1"
    wait_healthy(base_url, timeout_s, {"Authorization": f"Bearer {token}"} if token else None)
    return base_url, started
