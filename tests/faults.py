"""Fault injection for tests: a filesystem that runs out of space, and byte-level damage to shards."""

import errno
import io
import json
import os
import tarfile
from pathlib import Path

import fsspec
from fsspec.implementations.memory import MemoryFileSystem


class FullDisk(MemoryFileSystem):
    """An object store in memory (URLs ``fulldisk://...``) with `free` bytes left (None: no limit). An
    upload past it raises OSError(ENOSPC), as a full disk or an exhausted bucket quota does; like GCS, an
    object appears only when its upload completes."""

    protocol = "fulldisk"
    store: dict = {}
    pseudo_dirs = [""]
    free: int | None = None

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        if mode in ("wb", "xb", "w+b", "x+b"):
            if "data" not in kwargs:
                return _Upload(self, path)
            self._spend(path, len(kwargs["data"]))
        return super()._open(path, mode, block_size, autocommit, cache_options, **kwargs)

    def _spend(self, path: str, size: int) -> None:
        if FullDisk.free is not None:
            if size > FullDisk.free:
                name = path if "://" in path else f"fulldisk://{path.lstrip('/')}"
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
            FullDisk.free -= size

    @classmethod
    def reset(cls, free: int | None = None) -> None:
        cls.store.clear()
        cls.pseudo_dirs[:] = [""]
        cls.free = free

    @classmethod
    def snapshot(cls) -> dict[str, bytes]:
        return {k: bytes(v.getbuffer()) for k, v in cls.store.items()}


class _Upload(io.BytesIO):
    def __init__(self, fs: FullDisk, path: str):
        super().__init__()
        self.fs, self.path = fs, path

    def __exit__(self, kind, value, traceback):
        if kind is None:
            self.close()
        else:
            super().close()        # an interrupted upload publishes nothing

    def close(self):
        if not self.closed:
            data = self.getvalue()
            super().close()
            self.fs.pipe_file(self.path, data)


fsspec.register_implementation("fulldisk", FullDisk, clobber=True)


def snapshot(folder) -> dict[str, bytes]:
    """Every file under a local folder: relative path → bytes."""
    root = Path(folder)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def members(shard) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as tar:
        return tar.getmembers()


def break_header(shard, index: int = 2) -> None:
    """Damage the header checksum of the shard's `index`-th tar member (a tar stream then ends there)."""
    info = members(shard)[index]
    data = bytearray(Path(shard).read_bytes())
    data[info.offset + 148: info.offset + 156] = b"99999999"
    Path(shard).write_bytes(bytes(data))


def break_jpegs(shard) -> str:
    """Overwrite the start-of-image marker of every frame of the shard's first sample; returns its key."""
    meta_info, jpgs_info = members(shard)[:2]
    data = bytearray(Path(shard).read_bytes())
    meta = json.loads(data[meta_info.offset_data: meta_info.offset_data + meta_info.size])
    for offset in meta["offsets"][:-1]:
        data[jpgs_info.offset_data + offset: jpgs_info.offset_data + offset + 2] = b"\x00\x00"
    Path(shard).write_bytes(bytes(data))
    return meta["key"]
