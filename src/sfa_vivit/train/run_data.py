"""The data one training run reads: this rank's training stream, the evaluation views, and, when the
spatial encoder is frozen, the feature cache that stands in for both."""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch

from sfa_vivit.core.runtime import Runtime
from sfa_vivit.core.storage import url_to_fs
from sfa_vivit.data.manifest import Manifest, verify_shards
from sfa_vivit.data.reader import ClipDataset, merge_worker_batches, quiet_worker
from sfa_vivit.models.vivit import ViViT
from sfa_vivit.train import cache
from sfa_vivit.train.config import TrainConfig, augment_config, parse_views
from sfa_vivit.train.start import TrainError

log = logging.getLogger(__name__)


class RunData:
    def __init__(self, config: TrainConfig, manifest: Manifest, runtime: Runtime):
        c = self.config = config
        self.manifest, self.runtime = manifest, runtime
        self.local_batch = c.batch_size // runtime.world
        self.augment = augment_config(c)
        n_train = manifest.split(c.train_split)["num_samples"]
        self.steps_per_epoch = c.steps_per_epoch or max(1, n_train // c.batch_size)
        self.train_data = ClipDataset(manifest, c.train_split, sampling="train", num_frames=c.num_frames,
                                      stride=c.stride, image_size=c.image_size, augment=self.augment, seed=c.seed,
                                      batch_size=c.batch_size, num_batches=self.steps_per_epoch)
        self.workers = _workers_dividing(c.workers, self.local_batch)
        self.has_eval = c.eval_split in manifest.data["splits"]
        if not self.has_eval:
            log.warning("%s has no %r split: no validation metrics", manifest.root, c.eval_split)
        elif runtime.spmd_hosts:
            # Each host reads its own shards, a different number of batches: one SPMD program over every host
            # cannot run them. The pipeline evaluates the final model on one host (its evaluate step).
            self.has_eval = False
            log.warning("a multi-host TPU slice: no validation during training; evaluate the final model on one "
                        "host (`sfa evaluate`, the pipeline's evaluate step)")
        self.cache_report: cache.CacheReport | None = None
        self.cached_train: cache.CachedSplit | None = None
        self.cached_eval: dict[str, cache.CachedSplit] = {}

    def eval_dataset(self, views: str) -> ClipDataset:
        """The evaluation split as `views` ('clips x crops') views of every video."""
        c = self.config
        clips, crops = parse_views(views)
        return ClipDataset(self.manifest, c.eval_split, sampling="eval", num_frames=c.num_frames, stride=c.stride,
                           image_size=c.image_size, augment=self.augment, num_clips=clips, num_crops=crops)

    def build_cache(self, model: ViViT, url: str, should_stop=lambda: False) -> cache.CacheReport:
        """Build (or reuse, or finish building) the frozen-feature cache at `url` and hold this rank's part;
        from then on the batches come from it."""
        c, rt = self.config, self.runtime
        views = list(dict.fromkeys([c.eval_views, c.final_eval_views])) if self.has_eval else []
        eval_sets = {v: self.eval_dataset(v) for v in views}
        report = cache.build(model, url, rt, train=self.train_data, views=c.cache_views, eval_sets=eval_sets,
                             dtype=c.cache_dtype, batch_size=self.local_batch, should_stop=should_stop)
        self.cache_report = report
        self.cached_train, self.cached_eval = cache.open_splits(report, self.train_data, eval_sets, rt.rank, rt.world,
                                                                batch_size=c.batch_size)
        if rt.is_main:
            r = report
            log.info("feature cache %s: %d clips x %d views, %.1f MB (%.1f KB per clip), built in %.1f s "
                     "(%d files now)", url, r.clips, r.train_views, r.size_bytes / 1e6, r.bytes_per_clip / 1e3,
                     r.train_build_time_s + r.eval_build_time_s, r.built_now)
        return report

    def epoch_batches(self, epoch: int, skip: int) -> Iterable[dict[str, Any]]:
        """This rank's batches of `epoch`, after the first `skip` (a resumed epoch)."""
        c = self.config
        if self.cached_train is not None:
            return self.cached_train.train_batches(epoch=epoch, seed=c.seed, batch_size=c.batch_size,
                                                   num_batches=self.steps_per_epoch, skip_batches=skip)
        self.train_data.set_epoch(epoch, skip_batches=skip)
        rt = self.runtime
        loader = torch.utils.data.DataLoader(self.train_data, num_workers=self.workers,
                                             batch_size=self.train_data.worker_batch_size(rt.world, self.workers),
                                             pin_memory=rt.device.type == "cuda", persistent_workers=False,
                                             worker_init_fn=quiet_worker)
        return merge_worker_batches(loader, self.workers)

    def eval_batch_size(self, views: str) -> int:
        """Clips per evaluation batch: about a training batch's views, a multiple of this process's devices."""
        clips, crops = parse_views(views)
        return self.runtime.per_device_multiple(max(1, self.local_batch // (clips * crops)))

    def eval_batches(self, views: str) -> Iterable[dict[str, Any]]:
        """This rank's batches of the evaluation split as `views` views (from the cache when it holds them)."""
        batch = self.eval_batch_size(views)
        if views in self.cached_eval:
            return self.cached_eval[views].eval_batches(batch)
        return torch.utils.data.DataLoader(self.eval_dataset(views), batch_size=batch, num_workers=self.config.workers,
                                           worker_init_fn=quiet_worker)


def _workers_dividing(workers: int, local_batch: int) -> int:
    """The most DataLoader workers, up to `workers`, that split a rank's batch evenly (each worker serves
    a fixed part of every batch)."""
    fitting = max([w for w in range(1, workers + 1) if local_batch % w == 0], default=0)
    if fitting != workers:
        log.warning("workers=%d does not divide this rank's batch of %d clips: using %d DataLoader workers",
                    workers, local_batch, fitting)
    return fitting


# Data checks before the first step -------------------------------------------------------------------

def check_shards_exist(c: TrainConfig, manifest: Manifest, data_url: str) -> None:
    """Every shard the manifest lists for the splits this run reads is there, before the first step
    (a missing one would otherwise surface at the end of an epoch). One listing per folder."""
    splits = [s for s in dict.fromkeys([c.train_split, c.eval_split]) if s in manifest.data["splits"]]
    urls = [u for s in splits for u in manifest.shard_urls(s)]
    listed: dict[str, set[str]] = {}
    missing = []
    for u in urls:
        folder, name = u.rsplit("/", 1) if "/" in u else (".", u)
        if folder not in listed:
            fs, path = url_to_fs(folder)
            try:
                listed[folder] = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
            except FileNotFoundError:
                listed[folder] = set()
        if name not in listed[folder]:
            missing.append(u)
    rates = {s: (manifest.split(s).get("options") or manifest.data.get("options", {})).get("fps")
             for s in splits}
    if len(set(rates.values())) > 1 and not c.mixed_prep:
        raise TrainError(f"{data_url}: the splits this run reads were prepared at other frame rates "
                         f"({', '.join(f'{s} {fps} fps' for s, fps in rates.items())}): training and validation "
                         "would span other lengths of time. Prepare them with the same --fps, or set "
                         "mixed_prep=true to accept it")
    if missing:
        raise TrainError(f"{len(missing)} of the {len(urls)} shards {data_url}/manifest.json lists for "
                         f"{'/'.join(splits)} are missing (first: {missing[0]}); run `sfa data prep` again to "
                         "write them, or `sfa data verify` to list every damaged or missing shard")


def verify_data(c: TrainConfig, manifest: Manifest, runtime: Runtime, data_url: str) -> None:
    """verify_data: every shard of the splits this run reads matches its sha256 (ranks share the work)."""
    splits = [s for s in (c.train_split, c.eval_split) if s in manifest.data["splits"]]
    if runtime.is_main:
        log.info("verify_data: checking the sha256 of every shard of %s in %s", splits, data_url)
    bad = verify_shards(manifest, splits, rank=runtime.rank, world=runtime.world)
    total = runtime.all_reduce(torch.tensor([float(len(bad))]), "sum")
    if total.item() > 0:
        named = f": {', '.join(bad[:5])}" if bad else ""
        raise TrainError(f"verify_data: {int(total.item())} shard(s) of {data_url} do not match their "
                         f"sha256{named}; run prep again to rewrite them")
