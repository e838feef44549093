"""Frozen-feature cache for stage 2: compute the frozen spatial encoder once, train from its outputs.

In stage 2 the tubelet embedding and spatial encoder are frozen, so a clip's spatial features
depend only on the clip's view (frames, crop, flip, colour) and on the frozen weights. The cache
computes them for K augmented views of every training clip (view k is the clip the reader would
give at epoch k) and for every evaluation view, once, and stage 2 then trains adapter + temporal
encoder + head from them, drawing one of the K views per clip per epoch.

Layout at the cache URL (default `<run>/feature_cache`, any fsspec URL):

    cache.json                         format, identity (below) and its sha256 key
    train-00003.safetensors            one file per data shard: features (N, K, T', D), labels, keys
    validation-2x1-00000.safetensors   evaluation views of one data shard: features (N, V, T', D)

Identity: the sha256 of the frozen weights (tubelet embedding + spatial encoder), the model sizes
that shape the features, the data (dataset and each shard's sha256), and every view parameter
(frames, stride, image size, augmentation, seed, K, eval views, dtype). A cache whose identity is
not the run's is refused with the fields that differ; it is never silently used or overwritten.
Every file carries the key too, and is written atomically, so building is resumable: a restarted
build keeps the files already written and computes the rest. Under DDP rank r builds files
r, r + world, ...

Memory: training holds the training cache in host memory (see `size_bytes`), each DDP rank its
1/world of the clips (the ranks of a node hold one copy between them); at fp32 a clip costs
K * T' * D * 4 bytes (ViViT-B, 32 frames, K=4: 786 KB; bf16 halves it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from sfa_vivit.core.progress import bar as progress_bar
from sfa_vivit.core.runtime import Runtime, pad_rows
from sfa_vivit.core.storage import join, open_url, url_to_fs, write_bytes_atomic
from sfa_vivit.data.manifest import Manifest
from sfa_vivit.data.reader import ClipDataset, iter_samples
from sfa_vivit.models.vivit import ViViT

log = logging.getLogger(__name__)

CACHE_FORMAT = "sfa-feature-cache/1"
INDEX_FILE = "cache.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StaleCacheError(ValueError):
    """The cache at a URL was built for other weights, data or views than this run's."""


class CorruptCacheError(ValueError):
    """A cache file cannot be read (truncated or damaged after it was written)."""


def state_digest(modules: list[torch.nn.Module]) -> str:
    """sha256 over the named tensors of `modules` (names and bytes, in a fixed order)."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, tensor in sorted(module.state_dict().items()):
            h.update(f"{i}.{name}".encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_identity(model: ViViT, manifest: Manifest, *, train: ClipDataset, views: int,
                   eval_sets: dict[str, ClipDataset], dtype: str) -> dict[str, Any]:
    """Everything the cached features depend on, as JSON."""
    c = model.config
    return {
        "frozen_sha256": state_digest([model.embedding, model.spatial]),
        "model": {k: getattr(c, k) for k in ("width", "patch", "tubelet", "image_size", "num_frames", "in_channels")},
        "data": {"dataset": manifest.dataset,
                 "shards": {split: [s["sha256"] for s in manifest.split(split)["shards"]]
                            for split in [train.split_name] + [d.split_name for d in eval_sets.values()]}},
        "train": {"split": train.split_name, "views": views, "seed": train.seed, "stride": train.stride,
                  "augment": dataclasses.asdict(train.augment)},
        "eval": {name: {"split": d.split_name, "clips": d.num_clips, "crops": d.num_crops, "stride": d.stride}
                 for name, d in eval_sets.items()},
        "dtype": dtype,
    }


def _key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _open_index(url: str, identity: dict[str, Any], write: bool) -> None:
    fs, path = url_to_fs(join(url, INDEX_FILE))
    key = _key(identity)
    if fs.exists(path):
        with open_url(join(url, INDEX_FILE), "rb") as f:
            stored = json.load(f)
        if stored.get("format") != CACHE_FORMAT or stored.get("key") != key:
            fields = _differences(stored.get("identity", {}), identity) or ["format"]
            raise StaleCacheError(
                f"the feature cache at {url} was built for other inputs than this run's ({', '.join(fields)} "
                f"differ{'s' if len(fields) == 1 else ''}); it is not used. Delete it, or set cache_dir elsewhere")
        return
    if write:
        write_bytes_atomic(join(url, INDEX_FILE), json.dumps(
            {"format": CACHE_FORMAT, "key": key, "identity": identity}, indent=1).encode())


def _file(split: str, views: str | None, index: int) -> str:
    return f"{split}-{views}-{index:05d}.safetensors" if views else f"{split}-{index:05d}.safetensors"


def _exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def _header(url: str, key: str, blob: bytes | None = None) -> dict[str, Any]:
    """A cache file's safetensors header (from `blob`, or read from `url`); raises StaleCacheError
    when the file belongs to another cache."""
    if blob is None:
        with open_url(url, "rb") as f:
            head = f.read(8)
            blob = head + f.read(int.from_bytes(head, "little"))
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
    found = header.get("__metadata__", {}).get("key", "?")
    if found != key:
        raise StaleCacheError(f"{url} belongs to another cache (key {found[:12]}..., expected {key[:12]}...); "
                              "delete the cache folder")
    return header


def _read(url: str, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """A cache file's tensors and metadata, or None when it is missing; StaleCacheError for another key."""
    if not _exists(url):
        return None
    with open_url(url, "rb") as f:
        blob = f.read()
    try:
        header = _header(url, key, blob)
        return load_safetensors(blob), header["__metadata__"]
    except StaleCacheError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise CorruptCacheError(f"feature-cache file {url} is truncated or damaged ({type(e).__name__}: {e}); "
                                "delete it and the next run computes it again") from None


def _labels(labels: list[Any]) -> dict[str, torch.Tensor]:
    if labels and isinstance(labels[0], dict):
        return {f"label.{h}": torch.tensor([lb[h] for lb in labels], dtype=torch.long) for h in labels[0]}
    return {"label": torch.tensor(labels, dtype=torch.long)}


@dataclasses.dataclass
class CacheReport:
    url: str
    key: str
    train_views: int
    clips: int
    size_bytes: int
    bytes_per_clip: float
    train_build_time_s: float      # summed over the files, whichever session or rank built them
    eval_build_time_s: float
    built_now: int                 # files computed by this call (0: the cache was complete)


class BuildStopped(RuntimeError):
    """The cache build stopped on request (a signal) between two batches; the files written are kept."""

    def __init__(self, built: int, remaining: int):
        super().__init__(f"{built} cache file(s) written and kept, {remaining} left to build")
        self.built, self.remaining = built, remaining


def build(model: ViViT, url: str, rt: Runtime, *, train: ClipDataset, views: int, eval_sets: dict[str, ClipDataset],
          dtype: str = "float32", batch_size: int = 8,
          should_stop: Callable[[], bool] = lambda: False) -> CacheReport:
    """Compute the features of `views` training views of every clip of `train` and of every view of
    each `eval_sets` dataset (name: views text such as '2x1'), with `model`'s frozen spatial encoder,
    at `url`, on `rt`'s devices (its ranks share the files; batches of `batch_size` videos, a fixed shape).
    Files already there are kept (resume); a cache of other inputs raises StaleCacheError. `should_stop` is
    asked between batches (a signal arrived): the shard being computed is dropped and BuildStopped raised,
    every file already written stays (each is written whole), so a stop takes one batch, not one build."""
    rank, world = rt.rank, rt.world
    if not model.spatial_frozen:
        raise ValueError("the feature cache needs a frozen spatial encoder (freeze_spatial=true)")
    if views < 1:
        raise ValueError(f"cache_views={views} must be >= 1")
    if dtype not in DTYPES:
        raise ValueError(f"cache_dtype={dtype!r} is not one of {list(DTYPES)}")
    identity = cache_identity(model, train.manifest, train=train, views=views, eval_sets=eval_sets, dtype=dtype)
    key = _key(identity)
    if rank == 0:
        _open_index(url, identity, write=True)
    rt.barrier()
    _open_index(url, identity, write=False)
    jobs = [(train.split_name, None, train, i) for i in range(len(train.shards))]
    jobs += [(d.split_name, name, d, i) for name, d in eval_sets.items() for i in range(len(d.shards))]
    built = 0
    todo = [job for j, job in enumerate(jobs) if j % world == rank and not _exists(join(url, _file(*job[:2], job[3])))]
    bar = progress_bar(todo, desc="feature cache", unit="shard", disable=rank != 0)
    for split, name, dataset, index in bar:
        start = time.perf_counter()
        tensors = _compute(model, dataset, index, views if name is None else None, DTYPES[dtype], rt,
                           rt.per_device_multiple(batch_size), should_stop)
        if tensors is None:
            raise BuildStopped(built, len(todo) - built)
        meta = {"key": key, "build_time_s": f"{time.perf_counter() - start:.4f}", "source": dataset.shards[index]}
        write_bytes_atomic(join(url, _file(split, name, index)), save_safetensors(tensors, metadata=meta))
        built += 1
    rt.barrier()
    report = describe(url, key, jobs)
    report.built_now = built
    return report


@torch.no_grad()
def _compute(model: ViViT, dataset: ClipDataset, index: int, views: int | None, dtype: torch.dtype, rt: Runtime,
             batch_size: int, should_stop: Callable[[], bool] = lambda: False) -> dict[str, torch.Tensor] | None:
    """Features of one data shard: train (views given) → (N, views, T', D); eval → (N, V, T', D).
    Every batch has `batch_size` videos on a lazy device (the last one padded), so that one graph serves.
    None when `should_stop()` said so between two clips."""
    features, labels, keys = [], [], []
    pending: list[torch.Tensor] = []

    def flush(last: bool = False) -> None:
        """Compute `batch_size` videos at a time (a clip's views arrive together), the rest when `last`."""
        while len(pending) >= batch_size or (last and pending):
            video = torch.stack(pending[:batch_size])
            n = video.shape[0]
            if rt.static_shapes:
                video = pad_rows(video, batch_size)
            with rt.autocast:
                out = model.spatial_features(rt.put(video))
            features.extend(out.to("cpu", dtype)[:n])
            del pending[:n]

    for sample in iter_samples([dataset.shards[index]], dataset.checksums, dataset.counts):
        if should_stop():
            return None
        if views is None:
            clip = dataset.clip(sample)
            pending.extend(clip["video"])
        else:
            decoded: dict[int, Any] = {}     # the views share the sample's decoded frames
            clips = [dataset.clip(sample, epoch=k, decoded=decoded) for k in range(views)]
            pending.extend(c["video"] for c in clips)
            clip = clips[0]
        labels.append(clip["label"])
        keys.append(clip["key"])
        flush()
    flush(last=True)
    per_clip = views or dataset.num_clips * dataset.num_crops
    stacked = torch.stack(features).view(len(keys), per_clip, *features[0].shape) if keys else torch.empty(0)
    key_bytes = torch.tensor(list("\n".join(keys).encode()), dtype=torch.uint8)
    return {"features": stacked.contiguous(), "keys": key_bytes, **_labels(labels)}


def describe(url: str, key: str, jobs: list[tuple[str, str | None, ClipDataset, int]]) -> CacheReport:
    """Sizes and build times of a complete cache (reads only the file headers' metadata)."""
    size, clips, train_time, eval_time, views = 0, 0, 0.0, 0.0, 0
    for split, name, _, index in jobs:
        file_url = join(url, _file(split, name, index))
        fs, path = url_to_fs(file_url)
        size += fs.size(path)
        meta = _header(file_url, key)
        seconds = float(meta["__metadata__"]["build_time_s"])
        if name is None:
            shape = meta["features"]["shape"]
            clips += shape[0]
            views = shape[1] if shape[0] else views
            train_time += seconds
        else:
            eval_time += seconds
    return CacheReport(url=url, key=key, train_views=views, clips=clips, size_bytes=size,
                       bytes_per_clip=round(size / clips, 1) if clips else 0.0, train_build_time_s=round(train_time, 3),
                       eval_build_time_s=round(eval_time, 3), built_now=0)


class CachedSplit:
    """One split of a built cache, this rank's part held in host memory: features (N, V, T', D),
    labels, keys. Each file is read and cut in turn, so the ranks hold one copy between them. For
    evaluation (`streams` None) rank r of `world` holds clips r, r + world, ... of the split in file order.
    For training (`streams` = the global batch B) clip g belongs to stream g % B, and rank r holds the
    streams of its positions in the global batch (r*B/world ... (r+1)*B/world - 1), as `ClipDataset` does."""

    def __init__(self, url: str, key: str, split: str, views: str | None, num_shards: int,
                 rank: int = 0, world: int = 1, streams: int | None = None):
        self.rank, self.world, self.streams = rank, world, streams
        local = streams // world if streams else 0
        first = rank * local
        parts, offset, global_index = [], 0, []
        for index in range(num_shards):
            file_url = join(url, _file(split, views, index))
            got = _read(file_url, key)
            if got is None:
                raise FileNotFoundError(f"{file_url} is missing: the cache was not completely built")
            part = got[0]
            n = part["features"].shape[0] if part["features"].numel() else 0
            if n == 0:
                continue
            index = torch.arange(offset, offset + n)
            if streams:
                mine = (index % streams >= first) & (index % streams < first + local)
            else:
                mine = index % world == rank
            rows = torch.arange(n)[mine]   # may be none
            self_index = index[mine]
            global_index.append(self_index)
            offset += n
            keys = bytes(part["keys"].tolist()).decode().split("\n")
            parts.append({**{k: v[rows] for k, v in part.items() if k != "keys"},     # indexing copies
                          "keys": [keys[i] for i in rows.tolist()]})
        if not parts:
            raise ValueError(f"the {split} cache at {url} holds no clips")
        self.features = torch.cat([p["features"] for p in parts])
        label_names = [k for k in parts[0] if k.startswith("label")]
        self.labels = {k: torch.cat([p[k] for p in parts]) for k in label_names}
        self.keys = [k for p in parts for k in p["keys"]]
        self.index = torch.cat(global_index)       # each held clip's position in the split
    def __len__(self) -> int:
        return self.features.shape[0]

    def _label(self, index: torch.Tensor) -> Any:
        if "label" in self.labels:
            return self.labels["label"][index]
        return {k[len("label."):]: v[index] for k, v in self.labels.items()}

    def train_batches(self, *, epoch: int, seed: int, batch_size: int, num_batches: int,
                      skip_batches: int = 0) -> Iterator[dict[str, Any]]:
        """This rank's part (batch_size // world clips) of each global batch of one epoch: position p of
        batch b is clip b (wrapping) of stream p's clips in an order drawn from (seed, epoch, p), in one
        of its V views drawn with it; independent of the number of ranks. Batches before `skip_batches`
        are skipped (exact resume)."""
        if self.streams != batch_size:
            raise ValueError(f"the training cache was opened for batches of {self.streams}, not {batch_size}")
        views = self.features.shape[1]
        local = batch_size // self.world
        rows_of = []
        for p in range(self.rank * local, (self.rank + 1) * local):
            rows = torch.nonzero(self.index % batch_size == p).flatten()
            if rows.numel() == 0:
                raise ValueError(f"stream {p} of the training cache holds no clips: batch_size={batch_size} is "
                                 f"larger than the split")
            gen = torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}/{epoch}/cache/{p}".encode())
                                                    .hexdigest()[:15], 16))
            order = rows[torch.randperm(rows.numel(), generator=gen)]
            rows_of.append((order, torch.randint(views, (rows.numel(),), generator=gen)))
        for b in range(skip_batches, num_batches):
            picks = [(order[b % order.numel()], view[b % order.numel()]) for order, view in rows_of]
            index = torch.stack([i for i, _ in picks])
            chosen = torch.stack([v for _, v in picks])
            yield {"features": self.features[index, chosen].float(), "label": self._label(index)}

    def eval_batches(self, batch_size: int) -> Iterator[dict[str, Any]]:
        """Every clip this rank holds with all its views: {'features': (B, V, T', D), 'label'}."""
        for start in range(0, len(self), batch_size):
            index = torch.arange(start, min(start + batch_size, len(self)))
            yield {"features": self.features[index].float(), "label": self._label(index)}


def open_splits(report: CacheReport, train: ClipDataset, eval_sets: dict[str, ClipDataset], rank: int = 0,
                world: int = 1, *, batch_size: int) -> tuple[CachedSplit, dict[str, CachedSplit]]:
    """The built cache's training split (for global batches of `batch_size`) and each evaluation view
    set, this rank's part of each."""
    train_split = CachedSplit(report.url, report.key, train.split_name, None, len(train.shards), rank, world,
                              streams=batch_size)
    return train_split, {v: CachedSplit(report.url, report.key, d.split_name, v, len(d.shards), rank, world)
                         for v, d in eval_sets.items()}
