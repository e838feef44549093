"""Multi-view evaluation: average the logits of every view of a clip, then count top-k hits.

Works for one head (an int label) and for several (EPIC verb/noun, where 'action' is both right).
Under DDP each rank evaluates its own shards and the counts are summed.
"""

from __future__ import annotations

from typing import Any

import torch

from sfa_vivit.core import runtime
from sfa_vivit.core.runtime import Runtime


def _views_as_rows(batch: dict[str, Any], size: int | None) -> dict[str, Any]:
    """On the host: the views of each clip as rows of the batch ((B, V, ...) → (B * V, ...), V in 'views'),
    and, given `size`, B padded to `size` clips (zeros, unlabelled: -1), so that every batch has one shape."""
    batch = {k: runtime.map_tensors(v, lambda t, fill=-1 if k == "label" else 0: runtime.pad_rows(t, size or 0, fill))
             for k, v in batch.items()}
    name = "features" if "features" in batch else "video"
    return {**batch, name: batch[name].flatten(0, 1), "views": batch[name].shape[1]}


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per example: is the label among the k largest logits? (B,) bool."""
    k = min(k, logits.shape[-1])
    return (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1)


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, loader, rt: Runtime | None = None, *, num_classes: int | dict[str, int],
                   confusion: bool = False, batch_size: int | None = None) -> dict[str, Any]:
    """Top-1/top-5 of `model` on `loader` batches {'video': (B, V, T, C, H, W), 'label'}, the logits
    of the V views of a clip averaged, on `rt`'s device(s) (default: the CPU, in this process's group).

    Returns {'top1', 'top5' (None with <= 5 classes), 'num_examples'} and, for several heads,
    '<head>_top1', '<head>_top5' and 'top1' = action accuracy (every head right).
    confusion: also 'confusion' (rows: true class, columns: predicted; a dict per head for several
    heads) and 'per_class_top1' (None for a class without examples).
    Labels of -1 (unlabelled) are skipped. On a lazy device, counts stay on it until the end, and a
    batch shorter than `batch_size` is padded with unlabelled rows (one shape, one graph).
    """
    rt = rt or runtime.on_cpu()
    device = rt.device
    heads = list(num_classes) if isinstance(num_classes, dict) else None
    sizes = dict(num_classes) if heads else {"": num_classes}
    matrices = {h: torch.zeros(k, k, device=device) for h, k in sizes.items()} if confusion else {}
    # Every name from the start: under DDP a rank that got no clips still reduces the same tensor.
    names = ["n", "top1", "top5"] if heads is None else ["n", "top1", *(f"{h}_top{k}" for h in heads for k in (1, 5))]
    counts: dict[str, Any] = dict.fromkeys(names, 0.0)

    def confuse(head: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if confusion:
            valid = labels >= 0
            matrices[head].index_put_((labels.clamp(min=0), logits.argmax(-1)), valid.float(), accumulate=True)

    def add(name: str, value: torch.Tensor) -> None:
        counts[name] = counts[name] + value.float().sum()

    pad_to = batch_size if rt.static_shapes else None
    was_training = model.training
    model.eval()
    for batch in rt.feed(_views_as_rows(batch, pad_to) for batch in loader):
        V = batch["views"]
        with rt.autocast:                  # cached spatial features (B * V, T', D), or videos
            out = model(features=batch["features"]) if "features" in batch else model(batch["video"])
        B = (out[heads[0]] if heads else out).shape[0] // V
        if heads is None:
            logits = out.float().view(B, V, -1).mean(1)
            labels = batch["label"]
            keep = labels >= 0
            add("n", keep)
            add("top1", topk_hits(logits, labels, 1) & keep)
            add("top5", topk_hits(logits, labels, 5) & keep)
            confuse("", logits, labels)
        else:
            all_right = None
            # A clip counts when every head is labelled, so that every figure has the same denominator.
            keep = torch.stack([batch["label"][h] >= 0 for h in heads]).all(0)
            for head in heads:
                logits = out[head].float().view(B, V, -1).mean(1)
                labels = batch["label"][head]
                hit1 = topk_hits(logits, labels, 1)
                add(f"{head}_top1", hit1 & keep)
                add(f"{head}_top5", topk_hits(logits, labels, 5) & keep)
                confuse(head, logits, torch.where(keep, labels, -1))
                all_right = hit1 if all_right is None else all_right & hit1
            add("n", keep)
            add("top1", all_right & keep)
        rt.step()
    model.train(was_training)

    # One read of the device at the end, then the sums over ranks (under SPMD the counts are the job's already).
    def total(t: torch.Tensor) -> torch.Tensor:
        t = t.cpu().double()
        return t if rt.kind == "xla" else rt.all_reduce(t).cpu()

    counts = dict(zip(names, total(torch.stack([torch.as_tensor(counts[n], device=device).float()
                                                for n in names])).tolist()))
    matrices = {h: total(m) for h, m in matrices.items()}
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
