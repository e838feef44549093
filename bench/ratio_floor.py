"""How low SFA's time can go against the conventional recipe: the compute floor of the end-to-end ratio.

bench/sfa_vs_baseline.py measures total train time; this script takes the model steps alone (random
inputs, no data reading, each setting in a fresh child process through `sfa membench`, side by side
in one run) and composes them the way a run spends them:

    baseline       E x steps x t_full(F)
    SFA + cache    E x steps x t_full(8)  +  K x N x t_fwd(F) / B  +  E x steps x t_cached(F)

with steps = N // B per epoch and t_fwd(F) = t_stage2(F) - t_cached(F): a stage-2 step is the frozen
spatial forward plus a cached step, and the cache build is that forward for K views of every clip.
So the floor is

    ratio = t_full(8) / t_full(F)  +  (K / E) (N / (steps B)) t_fwd(F) / t_full(F)  +  t_cached(F) / t_full(F)

which is what the end-to-end ratio would be with free data reading and no per-epoch work. Next to it:
the FLOP model's figure (`sfa_vivit.tools.costmodel.run_ratios`), and the floor at other epoch counts.

    python bench/ratio_floor.py [--settings synthetic,Ti-224] [--steps 10] [--repeats 5]

Settings: `synthetic` is the model and batch of bench/sfa_vs_baseline.py (width 96, 4+2 blocks, 64x64,
batch 16, E=12, K=2, N=360); `Ti-224` is ViViT-Ti at the paper's 224x224 (batch 2, same E, K, N).
Writes bench/results/ratio_floor.{json,png}.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, line_plot, save  # noqa: E402

from sfa_vivit.models.vivit import vivit  # noqa: E402
from sfa_vivit.tools.costmodel import run_ratios  # noqa: E402
from sfa_vivit.tools.membench import benchmark  # noqa: E402

SETTINGS = {
    "synthetic": dict(variant="Ti", image_size=64, batch_size=16, num_classes=16,
                      model=dict(width=96, spatial_depth=4, temporal_depth=2, heads=4, mlp_dim=192, patch=8)),
    "Ti-224": dict(variant="Ti", image_size=224, batch_size=2, num_classes=16, model={}),
}
BOUND = 0.35          # the must-show for SFA + cache / baseline


def floor(t: dict[str, float], *, epochs: int, views: int, clips: int, batch: int) -> dict[str, float]:
    """The parts of the SFA + cache / baseline ratio from step times t: full8, full, stage2, cached."""
    steps = clips // batch
    forward = max(t["stage2"] - t["cached"], 0.0)
    parts = {"stage1": t["full8"] / t["full"],
             "cache_build": views / epochs * clips / (steps * batch) * forward / t["full"],
             "cached_steps": t["cached"] / t["full"]}
    return {**{k: round(v, 4) for k, v in parts.items()}, "floor": round(sum(parts.values()), 4)}


def measure(name: str, frames: int, steps: int) -> dict[str, float]:
    s = SETTINGS[name]
    result = benchmark(s["variant"], [8, frames], ["full", "stage2", "stage2-cached"], image_size=s["image_size"],
                       batch_size=s["batch_size"], steps=steps, spatial_chunk=0, model=s["model"])
    step = {(r["regime"], r["frames"]): r["step_s"] for r in result["rows"] if r.get("fits")}
    return {"full8": step[("full", 8)], "full": step[("full", frames)], "stage2": step[("stage2", frames)],
            "cached": step[("stage2-cached", frames)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default="synthetic,Ti-224")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--cache-views", type=int, default=2)
    parser.add_argument("--clips", type=int, default=360)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = args.settings.split(",")
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown:
        parser.error(f"--settings: unknown {unknown}; choose from {list(SETTINGS)}")
    results, series = {}, {}
    for name in names:
        s = SETTINGS[name]
        shape = dict(epochs=args.epochs, views=args.cache_views, clips=args.clips, batch=s["batch_size"])
        repeats = [measure(name, args.frames, args.steps) for _ in range(args.repeats)]
        floors = [floor(t, **shape) for t in repeats]
        median = {k: round(statistics.median(f[k] for f in floors), 4) for k in floors[0]}
        config = vivit(s["variant"], num_frames=args.frames, image_size=s["image_size"],
                       num_classes=s["num_classes"], **s["model"]).config
        flops = run_ratios(config, args.epochs, args.cache_views)
        at_epochs = {e: statistics.median(floor(t, **{**shape, "epochs": e})["floor"] for t in repeats)
                     for e in (6, 12, 30, 50)}
        results[name] = {"setting": s, "step_s": repeats, "floors": floors, "median": median,
                         "flop_model": {"stage1": round(flops["stage1_share"], 4),
                                        "sfa_cached": round(flops["sfa_cached"], 4)},
                         "floor_by_epochs": at_epochs}
        series[name] = (list(at_epochs), list(at_epochs.values()))
        print(f"{name}: floor {median['floor']} (stage 1 {median['stage1']}, cache build {median['cache_build']}, "
              f"cached steps {median['cached_steps']}; each repeat {[f['floor'] for f in floors]}); FLOP model "
              f"{results[name]['flop_model']['sfa_cached']}; by epochs {at_epochs}")
    line_plot(RESULTS / "ratio_floor.png", series, xlabel="epochs (E)", ylabel="SFA + cache / baseline",
              title=f"compute floor of the time ratio, {args.frames} frames, K={args.cache_views}",
              hlines={f"bound {BOUND}": BOUND})
    save("ratio_floor", {"frames": args.frames, "epochs": args.epochs, "cache_views": args.cache_views,
                         "clips": args.clips, "bound": BOUND, "results": results})


if __name__ == "__main__":
    main()
