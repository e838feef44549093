"""`sfa evaluate`: multi-view evaluation of a trained checkpoint on a prepared split.

Each clip is seen as CLIPS temporal clips evenly spaced over the video × CROPS spatial crops, and
the logits of all views are averaged (the ViViT protocol, 4 × 3 by default). Reports top-1, top-5
(omitted with five classes or fewer), per-class accuracy and the confusion matrix; for EPIC-KITCHENS
verb, noun and action (both right). Under torchrun each rank evaluates its own shards; on XLA every device
of the host takes a share of each batch (`sfa_vivit.core.runtime`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from sfa_vivit.core import runtime
from sfa_vivit.core.storage import join, json_bytes, write_bytes_atomic
from sfa_vivit.data.augment import AugmentConfig
from sfa_vivit.data.manifest import load_manifest, verify_shards
from sfa_vivit.data.reader import ClipDataset, quiet_worker
from sfa_vivit.models import checkpoints
from sfa_vivit.train.config import parse_views
from sfa_vivit.train.evaluation import evaluate_model

log = logging.getLogger(__name__)


def evaluate(checkpoint: str, data: str, *, views: str = "4x3", out: str | None = None, split: str = "validation",
             batch_size: int = 4, workers: int = 2, device: str = "auto", verify_data: bool = False) -> dict[str, Any]:
    """Evaluate the model at `checkpoint` (a run folder or a checkpoint) on `split` of `data`.

    Returns the metrics and writes them to `out`/metrics.json when `out` is given. Raises ValueError
    when the data's classes are not the model's (their number, or, when the checkpoint records them,
    their names and order), or views do not parse. verify_data: check the split's shards against their
    sha256 first.
    """
    clips, crops = parse_views(views, "views")
    if out and (checkpoints.latest_step(out) is not None or checkpoints.committed_ancestor(out) is not None):
        raise ValueError(f"--out {out} is a training run's folder or a checkpoint: its metrics.json belongs to the "
                         "run; give sfa evaluate a folder of its own")
    url = checkpoints.resolve_model(checkpoint)
    model, extra = checkpoints.load(url)
    manifest = load_manifest(data)
    if model.config.num_classes != manifest.num_classes:
        raise ValueError(f"{url} predicts {model.config.num_classes} classes but {data} has {manifest.num_classes}")
    for field in ("classes", "heads"):
        theirs, ours = extra.get(field), manifest.data.get(field)
        if theirs is not None and ours is not None and theirs != ours:
            raise ValueError(f"{url} was trained on other class names than {data} has "
                             f"({_first_difference(theirs, ours)}); its predictions would be scored against the "
                             "wrong labels")
    if verify_data:
        bad = verify_shards(manifest, [split])
        if bad:
            raise ValueError(f"verify_data: {len(bad)} shard(s) of {data} split {split!r} do not match their "
                             f"sha256: {', '.join(bad[:5])}; run prep again to rewrite them")
    run = extra.get("config", {})
    rt = runtime.start(device)
    model.to(rt.device)
    batch_size = rt.per_device_multiple(batch_size)
    settings = run.get("augment") or run         # a checkpoint of an earlier release keeps them flat
    augment = AugmentConfig(mean=tuple(settings.get("mean", AugmentConfig.mean)),
                            std=tuple(settings.get("std", AugmentConfig.std)))
    dataset = ClipDataset(manifest, split, sampling="eval", num_frames=model.config.num_frames,
                          stride=run.get("stride", 1), image_size=model.config.image_size, augment=augment,
                          num_clips=clips, num_crops=crops)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         worker_init_fn=quiet_worker)
    metrics = evaluate_model(model, loader, rt, num_classes=manifest.num_classes, confusion=True,
                             batch_size=batch_size)
    listed = manifest.split(split)["num_samples"]
    metrics["skipped_unlabelled"] = max(0, listed - metrics["num_examples"])
    if metrics["skipped_unlabelled"]:
        log.warning("%s split %s: %d of its %d clips have no label and were not scored", data, split,
                    metrics["skipped_unlabelled"], listed)
    metrics.update({"checkpoint": url, "data": data, "split": split, "views": views,
                    "classes": manifest.data.get("classes"), "heads": manifest.data.get("heads")})
    if out and rt.is_main:
        write_bytes_atomic(join(out, "metrics.json"), json_bytes(metrics))
        log.info("evaluation of %s on %s/%s (%s views): top1 %s -> %s", url, data, split, views, metrics["top1"],
                 join(out, "metrics.json"))
    return metrics


def _first_difference(theirs: Any, ours: Any) -> str:
    if isinstance(theirs, list) and isinstance(ours, list):
        i = next(i for i, (a, b) in enumerate(zip(theirs + [None], ours + [None])) if a != b)
        a, b = (theirs[i] if i < len(theirs) else None), (ours[i] if i < len(ours) else None)
        return f"class {i} is {a!r} in the checkpoint, {b!r} in the data"
    return "the heads' class lists differ"
