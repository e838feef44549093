"""Step time and peak memory of full training vs SFA stage 2 vs stage 2 from the feature cache.

For ViViT-Ti and ViViT-S (and B on a GPU) at 8/16/32/64/128 frames, each setting in a fresh child
process (`sfa membench`), so the ratios are measured side by side in one run on one machine.

    python bench/step_memory.py [--variants Ti,S] [--frames 8,16,32,64,128] [--steps 2]

Writes results/step_memory_<variant>_<device>.{json,md,png} and prints the ratios the README quotes:
stage-2 step / full step at 16 frames, cached / full, and peak memory per added frame.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import RESULTS, save  # noqa: E402

from sfa_vivit.tools.membench import benchmark  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu = torch.cuda.is_available()
    parser.add_argument("--variants", default="Ti,S,B" if gpu else "Ti,S")
    parser.add_argument("--frames", default="8,16,32,64,128")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8 if gpu else 1)
    parser.add_argument("--precision", default="bf16" if gpu else "fp32")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = "cuda" if gpu else "cpu"
    summary = {}
    for variant in args.variants.split(","):
        name = f"step_memory_{variant}_{device}"
        result = benchmark(variant, [int(f) for f in args.frames.split(",")], ["full", "stage2", "stage2-cached"],
                           batch_size=args.batch_size, steps=args.steps, device=device, precision=args.precision,
                           out=str(RESULTS / f"{name}.json"))
        slopes = result["per_frame_bytes"]
        at16 = {r["regime"]: r for r in result["ratios"] if r["frames"] == 16}
        summary[variant] = {
            "stage2_over_full_step_16f": at16.get("stage2", {}).get("step_ratio"),
            "cached_over_full_step_16f": at16.get("stage2-cached", {}).get("step_ratio"),
            "full_bytes_per_frame": slopes.get("full"), "stage2_bytes_per_frame": slopes.get("stage2"),
            "stage2_over_full_per_frame": (round(slopes["stage2"] / slopes["full"], 4)
                                           if slopes.get("full") and slopes.get("stage2") is not None else None),
            "result": f"results/{name}.json",
        }
        save(name, result)
    save(f"step_memory_summary_{device}", {"summary": summary})
    for variant, s in summary.items():
        print(f"ViViT-{variant}: stage2/full step at 16f {s['stage2_over_full_step_16f']}, cached/full "
              f"{s['cached_over_full_step_16f']}, memory per added frame stage2/full {s['stage2_over_full_per_frame']}")


if __name__ == "__main__":
    main()
