"""End to end on the synthetic dataset: the conventional recipe (baseline, 32 frames) against SFA
(stage 1 at 8 frames, then stage 2 at 32 frames from it), same recipe and epochs for every run,
on the same clock.

    python bench/sfa_vs_baseline.py [--epochs 12] [--difficulty medium] [--frames 32] [--set key=value ...]

Writes bench/results/sfa_vs_baseline.json and .png (validation top-1 per epoch of each run).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, line_plot, save  # noqa: E402

from sfa_vivit.data import synth  # noqa: E402
from sfa_vivit.data.prep import PrepOptions, prepare  # noqa: E402
from sfa_vivit.train import resolve, train  # noqa: E402


def run(epochs: int, difficulty: str, frames: int, sets: list[str], root: Path) -> dict:
    paths = synth.generate(str(root / "raw"), synth.SynthOptions(difficulty=difficulty), progress=False)
    data = str(root / "shards")
    prepare("synthetic", [paths["train"], paths["validation"]], paths["videos"], data,
            options=PrepOptions(fps=16, short_side=64, shard_size=64), progress=False)
    common = [f"epochs={epochs}", *sets]
    runs = {}
    runs["baseline"] = train(resolve("baseline", "synthetic", sets=[*common, f"num_frames={frames}"]), data,
                             str(root / "baseline"))
    runs["stage1"] = train(resolve("stage1", "synthetic", sets=[*common, "num_frames=8"]), data, str(root / "stage1"))
    runs["stage2"] = train(resolve("stage2", "synthetic", sets=[*common, f"num_frames={frames}"]), data,
                           str(root / "stage2"), init=str(root / "stage1"))
    return runs


def summarise(runs: dict) -> dict:
    base, s1, s2 = runs["baseline"], runs["stage1"], runs["stage2"]
    sfa_time = s1["train_time_s"] + s2["train_time_s"]
    return {
        "baseline": {"train_time_s": base["train_time_s"], "top1": base["final"]["top1"],
                     "top5": base["final"]["top5"], "npp_epoch": base["npp_epoch"]},
        "sfa": {"train_time_s": round(sfa_time, 2), "stage1_train_time_s": s1["train_time_s"],
                "stage2_train_time_s": s2["train_time_s"], "top1": s2["final"]["top1"], "top5": s2["final"]["top5"],
                "stage1_top1": s1["final"]["top1"], "npp_epoch": s2["npp_epoch"]},
        "time_ratio_sfa_over_baseline": round(sfa_time / base["train_time_s"], 3),
        "top1_difference_sfa_minus_baseline": round(s2["final"]["top1"] - base["final"]["top1"], 2),
        "views": base["final"]["views"],
        "curves": {name: r["top1"] for name, r in runs.items()},
        "clips_per_s": {name: r["clips_per_s"] for name, r in runs.items()},
    }


def plot(summary: dict, path: Path) -> None:
    series = {name: (list(range(1, len(curve) + 1)), curve) for name, curve in summary["curves"].items()}
    line_plot(path, series, xlabel="epoch", ylabel="validation top-1 (%)",
              title=f"synthetic: SFA {summary['sfa']['top1']:.1f}% in {summary['sfa']['train_time_s']:.0f}s vs "
                    f"baseline {summary['baseline']['top1']:.1f}% in {summary['baseline']['train_time_s']:.0f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--difficulty", default="medium")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        summary = summarise(run(args.epochs, args.difficulty, args.frames, args.set, Path(tmp)))
    plot(summary, RESULTS / "sfa_vs_baseline.png")
    save("sfa_vs_baseline", summary)
    print({k: v for k, v in summary.items() if k not in ("curves", "clips_per_s")})


if __name__ == "__main__":
    main()
