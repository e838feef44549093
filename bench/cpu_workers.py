"""Training epochs on a CPU device with the clips read in the training process (workers=0) or by
DataLoader worker processes (workers=1 or more): stage 1 at 8 frames and the baseline at 32, side by side.

    python bench/cpu_workers.py [--epochs 2] [--workers 0,1] [--difficulty medium]

On a CPU device the model's threads and the reader's processes share the same cores, so a worker
overlaps nothing it does not also slow down. The synthetic recipe reads in-process because of this
measurement. Every run sees the same clips in the same order (one reader either way), so only the
time differs. Writes bench/results/cpu_workers.json.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save  # noqa: E402
from sfa_vs_baseline import make_data  # noqa: E402

from sfa_vivit.train import resolve, train  # noqa: E402

RUNS = {"stage1": 8, "baseline": 32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", default="0,1", help="DataLoader worker counts, comma-separated")
    parser.add_argument("--difficulty", default="medium")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(args.difficulty, Path(tmp))
        for workers in (int(w) for w in args.workers.split(",")):
            row = {"workers": workers}
            for mode, frames in RUNS.items():
                sets = [f"num_frames={frames}", f"epochs={args.epochs}", f"workers={workers}", "eval_every=0"]
                metrics = train(resolve(mode, "synthetic", sets=sets), data, str(Path(tmp) / f"{mode}-w{workers}"))
                row[f"{mode}_epoch_s"] = round(statistics.fmean(metrics["epoch_time_s"]), 3)
            row["stage1_over_baseline"] = round(row["stage1_epoch_s"] / row["baseline_epoch_s"], 3)
            print(row, flush=True)
            rows.append(row)
    save("cpu_workers", {"epochs": args.epochs, "rows": rows})
    print("| workers | stage 1 epoch (s) | baseline epoch (s) | stage 1 / baseline |\n|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workers']} | {r['stage1_epoch_s']} | {r['baseline_epoch_s']} | {r['stage1_over_baseline']} |")


if __name__ == "__main__":
    main()
