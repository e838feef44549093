"""Stream prepared shards (local or gs://, through fsspec) and turn samples into clips.

`ClipDataset` is a torch IterableDataset: it works in a DataLoader with workers and under DDP
(each rank, then each worker, reads its own shards). Training clips: random temporal start,
`stride` between frames, `num_frames` frames, then the recipe's augmentations. Evaluation views:
`num_clips` clips evenly spaced over the video × `num_crops` spatial crops. Only the sampled
frames' JPEGs are decoded.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import random
import tarfile
from typing import Any, Iterator

import numpy as np
import simplejpeg
import torch
import webdataset
from webdataset.tariterators import group_by_keys, tar_file_expander

from sfa_vivit.data.augment import AugmentConfig, crop_window, eval_views, finish_train
from sfa_vivit.data.manifest import Manifest, ShardReadError, load_manifest, read_verified
from sfa_vivit.storage import open_url

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
    augmentation; shards are shuffled per epoch (`set_epoch`) and samples through a buffer.
    sampling 'eval': yields {'video': (num_clips*num_crops, T, C, S, S), 'label', 'key'}, in shard order.
    Labels are an int (-1 when unlabelled) or a dict head → int.

    Exact resume (train sampling): give `batch_size` and `num_batches`, the DataLoader batches this rank
    takes per epoch; each DataLoader worker then yields exactly the samples of its batches (the
    DataLoader takes batches from workers in turn), shards are cycled to fill them, and
    `skip_batches` skips the batches already trained on (resume with the same number of workers).
    Augmentation randomness is drawn per sample
    from (seed, epoch, pass, key), so a skipped prefix leaves what follows unchanged.
    """

    def __init__(self, manifest: Manifest | str, split: str, *, sampling: str = "train", num_frames: int = 8,
                 stride: int = 1, image_size: int = 224, augment: AugmentConfig = AugmentConfig(),
                 num_clips: int = 4, num_crops: int = 3, seed: int = 0, verify_checksums: bool = False,
                 shuffle_buffer: int = 64, batch_size: int = 1, num_batches: int | None = None,
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
        self.counts = {self.manifest.shard_url(s["path"]): s["num_samples"]
                       for s in self.manifest.split(split)["shards"]}
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

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world, real_worker, workers = self._readers()
        # The DataLoader asks workers for batches in turn starting from worker 0. After skipping
        # `skip_batches`, the next batch belongs to stream (skip % workers): rotate so that real worker
        # 0 runs that stream, and every batch keeps its content whatever the skip.
        worker = (real_worker + self.skip_batches) % workers if self.sampling == "train" else real_worker
        reader, readers = rank * workers + worker, world * workers
        shards = list(self.shards)
        if self.sampling == "train":
            random.Random(f"{self.seed}/{self.epoch}").shuffle(shards)
        # Enough shards: each reader streams its own. Too few: all stream all, each keeps its slice.
        share_samples = len(shards) < readers
        mine = shards if share_samples else shards[rank::world][worker::workers]
        cycle_forever = self.sampling == "train" and self.num_batches is not None

        def samples() -> Iterator[dict[str, Any]]:
            passes = 0
            while mine:
                for i, sample in enumerate(iter_samples(mine, self.checksums, self.counts)):
                    if not share_samples or i % readers == reader:
                        yield {**sample, "pass": passes}
                passes += 1
                if not cycle_forever:
                    return

        stream: Iterator[dict[str, Any]] = samples()
        if self.sampling == "train":
            stream = _shuffled(stream, self.shuffle_buffer, random.Random(f"{self.seed}/{self.epoch}/{reader}"))
            if self.num_batches is not None:
                quota = len(range(worker, self.num_batches, workers)) * self.batch_size
                skip = len(range(worker, min(self.skip_batches, self.num_batches), workers)) * self.batch_size
                stream = itertools.islice(stream, skip, quota)
        for sample in stream:
            yield self.clip(sample)

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
