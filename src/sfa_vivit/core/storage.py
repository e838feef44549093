"""Storage: every local path or URL (gs://, memory://, ...) is opened through fsspec from here.

gcsfs settings that matter for correctness live in one place: listings are never cached (a prep
job and a reader must see the objects that exist now), and the hierarchical-namespace probe is
off by default (against the GCS emulator it makes every call hang 30-120 s).
"""

from __future__ import annotations

import os
from typing import Any

import fsspec

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

_GCS_OPTIONS: dict[str, Any] = {"use_listings_cache": False}


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for a URL: for gs:// no listing cache, and anonymous access to an emulator
    named by STORAGE_EMULATOR_HOST."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("gs", "gcs"):
        options = dict(_GCS_OPTIONS)
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            options["token"] = "anon"
        return options
    return {}


def url_to_fs(url: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for a local path or URL."""
    url = os.fspath(url)
    return fsspec.core.url_to_fs(url, **storage_options(url))


def open_url(url: str | os.PathLike, mode: str = "rb"):
    """Open a local path or URL as a file object (use as a context manager)."""
    fs, path = url_to_fs(url)
    return fs.open(path, mode)


def join(base: str, *names: str) -> str:
    """Join URL/path parts with '/' (fsspec paths use '/' on every platform)."""
    out = os.fspath(base).rstrip("/")
    for name in names:
        out += "/" + name.strip("/")
    return out


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return any(p in ("file", "local") for p in protocols)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Publish `data` at `url` whole or not at all: temporary name + rename on local disks (with
    fsync), a single-object upload on object stores (an object appears only when complete). On any
    failure (a full disk, an interrupt) the previous file at `url`, if any, is left as it was and the
    temporary file is removed."""
    fs, path = url_to_fs(url)
    if is_local(fs):
        import uuid
        fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            _remove_quietly(tmp)    # a full disk or an interrupt leaves no *.tmp-* behind
            raise
    else:
        fs.pipe_file(path, data)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def remove(url: str) -> None:
    """Delete the file at `url` if it is there."""
    fs, path = url_to_fs(url)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def json_bytes(obj: Any) -> bytes:
    """`obj` as readable JSON: one key per line, but every list of numbers on one line (a confusion-matrix
    row, a per-epoch curve), so a 400-class confusion matrix is 400 lines, not 160,000."""
    import json
    rows: dict[str, str] = {}

    def fold(x: Any) -> Any:
        if isinstance(x, list) and x and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                                             for v in x):
            key = f"\x00{len(rows)}\x00"
            rows[key] = json.dumps(x, allow_nan=False)
            return key
        if isinstance(x, list):
            return [fold(v) for v in x]
        if isinstance(x, dict):
            return {k: fold(v) for k, v in x.items()}
        return x

    text = json.dumps(fold(obj), indent=1, allow_nan=False)
    for key, row in rows.items():
        text = text.replace(json.dumps(key), row, 1)
    return text.encode()
