"""Model resolution and the offline demo models."""

import os
from pathlib import Path


class ModelNotFound(ValueError):
    """A config names a model that is neither a local directory, an offline name, nor a usable hub id."""


def cache_dir() -> Path:
    """Where prepared offline models and local copies of remote ones live ($SPEED_RAY_CACHE/models)."""
    return Path(os.environ.get("SPEED_RAY_CACHE", Path.home() / ".cache" / "speed-ray")) / "models"
