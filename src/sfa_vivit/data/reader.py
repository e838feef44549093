"""Stream prepared shards (local or gs://, through fsspec) and turn samples into clips.

`ClipDataset` is a torch IterableDataset: it works in a DataLoader with workers and under DDP
(each rank, then each worker, reads its own shards). Training clips: random temporal start,
`stride` between frames, `num_frames` frames, then the recipe's augmentations. Evaluation views:
`num_clips` clips evenly spaced over the video × `num_crops` spatial crops. Only the sampled
frames' JPEGs are decoded.
"""

from __future__ import annotations

import collections
import io
import itertools
import json
import logging
import random
import tarfile
from typing import Any, Iterable, Iterator

import numpy as np
import simplejpeg
import torch
import webdataset
from webdataset.tariterators import group_by_keys, tar_file_expander

from sfa_vivit.core.storage import open_url
from sfa_vivit.data.augment import AugmentConfig, crop_window, eval_views, finish_train
from sfa_vivit.data.manifest import Manifest, ShardReadError, load_manifest, read_verified

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Shard streaming through WebDataset, with fsspec for every non-local URL
# ---------------------------------------------------------------------------------------------

def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any):
    return open_url(url, mode)


def register_fsspec_opener(schemes=("gs", "gcs", "s3", "memory", "az", "abfs", "file")) -> None:
    """Make WebDataset open these URL schemes through fsspec (it would shell out to gsutil for gs://)."""
    gopen_module = __import__("webdataset.gopen", fromlist=["gopen_schemes"])
    for scheme in schemes:
        gopen_module.gopen_schemes[scheme] = _fsspec_gopen


register_fsspec_opener()


def iter_samples(urls: list[str], checksums: dict[str, str] | None = None,
                 counts: dict[str, int] | None = None) -> Iterator[dict[str, Any]]:
    """Samples {key, meta, jpgs} of the shards at `urls`, in order. With `checksums`, each shard is
    read whole and checked before any of its samples is used. With `counts` (the manifest's samples per
    shard), a shard that ends early (a damaged tar header ends a tar stream silently) raises ShardReadError.
    Any shard that cannot be read raises ShardReadError naming it."""
    for url in urls:
        if checksums is not None:
            stream = io.BytesIO(read_verified(url, checksums[url]))
        else:
            try:
                stream = webdataset.gopen(url, "rb")
            except FileNotFoundError:
                raise ShardReadError(f"shard {url} is listed in the manifest but missing") from None
        with stream:
            samples = group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
            seen = 0
            while True:
                try:
                    sample = next(samples)
                    item = {"key": sample["__key__"], "meta": json.loads(sample["json"]), "jpgs": sample["jpgs"],
                            "url": url}
                except StopIteration:
                    break
                except (tarfile.TarError, ValueError, KeyError, EOFError, OSError) as e:
                    raise ShardReadError(f"shard {url} cannot be read ({type(e).__name__}: {_first_line(e)}): "
                                         "it was damaged after prep; `sfa data verify` lists the damaged shards "
                                         "and running prep again rewrites them") from None
                seen += 1
                yield item
            if counts is not None and url in counts and seen != counts[url]:
                raise ShardReadError(f"shard {url} holds {seen} readable samples, the manifest lists {counts[url]}: "
                                     "it was damaged after prep; `sfa data verify` lists the damaged shards and "
                                     "running prep again rewrites them")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no detail"


def decode_frames(jpgs: bytes, offsets: list[int], indices: list[int],
                  window: tuple[int, int, int] | None = None,
                  decoded: dict[int, np.ndarray] | None = None) -> torch.Tensor:
    """Decode only the frames at `indices` (repeats decoded once), optionally keeping only the square
    `window` (top, left, side) of each: → uint8 (T, H, W, C). `decoded` (frame index → whole decoded
    frame) carries decoded frames across calls on the same video: pass one dict to every call that
    crops views of it, and each frame is decoded once.

    libjpeg-turbo through simplejpeg: the same decoder as Pillow's (the pixels are identical) at a
    fraction of the per-frame Python overhead, which dominates for small frames (6x faster at 64 px).
    A frame that does not decode raises ValueError naming its index."""
    data = memoryview(jpgs)
    whole: dict[int, np.ndarray] = {} if decoded is None else decoded
    out: np.ndarray | None = None
    for n, i in enumerate(indices):
        frame = whole.get(i)
        if frame is None:
            try:
                frame = simplejpeg.decode_jpeg(data[offsets[i]:offsets[i + 1]], colorspace="RGB")
            except ValueError as e:
                raise ValueError(f"frame {i} (bytes {offsets[i]}-{offsets[i + 1]}) "
                                 f"is not a decodable JPEG: {e}") from None
            whole[i] = frame
        if window is not None:
            top, left, side = window
            frame = frame[top:top + side, left:left + side]
        if out is None:
            out = np.empty((len(indices),) + frame.shape, np.uint8)
        out[n] = frame
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------
# Temporal sampling
# ---------------------------------------------------------------------------------------------

def train_indices(n: int, num_frames: int, stride: int, rng: random.Random) -> list[int]:
    """Random start, `num_frames` frames `stride` apart; a video too short loops (as DMVR)."""
    span = (num_frames - 1) * stride + 1
    start = rng.randint(0, n - span) if n >= span else rng.randint(0, n - 1)
    return [(start + stride * i) % n for i in range(num_frames)]


def eval_indices(n: int, num_frames: int, stride: int, num_clips: int) -> list[list[int]]:
    """`num_clips` clips with starts evenly spaced from the first to the last possible start."""
    span = (num_frames - 1) * stride + 1
    last = max(0, n - span)
    starts = [round(last * j / (num_clips - 1)) if num_clips > 1 else last // 2 for j in range(num_clips)]
    return [[(s + stride * i) % n for i in range(num_frames)] for s in starts]


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------

def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ClipDataset(torch.utils.data.IterableDataset):
    """Clips from a prepared split.

    sampling 'train': yields {'video': (T, C, S, S) float, 'label', 'key'} with random sampling and
    augmentation. sampling 'eval': yields {'video': (num_clips*num_crops, T, C, S, S), 'label', 'key'},
    in shard order, each rank (then each DataLoader worker) reading its own shards. Labels are an int
    (-1 when unlabelled) or a dict head → int.

    Training in global batches (give `batch_size`, the GLOBAL batch B, and `num_batches` per epoch):
    position p of every global batch is served by stream p, one of B streams whose content depends on
    the seed, the epoch and p only, never on how many ranks or workers read them. Stream p reads the
    epoch's shuffled shards p, p + B, ... (or, with fewer shards than B, every B-th sample of all of
    them) through its own shuffle buffer, cycling to fill `num_batches`. Rank r of `world` serves
    positions r*B/world ... (r+1)*B/world - 1, split evenly over its DataLoader workers (each yields its
    positions of batch 0, then of batch 1, ...; `merge_worker_batches` puts a rank's batch back
    together). So a run on 1, 2 or 16 ranks (with any number of workers) trains on the same global
    batches, and a run resumed on another number of ranks continues the same sequence.
    `skip_batches` skips the first batches of an epoch (exact resume). Augmentation randomness is drawn
    per sample from (seed, epoch, pass, key).
    Without `num_batches`, training sampling reads each sample once, in an order of (seed, epoch, reader).
    """

    def __init__(self, manifest: Manifest | str, split: str, *, sampling: str = "train", num_frames: int = 8,
                 stride: int = 1, image_size: int = 224, augment: AugmentConfig = AugmentConfig(),
                 num_clips: int = 4, num_crops: int = 3, seed: int = 0, verify_checksums: bool = False,
                 shuffle_buffer: int = 8, batch_size: int = 1, num_batches: int | None = None,
                 skip_batches: int = 0, rank: int | None = None, world_size: int | None = None):
        super().__init__()
        if sampling not in ("train", "eval"):
            raise ValueError(f"sampling={sampling!r} must be 'train' or 'eval'")
        for name, value in (("num_frames", num_frames), ("stride", stride), ("image_size", image_size),
                            ("num_clips", num_clips), ("num_crops", num_crops), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        augment.validate()
        self.manifest = load_manifest(manifest) if isinstance(manifest, str) else manifest
        self.split_name = split
        self.shards = self.manifest.shard_urls(split)
        self.num_samples = self.manifest.split(split)["num_samples"]
        self.checksums = self.manifest.checksums(split) if verify_checksums else None
        self.counts = self.manifest.sample_counts(split)
        self.sampling, self.num_frames, self.stride, self.image_size = sampling, num_frames, stride, image_size
        self.augment, self.num_clips, self.num_crops = augment, num_clips, num_crops
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.batch_size, self.num_batches, self.skip_batches = batch_size, num_batches, skip_batches
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Reshuffle for `epoch` and skip its first `skip_batches` batches (call before iterating)."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def _readers(self) -> tuple[int, int, int, int]:
        rank, world = (self.rank, self.world_size) if self.rank is not None else _distributed()
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return rank, world, worker, workers

    def worker_batch_size(self, world: int, workers: int) -> int:
        """How many clips each of a rank's `workers` DataLoader workers (0: in-process) puts in one batch."""
        local, workers = self.batch_size // world, max(1, workers)
        if self.batch_size % world or local % workers:
            raise ValueError(f"a global batch of {self.batch_size} does not split evenly over {world} ranks x "
                             f"{workers} DataLoader workers")
        return local // workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.sampling == "train" and self.num_batches is not None:
            yield from self._global_batches()
            return
        rank, world, worker, workers = self._readers()
        reader, readers = rank * workers + worker, world * workers
        shards = list(self.shards)
        if self.sampling == "train":
            random.Random(f"{self.seed}/{self.epoch}").shuffle(shards)
        # Enough shards: each reader streams its own. Too few: all stream all, each keeps its slice.
        share_samples = len(shards) < readers
        mine = shards if share_samples else shards[rank::world][worker::workers]
        stream: Iterator[dict[str, Any]] = (s for i, s in enumerate(iter_samples(mine, self.checksums, self.counts))
                                            if not share_samples or i % readers == reader)
        if self.sampling == "train":
            stream = _shuffled(stream, self.shuffle_buffer, random.Random(f"{self.seed}/{self.epoch}/{reader}"))
        for sample in stream:
            yield self.clip(sample)

    def _global_batches(self) -> Iterator[dict[str, Any]]:
        """This worker's positions of each global batch of the epoch (see the class docstring)."""
        rank, world, worker, workers = self._readers()
        per = self.worker_batch_size(world, workers)
        first = rank * (self.batch_size // world) + worker * per
        positions = range(first, first + per)
        streams = self.batch_size
        shards = list(self.shards)
        random.Random(f"{self.seed}/{self.epoch}").shuffle(shards)
        if len(shards) >= streams:
            raw = {p: self._cycle(shards[p::streams]) for p in positions}
        else:
            router = _Router(self._cycle(shards), streams, positions)
            raw = {p: router.stream(p) for p in positions}
        mixed = {p: itertools.islice(_shuffled(raw[p], self.shuffle_buffer,
                                               random.Random(f"{self.seed}/{self.epoch}/stream{p}")),
                                     self.skip_batches, None) for p in positions}
        for _ in range(self.skip_batches, self.num_batches):
            for p in positions:
                yield self.clip(next(mixed[p]))

    def _cycle(self, shards: list[str]) -> Iterator[dict[str, Any]]:
        """The samples of `shards` in order, again and again; each tagged with its pass."""
        if not shards:
            raise ValueError(f"{self.manifest.root} split {self.split_name!r} has no shards to train on")
        passes = 0
        while True:
            for sample in iter_samples(shards, self.checksums, self.counts):
                yield {**sample, "pass": passes}
            passes += 1

    def clip(self, sample: dict[str, Any], epoch: int | None = None,
             decoded: dict[int, np.ndarray] | None = None) -> dict[str, Any]:
        """One sample of `iter_samples` → the clip (train) or views (eval) this dataset yields for it,
        at `epoch` (default: the current one). Training view k of a clip is `clip(sample, epoch=k)`;
        calls that share a `decoded` dict (see `decode_frames`) decode each frame of the sample once."""
        epoch = self.epoch if epoch is None else epoch
        meta = sample["meta"]
        n = meta["num_frames"]
        label = meta["label"]
        label = (-1 if label is None else label) if not isinstance(label, dict) else dict(label)
        if self.sampling == "train":
            rng = random.Random(f"{self.seed}/{epoch}/{sample.get('pass', 0)}/{sample['key']}")
            gen = torch.Generator().manual_seed(rng.getrandbits(62))
            idx = train_indices(n, self.num_frames, self.stride, rng)
            window = crop_window(meta["height"], meta["width"], self.image_size, self.augment, gen)
            crops = self._decode(sample, idx, window, decoded)
            video = finish_train(crops, self.image_size, self.augment, gen, allow_flip=self.manifest.horizontal_flip)
        else:
            clips = eval_indices(n, self.num_frames, self.stride, self.num_clips)
            flat = self._decode(sample, [i for clip in clips for i in clip], None, decoded)
            views = [eval_views(flat[c * self.num_frames:(c + 1) * self.num_frames], self.image_size,
                                self.num_crops, self.augment) for c in range(self.num_clips)]
            video = torch.cat(views)                     # (clips*crops, T, C, S, S)
        return {"video": video, "label": label, "key": sample["key"]}


    @staticmethod
    def _decode(sample: dict[str, Any], indices: list[int], window: tuple[int, int, int] | None,
                decoded: dict[int, np.ndarray] | None) -> torch.Tensor:
        try:
            return decode_frames(sample["jpgs"], sample["meta"]["offsets"], indices, window, decoded)
        except (ValueError, IndexError) as e:
            raise ShardReadError(f"sample {sample['key']!r} of shard {sample.get('url', '?')} is damaged: {e}; "
                                 "`sfa data verify` checks every shard against its sha256") from None


class _Router:
    """Sample i of one shared sequence goes to stream i % streams; only the `owned` streams are kept."""

    def __init__(self, source: Iterator[dict[str, Any]], streams: int, owned: Iterable[int]):
        self.source, self.streams, self.next_index = source, streams, 0
        self.queues = {p: collections.deque() for p in owned}

    def stream(self, p: int) -> Iterator[dict[str, Any]]:
        queue = self.queues[p]
        while True:
            while not queue:
                sample = next(self.source)
                target = self.next_index % self.streams
                self.next_index += 1
                if target in self.queues:
                    self.queues[target].append(sample)
            yield queue.popleft()


# How long a DataLoader worker lives on after SIGTERM: long enough that the main process, signalled at the
# same time (the whole process group is), is not interrupted mid-step by a dying worker.
WORKER_GRACE_S = 2.0


def quiet_worker(_: int = 0) -> None:
    """DataLoader `worker_init_fn`. Ctrl-C reaches the whole process group: a worker ignores it, so the
    main process alone decides to stop (after its step, with a checkpoint). SIGTERM (`timeout`, batch
    schedulers, Kubernetes, also the whole group) makes a worker exit quietly, with status 0, after
    WORKER_GRACE_S: the main process finishes its step and commits its checkpoint undisturbed (torch
    stops a run at once when a worker dies with a non-zero status), and an exiting interpreter, which
    terminates its workers with SIGTERM, is not kept waiting."""
    import os
    import signal
    import threading

    def leave(signum, frame) -> None:
        timer = threading.Timer(WORKER_GRACE_S, os._exit, (0,))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, leave)


def merge_worker_batches(batches: Iterable[dict[str, Any]], workers: int) -> Iterator[dict[str, Any]]:
    """A DataLoader over training `ClipDataset` gives each rank batch as `workers` consecutive pieces
    (one per worker, in worker order): join them back into the rank's batch."""
    group: list[dict[str, Any]] = []
    for batch in batches:
        group.append(batch)
        if len(group) == max(1, workers):
            yield _join(group)
            group = []


def _join(parts: list[Any]) -> Any:
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {k: _join([p[k] for p in parts]) for k in first}
    if isinstance(first, list):
        return [x for p in parts for x in p]
    raise TypeError(f"cannot join batch values of type {type(first).__name__}")


def _shuffled(stream: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    buffer: list[Any] = []
    for item in stream:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer
