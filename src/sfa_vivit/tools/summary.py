"""`sfa info` and `sfa smoke`: a variant's parameter counts (built on the meta device) and one training step
per variant, the conventional way and the SFA stage-2 way, on this machine."""

from __future__ import annotations

import time
from typing import Sequence

import torch

from sfa_vivit.models import vivit


def model_summary(variant: str, *, num_frames: int, image_size: int, num_classes: int,
                  adapter: bool = False) -> dict:
    """Parameter counts per part for a variant, built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        model = vivit(variant, num_frames=num_frames, image_size=image_size, num_classes=num_classes,
                      adapter=adapter)
    groups = {name: sum(p.numel() for _, p in params) for name, params in model.parameter_groups().items()}
    if adapter:
        model.freeze_spatial()
    return {"variant": model.config.variant, "num_frames": num_frames, "image_size": image_size,
            "parameters": groups, "total": model.num_parameters(),
            "trainable": model.num_parameters(trainable=True), "config": model.config.to_dict()}


def info_table(summary: dict) -> str:
    """`sfa info` for a person: the parameter counts per part, then the totals."""
    c = summary["config"]
    lines = [f"ViViT-{summary['variant']} factorised encoder, {summary['num_frames']} frames at "
             f"{summary['image_size']} px: width {c['width']}, {c['spatial_depth']} spatial + {c['temporal_depth']} "
             f"temporal blocks, {c['heads']} heads, patch {c['patch']}, tubelet {c['tubelet']}"]
    width = max(len(name) for name in summary["parameters"])
    lines += [f"  {name:<{width}}  {count / 1e6:>9.2f}M" for name, count in summary["parameters"].items()]
    lines.append(f"  {'total':<{width}}  {summary['total'] / 1e6:>9.2f}M ({summary['trainable'] / 1e6:.2f}M trained"
                 f"{' in SFA stage 2' if c.get('adapter') else ''})")
    if "runtime" in summary:
        r = summary["runtime"]
        xla = (f"torch-xla {r['torch_xla']} ({r.get('xla_devices', 0)} {r.get('xla_device_kind', 'XLA')} device(s) "
               f"with PJRT_DEVICE={r['pjrt_device']})" if r["pjrt_device"] else f"torch-xla {r['torch_xla']} "
               "(PJRT_DEVICE not set)") if r.get("torch_xla") else "no torch-xla"
        lines.append(f"this machine: torch {r['torch']}, {r['cuda_devices']} CUDA device(s), {xla}")
    return "\n".join(lines)


def smoke(variants: Sequence[str] = ("Ti", "S"), *, num_frames: int = 8, stage2_frames: int = 32,
          image_size: int = 224, batch_size: int = 2, num_classes: int = 10) -> list[dict]:
    """One training step (forward, backward) per variant, the conventional way at `num_frames` and
    the SFA stage-2 way (spatial frozen, adapter, temporal positions resized) at `stage2_frames`.
    Returns one row per (variant, regime: full or stage2) with parameter counts, step seconds and the loss."""
    rows = []
    for variant in variants:
        model = vivit(variant, num_frames=num_frames, image_size=image_size, num_classes=num_classes)
        for regime in ("full", "stage2"):
            if regime == "stage2":
                model.resize_temporal(stage2_frames).add_adapter().freeze_spatial()
            frames = model.config.num_frames
            video = torch.randn(batch_size, frames, 3, image_size, image_size)
            labels = torch.randint(0, num_classes, (batch_size,))
            model.train().zero_grad(set_to_none=True)
            start = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(video), labels)
            loss.backward()
            seconds = time.perf_counter() - start
            grads_ok = all(torch.isfinite(p.grad).all() for p in model.trainable_parameters())
            if not (torch.isfinite(loss) and grads_ok):
                raise RuntimeError(f"{variant} {regime}: non-finite loss or gradient")
            row = {"variant": variant, "regime": regime, "frames": frames, "parameters": model.num_parameters(),
                   "trainable": model.num_parameters(trainable=True), "step_s": round(seconds, 3),
                   "loss": round(loss.item(), 4)}
            print(f"  {variant:>2} {regime:<6} {frames:>3} frames  params {row['parameters'] / 1e6:7.2f}M  "
                  f"trainable {row['trainable'] / 1e6:7.2f}M  step {seconds:6.2f}s  loss {row['loss']:.4f}",
                  flush=True)
            rows.append(row)
    return rows
