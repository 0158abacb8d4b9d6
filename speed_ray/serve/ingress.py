"""The OpenAI-compatible HTTP ingress both servers share: bearer auth, /health, /v1/models, model routing, body
limits and OpenAI error bodies. The model work lives in a backend object built inside the replica.

A backend is any object with some of:
    served_models: tuple[str, ...]                   the names requests may give as `model` (the first is the default)
    async def chat_completions(body: dict) -> dict   POST /v1/chat/completions
    async def embeddings(body: dict) -> dict         POST /v1/embeddings
    async def check_health() -> None                 raise when the engine is dead (Serve then replaces the replica)
Its handlers get the parsed JSON object (valid Unicode, a served model) and raise protocol.APIError for the caller's
mistakes; anything else they raise is a 500 with an OpenAI error body, and the replica keeps serving.
"""

# No `from __future__ import annotations` here: FastAPI reads handler annotations (Request) at definition time.

import json
import logging
import time
from typing import Any, Callable

from speed_ray.serve.protocol import APIError, models_response, parse_json, route_model

log = logging.getLogger("speed_ray.serve")

# POST routes -> the backend method that answers them.
ENDPOINTS = {"/v1/chat/completions": "chat_completions", "/v1/embeddings": "embeddings"}
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def error_response(err: APIError, headers: dict | None = None):
    """An OpenAI error body. ASCII-escaped JSON, so no text in a message (a name echoed from a request) can fail to
    encode."""
    from starlette.responses import Response

    return Response(json.dumps(err.body(), ensure_ascii=True), status_code=err.status, headers=headers,
                    media_type="application/json")


def unauthorized():
    return error_response(APIError(401, "missing or invalid bearer token", code="invalid_api_key"),
                          {"WWW-Authenticate": "Bearer"})


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it exceeds `limit` bytes (before it is all in memory)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {int(declared)} bytes; the limit is {limit}", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def build_ingress(backend_factory: Callable[[], Any], *, name: str, title: str, token_digest: str | None,
                  max_body_bytes: int, deployment_options: dict):
    """A bound Serve application: one FastAPI ingress deployment whose replicas each build one backend.

    backend_factory is called in the replica (it loads the model there) and must pickle: a module-level class or a
    functools.partial of one. Only the token's digest travels to the replicas.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from ray import serve
    from starlette.exceptions import HTTPException

    from speed_ray.serve.auth import authorized

    # No /docs or /openapi.json: the only unauthenticated routes are /health and the OpenAI-shaped 404/405s.
    api = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)

    @api.exception_handler(HTTPException)
    async def _http_error(request, exc):  # 404/405 and friends in the OpenAI shape
        code = _HTTP_CODES.get(exc.status_code, str(exc.status_code))
        return error_response(APIError(exc.status_code, f"{exc.detail} ({request.method} {request.url.path})",
                                       code=code), getattr(exc, "headers", None))

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return error_response(APIError(422, "invalid request", code="invalid_request"))

    @serve.deployment(name=name, **deployment_options)
    @serve.ingress(api)
    class OpenAIIngress:
        def __init__(self, factory: Callable[[], Any], digest: str | None, max_body: int):
            self.backend = factory()
            self.served = tuple(self.backend.served_models)
            self.digest, self.max_body, self.created = digest, max_body, int(time.time())

        async def check_health(self):
            check = getattr(self.backend, "check_health", None)
            if check is not None:
                await check()

        def _denied(self, request):
            return None if authorized(request.headers.get("authorization"), self.digest) else unauthorized()

        @api.get("/health")
        async def health(self):
            return {"status": "ok"}

        @api.get("/v1/models")
        async def models(self, request: Request):
            return self._denied(request) or models_response(self.served, self.created)

        @api.post("/v1/chat/completions")
        async def chat_completions(self, request: Request):
            return await self._answer(request, "/v1/chat/completions")

        @api.post("/v1/embeddings")
        async def embeddings(self, request: Request):
            return await self._answer(request, "/v1/embeddings")

        async def _answer(self, request, path: str):
            denied = self._denied(request)
            if denied is not None:
                return denied
            handler = getattr(self.backend, ENDPOINTS[path], None)
            if handler is None:
                served = [p for p, m in ENDPOINTS.items() if hasattr(self.backend, m)]
                return error_response(APIError(404, f"this server does not serve {path}; it serves "
                                               f"{', '.join(served)}", code="not_found"))
            try:
                body = parse_json(await read_body(request, self.max_body))
                route_model(body, self.served)
                return await handler(body)
            except APIError as e:
                return error_response(e)
            except Exception as e:  # a bug or an engine crash: a 500 body, never a dead replica
                log.exception("%s failed", path)
                return error_response(APIError(500, f"{type(e).__name__}: {e}", "server_error", "internal_error"))

    return OpenAIIngress.bind(backend_factory, token_digest, max_body_bytes)
