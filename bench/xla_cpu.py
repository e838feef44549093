"""Steps per second of the tiny model on torch-xla's CPU backend (SPMD over N virtual devices) against the
plain CPU, in one process, same config, seed and data. Run in the XLA environment:

    make install-xla && PJRT_DEVICE=CPU CPU_NUM_DEVICES=2 .venv-xla/bin/python bench/xla_cpu.py [--epochs 8]

What it shows: after its first epoch (compilation) the XLA path runs every step from one compiled graph
(the compilation count does not grow) and keeps up with eager CPU. What it does not show: a TPU's speed.
XLA:CPU runs the same graph a TPU would, on this machine's cores; its steps/s says nothing about a TPU,
and nothing here is presented as one. TPU hours are projected with the cost model (bench/projection.py).

Writes bench/results/xla_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, save  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--mode", default="stage1", choices=["baseline", "stage1"])
    args = parser.parse_args()
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    os.environ.setdefault("CPU_NUM_DEVICES", "2")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from sfa_vivit.core.runtime import versions
    from sfa_vivit.data.prep import PrepOptions, prepare, synth
    from sfa_vivit.train import Trainer, resolve
    from sfa_vivit.train.config import tiny_sets

    root = Path(tempfile.mkdtemp(prefix="sfa-xla-bench-"))
    paths = synth.generate(str(root / "raw"), synth.SynthOptions(num_train=24, num_val=8, num_frames=16, size=32,
                                                                 fps=16, difficulty="easy"), progress=False)
    prepare("synthetic", [paths["train"], paths["validation"]], paths["videos"], str(root / "shards"),
            options=PrepOptions(fps=16, short_side=32, shard_size=6, workers=1), progress=False)
    rows = []
    # XLA first: in a process whose autograd engine already ran a CPU backward, torch 2.9 cannot run one on
    # XLA devices registered later (an internal assert in the engine's device queues).
    for device in ("xla", "cpu"):
        sets = [*tiny_sets(), f"batch_size={args.batch_size}", "log_every=100", "eval_every=0", "precision=fp32",
                f"epochs={args.epochs}", "num_frames=4", f"device={device}", "mlflow_experiment=xla-bench"]
        start = time.perf_counter()
        m = Trainer(resolve(args.mode, "synthetic", sets=sets), str(root / "shards"), str(root / device)).fit()
        wall = time.perf_counter() - start
        steps = m["steps"] // args.epochs
        after_warmup = m["epoch_time_s"][1:]
        rows.append({"device": device, "devices": m["runtime"]["devices"], "epochs": args.epochs,
                     "steps_per_epoch": steps, "first_epoch_s": m["epoch_time_s"][0],
                     "steps_per_s": round(steps / statistics.median(after_warmup), 2),
                     "compilations_per_epoch": [h.get("xla_compilations") for h in m["history"]],
                     "wall_s": round(wall, 1)})
        print(rows[-1], flush=True)
    xla, cpu = rows
    result = {"rows": rows, "xla_over_cpu_steps_per_s": round(xla["steps_per_s"] / cpu["steps_per_s"], 3),
              "machine": {**machine(), **versions()},
              "note": "XLA:CPU, not a TPU: these steps/s say nothing about TPU speed"}
    path = save("xla_cpu", result)
    lines = ["| device | devices | steps/s after epoch 1 | first epoch (s) | compilations at each epoch end |",
             "|---|---:|---:|---:|---|"]
    lines += [f"| {r['device']} | {r['devices']} | {r['steps_per_s']} | {r['first_epoch_s']} | "
              f"{r['compilations_per_epoch'] if r['device'] == 'xla' else '-'} |" for r in rows]
    lines.append(f"\nXLA:CPU / CPU steps per second: {result['xla_over_cpu_steps_per_s']} (XLA:CPU is not a TPU)")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
