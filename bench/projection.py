"""Projected total training time for the paper's Table 5 and Table 6 settings (ViViT-L at 128 frames,
ViViT-H at 96 frames), conventional vs SFA vs SFA with the frozen-feature cache, from a cost model
that is checked against the step times we measured.

    python bench/projection.py [--cache-views 2] [--stage1-frames 8]

The cost model (sfa_vivit/tools/costmodel.py, where it is written out; tests/test_costmodel.py checks its
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

Onto 1, 4 and 16 nodes (`--nodes`), as a projection: one node is the paper's setup (its measured hours),
compute divides by the number of nodes, and every step adds the ring all-reduce of the trainable
parameters' fp32 gradients between nodes, 2 (N - 1) / N x gradient bytes at `--bandwidth-gbps` per node
(100 Gb/s by default), not overlapped with compute (a pessimistic bound). Steps = epochs x train clips /
128 (the recipes' global batch, which stays the same on any number of nodes). SFA sends far less: stage 2
all-reduces only the adapter, temporal encoder and head.

Writes bench/results/projection.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, save  # noqa: E402

from sfa_vivit.models.vivit import VARIANTS, ViViTConfig  # noqa: E402
from sfa_vivit.tools.costmodel import run_ratios, step_flops  # noqa: E402
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

# Training clips per dataset (the authors' published train-split sizes; Something-Else: compositional split).
TRAIN_CLIPS = {"kinetics400": 246_535, "kinetics600": 392_622, "mit": 802_264, "ssv2": 168_913,
               "something-else": 54_919, "epic-kitchens-100": 67_217}
GLOBAL_BATCH = 128


def gradient_parameters(variant: str, frames: int) -> tuple[int, int]:
    """Trainable parameters of the conventional/stage-1 model and of SFA stage 2 (adapter + temporal + head)."""
    import torch

    from sfa_vivit.models import vivit
    with torch.device("meta"):
        model = vivit(variant, num_frames=frames, image_size=224, num_classes=400)
        full = model.num_parameters(trainable=True)
        model.add_adapter()
        model.freeze_spatial()
        return full, model.num_parameters(trainable=True)


def node_hours(compute_h: float, steps: int, parameters: int, nodes: int, gbps: float) -> float:
    """Compute hours split over `nodes`, plus one ring all-reduce of fp32 gradients per step between nodes."""
    seconds = 0.0 if nodes == 1 else steps * 2 * (nodes - 1) / nodes * parameters * 4 / (gbps * 1e9 / 8)
    return compute_h / nodes + seconds / 3600


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
    parser.add_argument("--nodes", default="1,4,16", help="node counts to project onto")
    parser.add_argument("--bandwidth-gbps", type=float, default=100.0, help="inter-node bandwidth per node")
    args = parser.parse_args()
    node_counts = [int(n) for n in args.nodes.split(",")]
    rows = []
    for variant, frames, recipe, hours, paper_ratio in PAPER:
        epochs = RECIPES[recipe]["epochs"]
        r = {k: round(v, 4) for k, v in
             run_ratios(config(variant, frames), epochs, args.cache_views, args.stage1_frames).items()}
        full_params, stage2_params = gradient_parameters(variant, frames)
        steps = epochs * -(-TRAIN_CLIPS[recipe] // GLOBAL_BATCH)
        stage1_h, stage2_h = hours * r["stage1_share"], hours * (r["sfa"] - r["stage1_share"])
        nodes = {str(n): {"baseline_h": round(node_hours(hours, steps, full_params, n, args.bandwidth_gbps), 2),
                          "sfa_h": round(node_hours(stage1_h, steps, full_params, n, args.bandwidth_gbps)
                                         + node_hours(stage2_h, steps, stage2_params, n, args.bandwidth_gbps), 2)}
                 for n in node_counts}
        rows.append({"setting": f"ViViT-{variant} {frames}f", "dataset": recipe, "epochs": epochs,
                     "paper_baseline_h": hours, "paper_sfa_ratio": paper_ratio, **r,
                     "sfa_h": round(hours * r["sfa"], 2), "sfa_cached_h": round(hours * r["sfa_cached"], 2),
                     "steps": steps, "gradient_parameters": {"full": full_params, "stage2": stage2_params},
                     "nodes": nodes})
    checks = check_against_measured()
    result = {"cache_views": args.cache_views, "stage1_frames": args.stage1_frames, "rows": rows,
              "model_vs_measured": checks, "bandwidth_gbps": args.bandwidth_gbps, "global_batch": GLOBAL_BATCH}
    save("projection", result)
    lines = [f"Projected total training time / conventional (cost model in bench/projection.py; K = "
             f"{args.cache_views} cached views, stage 1 at {args.stage1_frames} frames for the same epochs)", "",
             "| setting | dataset | epochs | paper: baseline h | paper: SFA ratio | model: SFA ratio (h) "
             "| model: SFA + cache ratio (h) | stage 1 share |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['dataset']} | {r['epochs']} | {r['paper_baseline_h']} | "
                     f"{r['paper_sfa_ratio']} | {r['sfa']:.3f} ({r['sfa_h']}) | {r['sfa_cached']:.3f} "
                     f"({r['sfa_cached_h']}) | {r['stage1_share']:.3f} |")
    lines += ["", f"Projection onto N nodes (hours; one node = the paper's setup; compute / N plus one fp32 "
              f"gradient all-reduce per step at {args.bandwidth_gbps:g} Gb/s per node, not overlapped; global batch "
              f"{GLOBAL_BATCH}). A projection, not a measurement:", "",
              "| setting | dataset | steps | " + " | ".join(f"{n} node{'s' if n > 1 else ''}: baseline / SFA h"
                                                        for n in node_counts) + " |",
              "|---|---|---:|" + "---:|" * len(node_counts)]
    for r in rows:
        cells = " | ".join(f"{r['nodes'][str(n)]['baseline_h']} / {r['nodes'][str(n)]['sfa_h']}" for n in node_counts)
        lines.append(f"| {r['setting']} | {r['dataset']} | {r['steps']} | {cells} |")
    if checks:
        lines += ["", "Model step ratio vs measured (CPU, one run each):", "",
                  "| source | variant | mode | frames | measured step / full | model |", "|---|---|---|---:|---:|---:|"]
        lines += [f"| {c['source']} | {c['variant']} | {c['regime']} | {c['frames']} | {c['measured']} | {c['model']} |"
                  for c in checks]
    (RESULTS / "projection.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
