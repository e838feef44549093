"""The `sfa` command line. Each command parses its arguments and hands over to one library call."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

import torch

from sfa_vivit.models import VARIANTS, vivit


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


def smoke(variants: Sequence[str] = ("Ti", "S"), *, num_frames: int = 8, stage2_frames: int = 32,
          image_size: int = 224, batch_size: int = 2, num_classes: int = 10) -> list[dict]:
    """One training step (forward, backward) per variant, the conventional way at `num_frames` and
    the SFA stage-2 way (spatial frozen, adapter, temporal positions resized) at `stage2_frames`.
    Returns one row per (variant, mode) with parameter counts, step seconds and the loss."""
    rows = []
    for variant in variants:
        model = vivit(variant, num_frames=num_frames, image_size=image_size, num_classes=num_classes)
        for mode in ("full", "stage2"):
            if mode == "stage2":
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
                raise RuntimeError(f"{variant} {mode}: non-finite loss or gradient")
            row = {"variant": variant, "mode": mode, "frames": frames, "parameters": model.num_parameters(),
                   "trainable": model.num_parameters(trainable=True), "step_s": round(seconds, 3),
                   "loss": round(loss.item(), 4)}
            print(f"  {variant:>2} {mode:<6} {frames:>3} frames  params {row['parameters'] / 1e6:7.2f}M  "
                  f"trainable {row['trainable'] / 1e6:7.2f}M  step {seconds:6.2f}s  loss {row['loss']:.4f}",
                  flush=True)
            rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sfa", description="ViViT factorised encoders, trained the SFA way.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("smoke", help="one forward/backward step per variant, full and SFA stage 2, on this machine")
    p.add_argument("--variants", default="Ti,S", help="comma-separated, from " + ",".join(VARIANTS))
    p.add_argument("--frames", type=int, default=8, help="frames of the full (stage-1) step")
    p.add_argument("--stage2-frames", type=int, default=32, help="frames of the stage-2 step")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--out", help="write the rows as JSON to this file")

    p = sub.add_parser("info", help="parameter counts of a variant")
    p.add_argument("--variant", default="B", help="one of " + ",".join(VARIANTS))
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=400)
    p.add_argument("--adapter", action="store_true", help="count as SFA stage 2 (adapter on, spatial frozen)")

    args = parser.parse_args(argv)
    try:
        if args.command == "smoke":
            print(f"sfa smoke: torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
            rows = smoke([v.strip() for v in args.variants.split(",") if v.strip()], num_frames=args.frames,
                         stage2_frames=args.stage2_frames, image_size=args.image_size, batch_size=args.batch_size)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(rows, f, indent=2)
            print("sfa smoke: ok", flush=True)
        elif args.command == "info":
            print(json.dumps(model_summary(args.variant, num_frames=args.frames, image_size=args.image_size,
                                           num_classes=args.classes, adapter=args.adapter), indent=2))
    except ValueError as e:
        print(f"sfa {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
