"""Multi-view evaluation: average the logits of every view of a clip, then count top-k hits.

Works for one head (an int label) and for several (EPIC verb/noun, where 'action' is both right).
Under DDP each rank evaluates its own shards and the counts are summed.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per example: is the label among the k largest logits? (B,) bool."""
    k = min(k, logits.shape[-1])
    return (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1)


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, loader, *, device: torch.device, num_classes: int | dict[str, int],
                   autocast: Any = None, confusion: bool = False) -> dict[str, Any]:
    """Top-1/top-5 of `model` on `loader` batches {'video': (B, V, T, C, H, W), 'label'}, the logits
    of the V views of a clip averaged.

    Returns {'top1', 'top5' (None with <= 5 classes), 'num_examples'} and, for several heads,
    '<head>_top1', '<head>_top5' and 'top1' = action accuracy (every head right).
    confusion: also 'confusion' (rows: true class, columns: predicted; a dict per head for several
    heads) and 'per_class_top1' (None for a class without examples).
    Labels of -1 (unlabelled) are skipped.
    """
    heads = list(num_classes) if isinstance(num_classes, dict) else None
    sizes = dict(num_classes) if heads else {"": num_classes}
    matrices = {h: torch.zeros(k, k, dtype=torch.float64, device=device) for h, k in sizes.items()} if confusion else {}
    # Every name from the start: under DDP a rank that got no clips still reduces the same tensor.
    names = ["n", "top1", "top5"] if heads is None else ["n", "top1", *(f"{h}_top{k}" for h in heads for k in (1, 5))]
    counts: dict[str, float] = dict.fromkeys(names, 0.0)

    def confuse(head: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if confusion:
            k = sizes[head]
            valid = labels >= 0
            index = labels[valid] * k + logits[valid].argmax(-1)
            matrices[head] += torch.bincount(index, minlength=k * k).view(k, k).to(torch.float64)

    def add(name: str, value: torch.Tensor) -> None:
        counts[name] += float(value.sum())

    was_training = model.training
    model.eval()
    ctx = autocast if autocast is not None else contextlib.nullcontext()
    for batch in loader:
        if "features" in batch:                     # cached spatial features (B, V, T', D)
            features = batch["features"].to(device, non_blocking=True)
            B, V = features.shape[:2]
            with ctx:
                out = model(features=features.flatten(0, 1))
        else:
            video = batch["video"].to(device, non_blocking=True)
            B, V = video.shape[:2]
            with ctx:
                out = model(video.flatten(0, 1))
        if heads is None:
            logits = out.float().view(B, V, -1).mean(1)
            labels = batch["label"].to(device)
            keep = labels >= 0
            add("n", keep)
            add("top1", topk_hits(logits, labels, 1) & keep)
            add("top5", topk_hits(logits, labels, 5) & keep)
            confuse("", logits, labels)
        else:
            all_right = None
            # A clip counts when every head is labelled, so that every figure has the same denominator.
            keep = torch.stack([batch["label"][h].to(device) >= 0 for h in heads]).all(0)
            for head in heads:
                logits = out[head].float().view(B, V, -1).mean(1)
                labels = batch["label"][head].to(device)
                hit1 = topk_hits(logits, labels, 1)
                add(f"{head}_top1", hit1 & keep)
                add(f"{head}_top5", topk_hits(logits, labels, 5) & keep)
                confuse(head, logits, torch.where(keep, labels, -1))
                all_right = hit1 if all_right is None else all_right & hit1
            add("n", keep)
            add("top1", all_right & keep)
    model.train(was_training)

    totals = torch.tensor([counts[n] for n in names], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    counts = dict(zip(names, totals.tolist()))
    for matrix in matrices.values():
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(matrix)
    n = counts.pop("n", 0.0)
    result: dict[str, Any] = {"num_examples": int(n)}
    for name, value in counts.items():
        result[name] = 100.0 * value / n if n else None
    sizes = num_classes.values() if isinstance(num_classes, dict) else [num_classes]
    if heads is None and num_classes <= 5:
        result["top5"] = None                      # top-5 of 5 classes or fewer says nothing
    for head, size in zip(heads or [], sizes):
        if size <= 5:
            result[f"{head}_top5"] = None
    result.setdefault("top5", None)
    if confusion:
        def per_class(m: torch.Tensor) -> list[float | None]:
            rows = m.sum(1)
            return [100.0 * float(m[i, i] / rows[i]) if rows[i] else None for i in range(m.shape[0])]
        if heads is None:
            result["confusion"] = matrices[""].long().tolist()
            result["per_class_top1"] = per_class(matrices[""])
        else:
            result["confusion"] = {h: m.long().tolist() for h, m in matrices.items()}
            result["per_class_top1"] = {h: per_class(m) for h, m in matrices.items()}
    return result
