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
                   autocast: Any = None) -> dict[str, Any]:
    """Top-1/top-5 of `model` on `loader` batches {'video': (B, V, T, C, H, W), 'label'}.

    Returns {'top1', 'top5' (None with <= 5 classes), 'num_examples'} and, for several heads,
    '<head>_top1', '<head>_top5' and 'top1' = action accuracy (every head right).
    Labels of -1 (unlabelled) are skipped.
    """
    heads = list(num_classes) if isinstance(num_classes, dict) else None
    counts: dict[str, float] = {}

    def add(name: str, value: torch.Tensor) -> None:
        counts[name] = counts.get(name, 0.0) + float(value.sum())

    was_training = model.training
    model.eval()
    ctx = autocast if autocast is not None else contextlib.nullcontext()
    for batch in loader:
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
        else:
            all_right = None
            keep = None
            for head in heads:
                logits = out[head].float().view(B, V, -1).mean(1)
                labels = batch["label"][head].to(device)
                keep = labels >= 0 if keep is None else keep & (labels >= 0)
                hit1 = topk_hits(logits, labels, 1)
                add(f"{head}_top1", hit1 & (labels >= 0))
                add(f"{head}_top5", topk_hits(logits, labels, 5) & (labels >= 0))
                all_right = hit1 if all_right is None else all_right & hit1
            add("n", keep)
            add("top1", all_right & keep)
    model.train(was_training)

    names = sorted(counts)
    totals = torch.tensor([counts[n] for n in names], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    counts = dict(zip(names, totals.tolist()))
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
    return result
