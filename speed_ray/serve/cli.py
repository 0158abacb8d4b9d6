"""The embeddings server's commands: `speed-ray serve` and the `serve run speed_ray.serve.cli:app_builder` target.

They read a run config (speed_ray.run_config), so they sit in the command layer above the server itself
(speed_ray.serve.app), which takes a ServeConfig and knows nothing of runs' configs.
"""

from __future__ import annotations

from typing import Any

from speed_ray.serve.app import APP_NAME, build_embeddings_app, resolve_served_model, start


def _serve_cfg(args) -> tuple[Any, Any]:
    """(RunSection, ServeConfig) from --config/overrides plus the command line's --host/--port/--allow-..."""
    import dataclasses

    from speed_ray.run_config import RunConfig, load_config, replace

    overrides = list(getattr(args, "overrides", None) or [])
    cfg = load_config(args.config, overrides) if getattr(args, "config", None) else replace(RunConfig(), overrides)
    s = cfg.serve
    s = dataclasses.replace(s, host=getattr(args, "host", None) or s.host, port=getattr(args, "port", None) or s.port,
                            allow_unauthenticated_public=bool(getattr(args, "allow_unauthenticated_public", False))
                            or s.allow_unauthenticated_public)
    return cfg.run, s


def serve_main(args) -> int:
    """`speed-ray serve MODEL_OR_RUN_DIR [--config c.yaml] [--host H] [--port P]`: serve until Ctrl-C."""
    from speed_ray.serve.lifecycle import serve_until_interrupted, stop_app

    run, cfg = _serve_cfg(args)
    base_url, started = start(args.model, cfg, run.ray_address)
    print(f"serving {args.model} at {base_url} (POST /embeddings, GET /models); Ctrl-C to stop", flush=True)
    serve_until_interrupted(lambda: stop_app(APP_NAME, started))
    return 0


def app_builder(args: dict[str, str]):
    """`serve run speed_ray.serve.cli:app_builder model=RUN_DIR_OR_MODEL [config=c.yaml] [serve.x=y ...]`.

    The token is read here, in the process that deploys, and only its digest travels to the replicas.
    """
    import argparse

    from speed_ray.serve.auth import load_token, token_digest

    args = dict(args)
    model = args.pop("model")
    ns = argparse.Namespace(config=args.pop("config", None),
                            overrides=[f"{k if k.startswith('serve.') else 'serve.' + k}={v}" for k, v in args.items()])
    _, cfg = _serve_cfg(ns)
    token = load_token(cfg.token_env, cfg.token_file)
    return build_embeddings_app(resolve_served_model(model), cfg, cfg.model_name or model,
                                token_digest(token) if token else None)
