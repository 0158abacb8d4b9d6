"""Models stored at a remote URL (an `s3://` run directory's checkpoints): copied once per node into a local cache
before any loader (transformers, peft, sentence-transformers) sees them, since none of them reads fsspec URLs.

The driver passes remote model URLs through unchanged (`resolve_model`); each process that loads a model calls
`local_model_dir` where it runs, so a worker on another node never receives a path that only the driver has.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

LOCAL_SCHEMES = ("file", "local")


def is_remote(ref: str) -> bool:
    """True for fsspec URLs of remote storage (s3://, gs://, abfs://, ...), False for paths and hub ids."""
    scheme, sep, _ = str(ref).partition("://")
    return bool(sep) and scheme not in LOCAL_SCHEMES


def remote_cache_root() -> Path:
    from speed_ray.models import cache_dir

    return cache_dir() / "remote"


def _signature(fs, path: str) -> tuple[str, list[tuple[str, int]]]:
    """A content signature of a remote directory: relative names, sizes and etags (or mtimes)."""
    files = fs.find(path, detail=True)
    if not files:
        from speed_ray.models import ModelNotFound

        raise ModelNotFound(f"model directory {path!r} is empty or does not exist on {fs.protocol}")
    entries = []
    for name, info in sorted(files.items()):
        rel = name[len(path.rstrip("/")) + 1:]
        tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("mtime") or info.get("LastModified")
        entries.append((rel, int(info.get("size") or 0), str(tag)))
    digest = hashlib.sha256(json.dumps(entries, default=str).encode()).hexdigest()[:16]
    return digest, [(rel, size) for rel, size, _ in entries]


def local_model_dir(ref: str) -> str:
    """A local directory holding the model at `ref`: `ref` itself unless it is a remote URL, else a cached copy.

    The cache key is the URL plus the remote files' names, sizes and etags, so a stage output replaced under the
    same URL (`--force`) is fetched anew. Processes on one node share one copy: a file lock serialises the
    download and the copy is renamed into place complete, so a crash never leaves half a model behind.
    """
    ref = str(ref)
    if not is_remote(ref):
        return ref
    import fsspec
    from filelock import FileLock

    fs, path = fsspec.core.url_to_fs(ref)
    digest, entries = _signature(fs, path)
    name = hashlib.sha256(ref.rstrip("/").encode()).hexdigest()[:12] + "-" + digest
    root = remote_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    with FileLock(str(root / f"{name}.lock")):
        if (target / ".complete").exists():
            return str(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            for rel, size in entries:
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{path.rstrip('/')}/{rel}", str(dest))
                if dest.stat().st_size != size:
                    raise OSError(f"incomplete download of {ref}/{rel}: {dest.stat().st_size} of {size} bytes")
            (tmp / ".complete").write_text(ref)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
