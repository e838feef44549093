"""Projected total training time for the paper's Table 5 and Table 6 settings (ViViT-L at 128 frames,
ViViT-H at 96 frames), conventional vs SFA vs SFA with the frozen-feature cache, from a cost model
that is checked against the step times we measured.

    python bench/projection.py [--cache-views 2] [--stage1-frames 8]

The cost model (sfa_vivit/costmodel.py, where it is written out; tests/test_costmodel.py checks its
FLOP counts against torch's counter on the model) prices a step in forward FLOPs: full = 3 (S + T),
stage 2 = S + 3 (A + T), cached = 3 (A + T), for spatial S, temporal T and adapter A. A run of E epochs:

    conventional     = E x full(F)
    SFA              = E x full(8)  +  E x stage2(F)
    SFA + cache      = E x full(8)  +  K x S(F)  +  E x cached(F)

with E the dataset's recipe (supplementary Table 1), K cached views per clip and stage 1 at 8 frames.
Validation is left out of every side, as the paper's train times leave it out. The model ignores data
loading, the optimizer and memory-bound work; the check against measured step ratios (ViViT-Ti and -S on
CPU, bench/results/step_memory_*.json and membench_*.json) shows how far that carries. Hours are
projected by scaling the paper's own measured baseline hours by the ratio.

Writes bench/results/projection.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, save  # noqa: E402

from sfa_vivit.costmodel import run_ratios, step_flops  # noqa: E402
from sfa_vivit.models.vivit import VARIANTS, ViViTConfig  # noqa: E402
from sfa_vivit.train.config import RECIPES  # noqa: E402

# The paper's Tables 5 and 6: (variant, frames, dataset recipe, measured baseline hours, SFA / baseline).
PAPER = [
    ("L", 128, "kinetics400", 21.57, 0.56),
    ("L", 128, "kinetics600", 26.14, 0.56),
    ("H", 96, "kinetics400", 56.71, 0.57),
    ("H", 96, "kinetics600", 60.45, 0.57),
    ("H", 96, "mit", 110.79, 0.59),
    ("L", 128, "ssv2", 14.17, 0.62),
    ("L", 128, "something-else", 3.84, 0.62),
    ("L", 128, "epic-kitchens-100", 5.61, 0.63),
]

def config(variant: str, frames: int, image_size: int = 224) -> ViViTConfig:
    return ViViTConfig(num_frames=frames, image_size=image_size, num_classes=400, **VARIANTS[variant])


def check_against_measured() -> list[dict]:
    """The model's step ratios next to the ones measured side by side in one run."""
    rows = []
    for path in sorted(RESULTS.glob("step_memory_*_cpu.json")) + sorted(RESULTS.glob("membench_*.json")):
        name = path.name
        result = json.loads(path.read_text())
        for ratio in result.get("ratios", []):       # (the summary file has none)
            steps = step_flops(config(result["variant"], ratio["frames"], result["image_size"]))
            model = steps[ratio["regime"]] / steps["full"]
            rows.append({"source": name, "variant": result["variant"], "regime": ratio["regime"],
                         "frames": ratio["frames"], "measured": ratio["step_ratio"], "model": round(model, 4)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache-views", type=int, default=2, help="K: augmented views per clip in the cache")
    parser.add_argument("--stage1-frames", type=int, default=8)
    args = parser.parse_args()
    rows = []
    for variant, frames, recipe, hours, paper_ratio in PAPER:
        epochs = RECIPES[recipe]["epochs"]
        r = {k: round(v, 4) for k, v in
             run_ratios(config(variant, frames), epochs, args.cache_views, args.stage1_frames).items()}
        rows.append({"setting": f"ViViT-{variant} {frames}f", "dataset": recipe, "epochs": epochs,
                     "paper_baseline_h": hours, "paper_sfa_ratio": paper_ratio, **r,
                     "sfa_h": round(hours * r["sfa"], 2), "sfa_cached_h": round(hours * r["sfa_cached"], 2)})
    checks = check_against_measured()
    result = {"cache_views": args.cache_views, "stage1_frames": args.stage1_frames, "rows": rows,
              "model_vs_measured": checks}
    save("projection", result)
    lines = [f"Projected total training time / conventional (cost model in bench/projection.py; K = "
             f"{args.cache_views} cached views, stage 1 at {args.stage1_frames} frames for the same epochs)", "",
             "| setting | dataset | epochs | paper: baseline h | paper: SFA ratio | model: SFA ratio (h) "
             "| model: SFA + cache ratio (h) | stage 1 share |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['dataset']} | {r['epochs']} | {r['paper_baseline_h']} | "
                     f"{r['paper_sfa_ratio']} | {r['sfa']:.3f} ({r['sfa_h']}) | {r['sfa_cached']:.3f} "
                     f"({r['sfa_cached_h']}) | {r['stage1_share']:.3f} |")
    if checks:
        lines += ["", "Model step ratio vs measured (CPU, one run each):", "",
                  "| source | variant | mode | frames | measured step / full | model |", "|---|---|---|---:|---:|---:|"]
        lines += [f"| {c['source']} | {c['variant']} | {c['regime']} | {c['frames']} | {c['measured']} | {c['model']} |"
                  for c in checks]
    (RESULTS / "projection.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
