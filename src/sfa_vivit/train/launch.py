"""Start a training run in this process, or in `nproc` processes under torchrun, from a resolved config.

The multi-process path hands the workers the resolved `TrainConfig` itself (as JSON, through a file)
and runs this module's `main` in each of them: no command line is rebuilt, so what the caller resolved
is exactly what every rank trains. Rank 0 writes the run's outputs; the caller reads its metrics.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
from typing import Any

from sfa_vivit import runtime
from sfa_vivit.storage import join, open_url
from sfa_vivit.train.config import TrainConfig, validate
from sfa_vivit.train.tracking import TrackingTarget
from sfa_vivit.train.trainer import train


def run(config: TrainConfig, data: str, out: str, init: str | None = None, *,
        tracking: TrackingTarget = TrackingTarget(), nproc: int = 1) -> dict[str, Any]:
    """Train `config` on `data` into `out`; nproc > 1 starts that many ranks on this node with torchrun.
    Returns the run's metrics. Raises subprocess.CalledProcessError when a rank fails."""
    if nproc <= 1:
        return train(config, data, out, init, tracking=tracking)
    spec = {"config": config.to_dict(), "data": data, "out": out, "init": init,
            "tracking": dataclasses.asdict(tracking)}
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="sfa-train-", delete=False) as f:
        json.dump(spec, f)
    try:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                        "-m", "sfa_vivit.train.launch", f.name], check=True)
    finally:
        os.unlink(f.name)
    with open_url(join(out, "metrics.json"), "rb") as metrics:
        return json.load(metrics)


def main(argv: list[str]) -> None:
    """One rank: train the run described by the JSON file argv[0] (written by `run`)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with open(argv[0]) as f:
        spec = json.load(f)
    config = TrainConfig(**spec["config"])
    validate(config)
    try:
        train(config, spec["data"], spec["out"], spec["init"], tracking=TrackingTarget(**spec["tracking"]))
    finally:
        runtime.close()


if __name__ == "__main__":
    main(sys.argv[1:])
