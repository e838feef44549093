"""Which frames stage 1 sees: SFA with stage 1 at 8 frames `--stride` apart (default 4: the 32-frame
span of stage 2 at a quarter of the frame rate) against the same seeds of bench/sfa_vs_baseline.py,
whose stage 1 takes 8 consecutive frames (a quarter of the span).

    python bench/stage1_stride.py [--seeds 0,1,2] [--stride 4] [--epochs 12]

Same data, image ViT, recipe and epochs as bench/sfa_vs_baseline.py; runs stage 1 and stage 2 (no
cache) only and sets them beside that benchmark's recorded baseline and SFA figures for the same seeds.
Writes bench/results/stage1_stride.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, save  # noqa: E402
from sfa_vs_baseline import make_data  # noqa: E402

from sfa_vivit.tools import synth_vit as image_vit
from sfa_vivit.train import resolve, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    recorded = json.loads((RESULTS / "sfa_vs_baseline.json").read_text())["per_seed"]
    per_seed = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_data("medium", root)
        vit = image_vit.pretrain(str(root / "vit"), image_vit.ImageViTOptions(difficulty="medium"), progress=False)
        common = [f"epochs={args.epochs}", "num_frames=8"]
        for seed in [int(s) for s in args.seeds.split(",")]:
            s1 = train(resolve("stage1", "synthetic", sets=[*common, f"seed={seed}", f"stride={args.stride}",
                                                             f"image_checkpoint={root / 'vit'}"]),
                       data, str(root / f"s1-{seed}"))
            s2 = train(resolve("stage2", "synthetic", sets=[f"epochs={args.epochs}", f"seed={seed}", "num_frames=32"]),
                       data, str(root / f"s2-{seed}"), init=str(root / f"s1-{seed}"))
            before = recorded.get(str(seed), {})
            per_seed[seed] = {
                "stage1_top1": s1["final"]["top1"], "sfa_top1": s2["final"]["top1"],
                "sfa_train_time_s": round(s1["train_time_s"] + s2["train_time_s"], 2),
                "stage1_curve": s1["top1"], "stage2_curve": s2["top1"],
                "recorded_baseline_top1": before.get("baseline", {}).get("top1"),
                "recorded_sfa_stride1_top1": before.get("sfa", {}).get("top1"),
                "recorded_stage1_stride1_top1": before.get("sfa", {}).get("stage1_top1"),
            }
            print(f"seed {seed}:", {k: v for k, v in per_seed[seed].items() if "curve" not in k}, flush=True)
    mean = {k: round(statistics.fmean(s[k] for s in per_seed.values()), 3)
            for k in ("stage1_top1", "sfa_top1", "recorded_baseline_top1", "recorded_sfa_stride1_top1")
            if all(s[k] is not None for s in per_seed.values())}
    save("stage1_stride", {"stride": args.stride, "epochs": args.epochs, "image_vit_val_accuracy": vit["val_accuracy"],
                           "mean": mean, "per_seed": {str(k): v for k, v in per_seed.items()}})
    print(json.dumps(mean, indent=1))


if __name__ == "__main__":
    main()
