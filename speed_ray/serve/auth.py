"""Bearer-token auth for the servers: tokens from an env var or a file, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from pathlib import Path

from speed_ray.config import ConfigError


def load_token(token_env: str | None, token_file: str | None) -> str | None:
    """The configured token: the file wins over the env var; None when neither is set."""
    if token_file:
        p = Path(token_file).expanduser()
        if not p.is_file():
            raise ConfigError(f"token file {p} does not exist", "serve.token_file")
        token = p.read_text().strip()
        if not token:
            raise ConfigError(f"token file {p} is empty", "serve.token_file")
        return token
    token = os.environ.get(token_env or "", "").strip() if token_env else ""
    return token or None


def token_digest(token: str) -> str:
    """What the replicas hold: a SHA-256 of the token, so the secret itself never enters Serve's stored config."""
    return hashlib.sha256(token.encode()).hexdigest()


def authorized(header: str | None, digest: str | None) -> bool:
    """Whether an Authorization header carries the token; True when no token is configured."""
    if digest is None:
        return True
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return False
    return hmac.compare_digest(token_digest(given.strip()), digest)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, has_token: bool, allow_unauthenticated_public: bool) -> None:
    """Refuse to expose an unauthenticated server beyond this machine unless the user said so."""
    if not has_token and not is_loopback(host) and not allow_unauthenticated_public:
        raise ConfigError(f"refusing to bind {host} with no API token configured: set the token env var or "
                          "token_file, bind 127.0.0.1, or pass --allow-unauthenticated-public", "serve.host")
