"""What prep publishes and training reads: `manifest.json` (class names, splits, every shard with its
sample count and sha256, every rejected input), the shard URLs it lists, and checksum verification.

Read side only: importing this pulls in neither the annotation parsers nor PyAV.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Any

from sfa_vivit.core.storage import join, open_url

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "sfa-vivit-shards/1"


class ShardChecksumError(IOError):
    """A shard's bytes do not match the sha256 recorded in the manifest."""


class ManifestError(ValueError):
    """No usable manifest at the given URL."""


class ShardReadError(ValueError):
    """A listed shard (or a sample in it) cannot be read: damaged after prep, or truncated."""


@dataclasses.dataclass
class Manifest:
    root: str
    data: dict[str, Any]

    @property
    def dataset(self) -> str:
        return self.data["dataset"]

    @property
    def num_classes(self) -> int | dict[str, int]:
        """What `vivit(num_classes=...)` takes: an int, or head → count for several heads."""
        if "heads" in self.data:
            return {head: len(names) for head, names in self.data["heads"].items()}
        return len(self.data["classes"])

    @property
    def horizontal_flip(self) -> bool:
        return bool(self.data.get("horizontal_flip", True))

    def split(self, name: str) -> dict[str, Any]:
        if name not in self.data["splits"]:
            raise ManifestError(f"{self.root}: no split {name!r}; it has {sorted(self.data['splits'])}")
        return self.data["splits"][name]

    def shard_url(self, path: str) -> str:
        """A shard path of the manifest: relative to its folder, or an absolute URL / path."""
        return path if "://" in path or path.startswith("/") else join(self.root, path)

    def shard_urls(self, split: str) -> list[str]:
        return [self.shard_url(s["path"]) for s in self.split(split)["shards"]]

    def checksums(self, split: str) -> dict[str, str]:
        return {self.shard_url(s["path"]): s["sha256"] for s in self.split(split)["shards"]}

    def sample_counts(self, split: str) -> dict[str, int]:
        return {self.shard_url(s["path"]): s["num_samples"] for s in self.split(split)["shards"]}


def load_manifest(url: str) -> Manifest:
    """Read manifest.json at `url` (the prep output folder, or the file itself)."""
    root = url[: -len(MANIFEST_FILE)].rstrip("/") if url.endswith(MANIFEST_FILE) else url.rstrip("/")
    try:
        with open_url(join(root, MANIFEST_FILE), "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ManifestError(f"no {MANIFEST_FILE} at {root}: prep has not finished there, or it was refused "
                            "(too many rejected videos); shards without a manifest are never read") from None
    except (IsADirectoryError, NotADirectoryError):
        raise ManifestError(f"{url} is not a prep output folder or its {MANIFEST_FILE}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"{root}/{MANIFEST_FILE} is not readable JSON ({e}); it was damaged: run prep "
                            "again to write it") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{root}/{MANIFEST_FILE} is not an sfa-vivit manifest")
    if data.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{root}/{MANIFEST_FILE}: format {data.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    return Manifest(root, data)


def verify_shards(manifest: Manifest, splits: list[str] | None = None, *, rank: int = 0, world: int = 1) -> list[str]:
    """Check every shard's sha256 (with rank/world: this rank's share of them); returns the URLs that do
    not match or cannot be read."""
    bad = []
    urls = [(url, sha) for split in splits or list(manifest.data["splits"])
            for url, sha in manifest.checksums(split).items()]
    for url, sha in urls[rank::world]:
        try:
            read_verified(url, sha)
        except (ShardChecksumError, OSError) as e:
            log.error("%s", e)
            bad.append(url)
    return bad


def data_digest(manifest: Manifest, splits: list[str]) -> str:
    """What a run trained on, as one sha256: the class names and the sha256 of every shard of `splits`
    (independent of where the shards live or what they are called)."""
    payload = {"classes": manifest.data.get("classes"), "heads": manifest.data.get("heads"),
               "splits": {s: sorted(sh["sha256"] for sh in manifest.split(s)["shards"])
                          for s in splits if s in manifest.data["splits"]}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def read_verified(url: str, sha256: str) -> bytes:
    """The bytes at `url`, or ShardChecksumError when their sha256 is not `sha256`."""
    try:
        with open_url(url, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise ShardChecksumError(f"shard {url} is a directory, not a shard file") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ShardChecksumError(f"shard {url} is corrupt: sha256 {digest[:12]}... does not match the "
                                 f"manifest's {sha256[:12]}...")
    return data
