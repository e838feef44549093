"""How far the main job's two figures move with the training seed and the thread count.

    python bench/mainjob_spread.py                        # seeds 0-4, OMP_NUM_THREADS 1 and 2 (about 25 min)
    python bench/mainjob_spread.py --seeds 0,1 --threads 2 --name mainjob_spread_quick
    python bench/mainjob_spread.py --threads 1 --name t1 & python bench/mainjob_spread.py --threads 2 --name t2
    python bench/mainjob_spread.py --combine t1,t2       # both halves at once on 2 cores, then one summary

`make run` reports SFA's and the baseline's top-1 from one run. This trains exactly what that run trains (the
local pipeline's data, image ViT, recipe and `--set`s: runner.local_inputs), through the library rather than
kfp.local, once per (thread count, seed): the baseline, stage 1 and stage 2, each evaluated at the end with the
run's views. Each (thread count, seed) runs in its own process, started with OMP_NUM_THREADS set, as a user's
machine with that many cores would run it.

Writes bench/results/<name>.json: per run the two top-1 figures and times, and per figure its range over seeds
(at each thread count), over thread counts (at each seed) and over everything, with the issue's bound (3 points).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interval95, save  # noqa: E402

BOUND = 3.0          # points: the most either figure may move over seeds and thread counts
FIGURES = ("sfa_top1", "baseline_top1")


def worker(args: argparse.Namespace) -> None:
    """One (thread count, seed): the main job's three trainings; prints their figures as one JSON line."""
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    from sfa_vivit.kubeflow.runner import local_arguments
    from sfa_vivit.train import resolve, train
    _, arguments = local_arguments("default")
    common = [*arguments["sets"], f"image_checkpoint={args.vit}", f"seed={args.seed}", "eval_every=0",
              f"final_eval_views={arguments['eval_views']}"]
    out = Path(args.out)

    def run(name: str, mode: str, sets: list[str], init: str | None = None) -> dict:
        """A finished run of the same config is reused (training is deterministic at a seed and thread count)."""
        config = resolve(mode, "synthetic", sets=[*common, *sets])
        folder = out / name
        done, saved = folder / "metrics.json", folder / "config.json"
        if done.exists() and saved.exists() and json.loads(saved.read_text()) == json.loads(
                json.dumps(config.to_dict())):
            return json.loads(done.read_text())
        shutil.rmtree(folder, ignore_errors=True)
        return train(config, args.data, str(folder), init=init)

    baseline = run("baseline", "baseline", arguments["baseline_sets"])
    stage1 = run("stage1", "stage1", arguments["stage1_sets"])
    stage2 = run("stage2", "stage2", arguments["stage2_sets"], init=str(out / "stage1"))
    print("RESULT " + json.dumps({
        "threads": torch.get_num_threads(), "seed": args.seed,
        "sfa_top1": stage2["final"]["top1"], "baseline_top1": baseline["final"]["top1"],
        "sfa_time_s": round(stage1["train_time_s"] + stage2["train_time_s"], 2),
        "baseline_time_s": round(baseline["train_time_s"], 2)}), flush=True)


def spread(values: list[float]) -> float:
    return round(max(values) - min(values), 3)


def summarise(results: list[dict]) -> dict:
    out: dict = {}
    for figure in FIGURES:
        by_threads: dict[int, list[float]] = {}
        by_seed: dict[int, list[float]] = {}
        for r in results:
            by_threads.setdefault(r["threads"], []).append(r[figure])
            by_seed.setdefault(r["seed"], []).append(r[figure])
        values = [r[figure] for r in results]
        out[figure] = {
            "mean": round(statistics.fmean(values), 3),
            "std": round(statistics.stdev(values), 3) if len(values) > 1 else None,
            "ci95_of_mean": interval95(values),
            "range_over_seeds": {str(t): spread(v) for t, v in by_threads.items()},
            "range_over_threads": {str(s): spread(v) for s, v in by_seed.items()},
            "range": spread(values),
            "within_bound": spread(values) <= BOUND}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4", help="training seeds, comma-separated")
    parser.add_argument("--threads", default="1,2", help="OMP_NUM_THREADS values, comma-separated")
    parser.add_argument("--work", default="bench/.work/mainjob_spread", help="shards and runs (removed per run)")
    parser.add_argument("--name", default="mainjob_spread", help="results/<name>.json")
    parser.add_argument("--image-vit", default="",
                        help="this image ViT folder instead of the main job's (a run measured with it is reused)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep finished runs whose config is unchanged (only what changed trains again)")
    parser.add_argument("--combine", default="",
                        help="results names, comma-separated (e.g. two halves run at once): one summary of their runs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--vit", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    if args.combine:
        from _common import RESULTS
        parts = [json.loads((RESULTS / f"{name}.json").read_text()) for name in args.combine.split(",")]
        results = [r for part in parts for r in part["runs"]]
        summary = summarise(results)
        save(args.name, {**{k: v for k, v in parts[0].items() if k not in ("command", "machine")},
                         "parts": [{"command": p["command"], "machine": p["machine"]} for p in parts],
                         "summary": summary, "runs": results})
        print(json.dumps(summary, indent=1))
        return

    import logging

    from sfa_vivit.data.prep import PrepOptions, prepare
    from sfa_vivit.kubeflow.runner import local_inputs
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    start = time.perf_counter()
    data_options, arguments, paths, vit_dir = local_inputs("default")
    vit_dir = Path(args.image_vit) if args.image_vit else vit_dir
    work = Path(args.work)
    shards = work / f"shards-{Path(paths['videos']).parent.name}"
    if not (shards / "manifest.json").exists():
        prepare("synthetic", [paths["train"], paths["validation"]], paths["videos"], str(shards),
                options=PrepOptions(fps=arguments["fps"], short_side=arguments["short_side"],
                                    shard_size=arguments["shard_size"]), progress=True)
    results = []
    combos = [(int(t), int(s)) for t in args.threads.split(",") for s in args.seeds.split(",")]
    for k, (threads, seed) in enumerate(combos, 1):
        out = work / f"t{threads}-s{seed}"
        if not args.reuse:
            shutil.rmtree(out, ignore_errors=True)
        logging.info("run %d of %d: OMP_NUM_THREADS=%d seed %d", k, len(combos), threads, seed)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        done = subprocess.run([sys.executable, __file__, "--worker", "--seed", str(seed), "--data", str(shards),
                               "--vit", str(vit_dir), "--out", str(out)], env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            sys.exit(f"run OMP_NUM_THREADS={threads} seed {seed} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
        logging.info("%s", results[-1])
    summary = summarise(results)
    save(args.name, {"what": "the main job's SFA and baseline top-1 over training seeds and thread counts",
                     "bound_points": BOUND, "data": data_options, "validation_clips": data_options["num_val"],
                     "arguments": {k: v for k, v in arguments.items() if "membench" not in k},
                     "summary": summary, "runs": results, "wall_time_s": round(time.perf_counter() - start, 1)})
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
