"""End to end on the synthetic dataset: the conventional recipe (baseline, 32 frames) against SFA
(stage 1 at 8 frames, then stage 2 at 32 frames from it), and SFA with stage 2 trained from the
frozen-feature cache, same recipe and epochs for every run, on the same clock. Then the paper's
Table 1 ablation rows as stage-2 variants (from the same cache: the frozen part is the same):
frozen spatial with the temporal encoder from scratch, without / with the adapter, and with the
stage-1 temporal encoder but no adapter.

    python bench/sfa_vs_baseline.py [--epochs 12] [--difficulty medium] [--frames 32] [--cache-views 2]
                                    [--seeds 0,1,2] [--image-vit auto|none|PATH] [--set key=value ...]
                                    [--name sfa_vs_baseline]

As in the paper, every run's spatial encoder starts from an image ViT: by default the synthetic one
(`sfa_vivit.tools.synth_vit`, trained first on frames of the same kind of scenes; its time is
preparation, in no run's train_time_s, and its held-out accuracy is in the results). `--image-vit none`
trains from scratch: then a run waits at chance for a seed-dependent number of epochs and the
comparison mostly measures the seed.

Every run is repeated for each training seed (the dataset stays the same): 120 validation clips make one
clip 0.83 points, and a single seed's difference between two recipes is within its seed-to-seed spread.
The summary gives each seed's figures, their mean, standard deviation and 95% t interval of the mean,
and judges the claims of `CLAIMS` on those intervals: met, not met, or undetermined (the interval
straddles the bound: the seeds cannot tell).

Writes bench/results/<name>.json and .png (`--name`, default sfa_vs_baseline; the PNG: validation top-1 per
epoch of each run, first seed).
A cached run's train_time_s includes building the cache's training views.
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
from _common import RESULTS, interval95, judge, line_plot, save  # noqa: E402

from sfa_vivit.data.prep import (  # noqa: E402
    PrepOptions,
    prepare,
    synth,  # noqa: E402
)
from sfa_vivit.tools import synth_vit as image_vit_module  # noqa: E402
from sfa_vivit.train import resolve, train  # noqa: E402

ABLATIONS = {  # Table 1 rows as stage-2 switches
    "frozen_scratch_no_adapter": ["temporal_init=scratch", "adapter=false"],
    "frozen_scratch_adapter": ["temporal_init=scratch", "adapter=true"],
    "frozen_stage1_no_adapter": ["temporal_init=stage1", "adapter=false"],
}


def make_data(difficulty: str, root: Path) -> str:
    paths = synth.generate(str(root / "raw"), synth.SynthOptions(difficulty=difficulty), progress=False)
    data = str(root / "shards")
    prepare("synthetic", [paths["train"], paths["validation"]], paths["videos"], data,
            options=PrepOptions(fps=16, short_side=64, shard_size=64), progress=False)
    return data


def run(data: str, epochs: int, frames: int, sets: list[str], root: Path, cache_views: int) -> dict:
    """Every run of one seed (the seed is in `sets`), outputs under `root`."""
    common = [f"epochs={epochs}", *sets]
    runs = {}
    runs["baseline"] = train(resolve("baseline", "synthetic", sets=[*common, f"num_frames={frames}"]), data,
                             str(root / "baseline"))
    runs["stage1"] = train(resolve("stage1", "synthetic", sets=[*common, "num_frames=8"]), data, str(root / "stage1"))
    runs["stage2"] = train(resolve("stage2", "synthetic", sets=[*common, f"num_frames={frames}"]), data,
                           str(root / "stage2"), init=str(root / "stage1"))
    cache = [f"cache_views={cache_views}", f"num_frames={frames}"]
    runs["stage2_cached"] = train(resolve("stage2", "synthetic", sets=[*common, *cache]), data,
                                  str(root / "stage2_cached"), init=str(root / "stage1"))
    shared = f"cache_dir={root / 'stage2_cached' / 'feature_cache'}"   # Table 1 rows reuse it
    for name, switches in ABLATIONS.items():
        runs[name] = train(resolve("stage2", "synthetic", sets=[*common, *cache, shared, *switches]), data,
                           str(root / name), init=str(root / "stage1"))
    return runs


def summarise(runs: dict) -> dict:
    base, s1, s2, s2c = runs["baseline"], runs["stage1"], runs["stage2"], runs["stage2_cached"]
    sfa_time = s1["train_time_s"] + s2["train_time_s"]
    cached_time = s1["train_time_s"] + s2c["train_time_s"]
    return {
        "baseline": {"train_time_s": base["train_time_s"], "top1": base["final"]["top1"],
                     "top5": base["final"]["top5"], "npp_epoch": base["npp_epoch"]},
        "sfa": {"train_time_s": round(sfa_time, 2), "stage1_train_time_s": s1["train_time_s"],
                "stage2_train_time_s": s2["train_time_s"], "top1": s2["final"]["top1"], "top5": s2["final"]["top5"],
                "stage1_top1": s1["final"]["top1"], "npp_epoch": s2["npp_epoch"]},
        "sfa_cached": {"train_time_s": round(cached_time, 2), "stage2_train_time_s": s2c["train_time_s"],
                       "cache_build_time_s": s2c["cache"]["train_build_time_s"],
                       "cache_bytes_per_clip": s2c["cache"]["bytes_per_clip"],
                       "cache_views": s2c["cache"]["train_views"], "top1": s2c["final"]["top1"],
                       "top5": s2c["final"]["top5"], "npp_epoch": s2c["npp_epoch"],
                       "epoch_time_s": s2c["epoch_time_s"]},
        "time_ratio_sfa_over_baseline": round(sfa_time / base["train_time_s"], 3),
        "time_ratio_sfa_cached_over_baseline": round(cached_time / base["train_time_s"], 3),
        "cached_epoch_over_baseline_epoch": round(
            (sum(s2c["epoch_time_s"]) / len(s2c["epoch_time_s"]))
            / (sum(base["epoch_time_s"]) / len(base["epoch_time_s"])), 4),
        "top1_difference_sfa_minus_baseline": round(s2["final"]["top1"] - base["final"]["top1"], 2),
        "top1_difference_sfa_cached_minus_baseline": round(s2c["final"]["top1"] - base["final"]["top1"], 2),
        "table1_rows": {name: {"switches": ABLATIONS[name], "top1": runs[name]["final"]["top1"],
                               "stage2_train_time_s": runs[name]["train_time_s"],
                               "trainable_parameters": runs[name]["trainable_parameters"]} for name in ABLATIONS},
        "epochs": len(base["top1"]), "views": base["final"]["views"],
        "curves": {name: r["top1"] for name, r in runs.items()},
        "clips_per_s": {name: r["clips_per_s"] for name, r in runs.items()},
    }


# The figures averaged over seeds: (path in a seed's summary) -> name in "mean" / "std".
AGGREGATE = {
    "baseline_top1": ("baseline", "top1"), "sfa_top1": ("sfa", "top1"), "sfa_cached_top1": ("sfa_cached", "top1"),
    "stage1_top1": ("sfa", "stage1_top1"), "baseline_train_time_s": ("baseline", "train_time_s"),
    "sfa_train_time_s": ("sfa", "train_time_s"), "sfa_cached_train_time_s": ("sfa_cached", "train_time_s"),
    "time_ratio_sfa_over_baseline": ("time_ratio_sfa_over_baseline",),
    "time_ratio_sfa_cached_over_baseline": ("time_ratio_sfa_cached_over_baseline",),
    "cached_epoch_over_baseline_epoch": ("cached_epoch_over_baseline_epoch",),
    "top1_difference_sfa_minus_baseline": ("top1_difference_sfa_minus_baseline",),
    "top1_difference_sfa_cached_minus_baseline": ("top1_difference_sfa_cached_minus_baseline",),
    **{f"{name}_top1": ("table1_rows", name, "top1") for name in ABLATIONS},
}


# The claims on the seed means: figure -> (bound, "le" | "ge").
CLAIMS = {
    "time_ratio_sfa_cached_over_baseline": (0.35, "le"),
    "top1_difference_sfa_cached_minus_baseline": (-0.5, "ge"),
    "top1_difference_sfa_minus_baseline": (-0.5, "ge"),
}


def verdict(ci: list[float] | None, bound: float, sense: str) -> str:
    """The claim `value <= bound` (sense 'le') or `>= bound` ('ge') judged on the interval (`_common.judge`)."""
    return judge(ci, (lambda v: v <= bound) if sense == "le" else (lambda v: v >= bound))


def aggregate(per_seed: dict[int, dict]) -> dict:
    """Mean, (sample) standard deviation and 95% interval of the mean over seeds of every AGGREGATE
    figure (the top-1 differences are paired: both runs of a seed see the same data order), and the
    issue's claims judged on those intervals."""
    mean, std, ci = {}, {}, {}
    for name, path in AGGREGATE.items():
        values = []
        for summary in per_seed.values():
            for key in path:
                summary = summary[key]
            values.append(summary)
        mean[name] = round(statistics.fmean(values), 3)
        std[name] = round(statistics.stdev(values), 3) if len(values) > 1 else None
        ci[name] = interval95(values)
    claims = {name: {"bound": bound, "sense": "<=" if sense == "le" else ">=", "mean": mean[name], "ci95": ci[name],
                     "verdict": verdict(ci[name], bound, sense)} for name, (bound, sense) in CLAIMS.items()}
    return {"seeds": list(per_seed), "mean": mean, "std": std, "ci95": ci, "claims": claims}


def plot(summary: dict, path: Path) -> None:
    first = summary["per_seed"][str(summary["seeds"][0])]
    series = {name: (list(range(1, len(curve) + 1)), curve) for name, curve in first["curves"].items()
              if name in ("baseline", "stage1", "stage2", "stage2_cached")}
    m, n = summary["mean"], len(summary["seeds"])
    line_plot(path, series, xlabel="epoch", ylabel=f"validation top-1 (%), seed {summary['seeds'][0]}",
              title=f"mean of {n} seed(s): SFA {m['sfa_top1']:.1f}% ({m['time_ratio_sfa_over_baseline']:.2f}x), "
                    f"+cache {m['sfa_cached_top1']:.1f}% ({m['time_ratio_sfa_cached_over_baseline']:.2f}x), "
                    f"baseline {m['baseline_top1']:.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--difficulty", default="medium")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--cache-views", type=int, default=2, help="augmented views per clip in the cache")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    parser.add_argument("--image-vit", default="auto",
                        help="spatial init of every run: 'auto' trains the synthetic image ViT first "
                             "(sfa data synth-vit), 'none' trains from scratch, or an image checkpoint path")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--name", default="sfa_vs_baseline", help="results/<name>.json and .png")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    per_seed = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(args.difficulty, Path(tmp))
        image_vit, sets = None, list(args.set)
        if args.image_vit == "auto":
            image_vit = image_vit_module.pretrain(str(Path(tmp) / "image_vit"),
                                                  image_vit_module.ImageViTOptions(difficulty=args.difficulty),
                                                  sets=args.set, progress=False)
            sets.append(f"image_checkpoint={Path(tmp) / 'image_vit'}")
        elif args.image_vit != "none":
            sets.append(f"image_checkpoint={args.image_vit}")
        for seed in seeds:
            runs = run(data, args.epochs, args.frames, [f"seed={seed}", *sets], Path(tmp) / f"seed{seed}",
                       args.cache_views)
            per_seed[seed] = summarise(runs)
            print(f"seed {seed}:", {k: v for k, v in per_seed[seed].items() if k not in ("curves", "clips_per_s")},
                  flush=True)
    summary = {**aggregate(per_seed), "image_vit": image_vit or args.image_vit,
               "per_seed": {str(k): v for k, v in per_seed.items()}}
    plot(summary, RESULTS / f"{args.name}.png")
    save(args.name, summary)
    print(json.dumps({"mean": summary["mean"], "std": summary["std"], "claims": summary["claims"]}, indent=1))


if __name__ == "__main__":
    main()
