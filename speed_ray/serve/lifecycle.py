"""Starting Ray Serve's HTTP proxies once and waiting for an app to answer: shared by both servers."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("speed_ray.serve")


def running_http() -> tuple[str, int] | None:
    """The host/port of the Serve proxies already running in this cluster, if any (private API, best effort)."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        if client is None:
            return None
        http = client.http_config
        return http.host, http.port
    except Exception:  # pragma: no cover - the private API moved
        return None


def ensure_serve(host: str, port: int) -> tuple[str, int, bool]:
    """Start Serve on host:port unless it already runs; returns (host, port, started_here).

    Proxies run on every node, all bound to the same host: with the loopback default, a Ray worker on any node
    reaches the app on its own 127.0.0.1, so a multi-node job needs no open port.
    """
    from ray import serve

    running = running_http()
    if running is None:
        serve.start(http_options={"host": host, "port": port}, proxy_location="EveryNode")
        return host, port, True
    if running != (host, port):
        # Serve has one HTTP address per cluster; a second serve.start would silently keep the first.
        log.warning("Ray Serve already listens on %s:%s in this cluster; using it instead of %s:%s",
                    running[0], running[1], host, port)
    return running[0], running[1], False


def connect_host(host: str) -> str:
    """Where a local client connects for a bind address (a wildcard bind is reachable on loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def wait_healthy(base_url: str, timeout_s: float, headers: dict | None = None) -> None:
    """Poll GET {base_url}/models until it answers 200, or raise naming the last failure."""
    import httpx

    deadline = time.time() + timeout_s
    last = ""
    while time.time() < deadline:
        try:
            r = httpx.get(f"{base_url}/models", timeout=5, headers=headers)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.5)
    raise RuntimeError(f"the server at {base_url} did not become healthy in {timeout_s:.0f}s ({last})")


def stop_app(app_name: str, shutdown_serve: bool) -> None:
    """Delete one app; shut Serve down only when this process started it and nothing else runs on it."""
    from ray import serve

    try:
        serve.delete(app_name)
    finally:
        if shutdown_serve and not serve.status().applications:
            serve.shutdown()


def serve_until_interrupted(stop) -> None:
    """Block until Ctrl-C, then call stop() (the `speed-ray serve` and `serve-llm` commands' foreground loop)."""
    import time

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        stop()
