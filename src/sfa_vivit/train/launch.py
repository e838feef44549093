"""Start a training run in this process, or in `nproc` processes under torchrun, from a resolved config.

The multi-process path hands the workers the resolved `TrainConfig` itself (as JSON, through a file
or `--spec-json`) and runs this module's `main` in each of them: no command line is rebuilt, so what
the caller resolved is exactly what every rank trains. Rank 0 writes the run's outputs; the caller
reads its metrics.json.

On several nodes the engine starts one launcher per node and torchrun forms one job of them through
its c10d/static rendezvous:

- Kubeflow Trainer (the `torch-distributed` runtime) runs the TrainJob's command,
  `torchrun -m sfa_vivit.train.launch --spec-json ...`, with PET_NNODES, PET_NPROC_PER_NODE,
  PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT set; torchrun reads them itself.
- Vertex AI custom jobs with worker pools set CLUSTER_SPEC (the chief in workerpool0, the other nodes
  in workerpool1; https://cloud.google.com/vertex-ai/docs/training/distributed-training); `node_args`
  turns it into torchrun's --nnodes/--node_rank/--master_addr/--master_port (`python -m
  sfa_vivit.train.launch node --nproc N --spec-json ...`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from typing import Any

from sfa_vivit.core import runtime
from sfa_vivit.core.storage import join, open_url
from sfa_vivit.train.config import TrainConfig, validate
from sfa_vivit.train.tracking import TrackingTarget
from sfa_vivit.train.trainer import train


def run(config: TrainConfig, data: str, out: str, init: str | None = None, *,
        tracking: TrackingTarget = TrackingTarget(), nproc: int = 1) -> dict[str, Any]:
    """Train `config` on `data` into `out`; nproc > 1 starts that many ranks on this node with torchrun.
    Returns the run's metrics. Raises subprocess.CalledProcessError when a rank fails."""
    if nproc <= 1:
        return train(config, data, out, init, tracking=tracking)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                    *rank_args(spec_of(config, data, out, init, tracking=tracking))], check=True)
    with open_url(join(out, "metrics.json"), "rb") as metrics:
        return json.load(metrics)


def spec_of(config: TrainConfig, data: str, out: str, init: str | None = None, *,
            tracking: TrackingTarget = TrackingTarget()) -> str:
    """The JSON every rank of a run is started with (`--spec-json`)."""
    return json.dumps({"config": config.to_dict(), "data": data, "out": out, "init": init,
                       "tracking": dataclasses.asdict(tracking)}, sort_keys=True)


def rank_args(spec_json: str) -> list[str]:
    """What torchrun (or python, one process per host on a TPU slice) runs for each rank of a run."""
    return ["-m", "sfa_vivit.train.launch", "--spec-json", spec_json]


def node_args(env: dict[str, str] | None = None) -> list[str]:
    """torchrun's multi-node arguments from the environment of a Vertex AI worker-pool job (CLUSTER_SPEC);
    [] elsewhere (Kubeflow Trainer sets PET_* variables, which torchrun reads without arguments).
    SFA_MASTER_PORT overrides the port of the chief's address."""
    env = os.environ if env is None else env
    text = env.get("CLUSTER_SPEC")
    if not text:
        return []
    try:
        spec = json.loads(text)
        pools, task = spec["cluster"], spec["task"]
        chief = pools["workerpool0"][0]
        workers = pools.get("workerpool1", [])
        rank = 0 if task["type"] == "workerpool0" else 1 + int(task["index"])
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"CLUSTER_SPEC is not a Vertex AI cluster spec ({type(e).__name__}: {e}): {text[:200]}") \
            from None
    if task["type"] not in ("workerpool0", "workerpool1"):
        raise ValueError(f"CLUSTER_SPEC task type {task['type']!r}: only workerpool0 (chief) and workerpool1 "
                         "(the other nodes) train")
    host, _, port = chief.rpartition(":")
    return [f"--nnodes={1 + len(workers)}", f"--node_rank={rank}", f"--master_addr={host}",
            f"--master_port={env.get('SFA_MASTER_PORT') or port}"]


def node(nproc: int, spec_json: str) -> int:
    """One node of a multi-node job: torchrun with `nproc` ranks here and the rendezvous the engine's
    environment describes. Returns torchrun's exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *node_args(), f"--nproc_per_node={nproc}",
           *rank_args(spec_json)]
    return subprocess.run(cmd).returncode


def main(argv: list[str]) -> None:
    """One rank: train the run described by `--spec-json JSON` (`rank_args`).
    `node --nproc N --spec-json JSON` starts the ranks of this node of a Vertex AI worker-pool job."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "node":
        nproc = int(argv[argv.index("--nproc") + 1]) if "--nproc" in argv else 1
        sys.exit(node(nproc, argv[argv.index("--spec-json") + 1]))
    if not argv or argv[0] != "--spec-json":
        sys.exit(f"usage: python -m sfa_vivit.train.launch --spec-json JSON | node --nproc N --spec-json JSON; "
                 f"got {argv}")
    spec = json.loads(argv[1])
    config = TrainConfig(**spec["config"])
    validate(config)
    try:
        train(config, spec["data"], spec["out"], spec["init"], tracking=TrackingTarget(**spec["tracking"]))
    finally:
        runtime.close()


if __name__ == "__main__":
    main(sys.argv[1:])
