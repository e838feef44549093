"""Where a process computes: its device, its rank among the processes of a job, bf16 autocast, peak memory.

One place for what training and evaluation both need. Ranks come from the environment that torchrun
(or an engine that starts processes the same way) sets: WORLD_SIZE, RANK, LOCAL_RANK; with more than
one process the default process group is initialised here (NCCL on CUDA, gloo on CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import resource
from typing import ContextManager

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "xla")
PRECISIONS = ("auto", "fp32", "bf16")


class RuntimeSetupError(ValueError):
    """The requested device cannot be used in this process."""


@dataclasses.dataclass
class Runtime:
    device: torch.device
    rank: int
    world: int
    autocast: ContextManager    # reusable: bf16 autocast on CUDA / XLA (by default), else a no-op

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, tracks and writes."""
        return self.rank == 0

    def peak_memory_bytes(self) -> int:
        return peak_memory_bytes(self.device)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """The reduction of `tensor` over every rank (itself for one process); op is sum, min or max. The
        reduction runs on this process's device (NCCL has no CPU tensors); use the returned tensor."""
        if self.world > 1:
            tensor = tensor.to(self.device)
            dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                                        "max": dist.ReduceOp.MAX}[op])
        return tensor

    def mark_step(self) -> None:
        """On XLA, run the lazily built graph of the step now; elsewhere nothing to do."""
        if self.device.type == "xla":
            import torch_xla.core.xla_model as xm
            xm.mark_step()


def start(device: str = "auto", precision: str = "auto") -> Runtime:
    """Resolve `device` (auto: CUDA when visible, else CPU) and join the job's process group.

    Raises RuntimeSetupError when the device is unknown or not present here."""
    if device not in DEVICES:
        raise RuntimeSetupError(f"device={device!r} is not one of {list(DEVICES)}")
    if precision not in PRECISIONS:
        raise RuntimeSetupError(f"precision={precision!r} is not one of {list(PRECISIONS)}")
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "xla":
        try:
            import torch_xla.core.xla_model as xm
        except ImportError:
            raise RuntimeSetupError(f"device=xla needs torch-xla: pip install 'torch_xla[tpu]' matching torch "
                                    f"{torch.__version__} (see the TPU container in containers/)") from None
        where = xm.xla_device()
    elif kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeSetupError("device=cuda but no CUDA device is visible")
        where = torch.device("cuda", local_rank)
        torch.cuda.set_device(where)
    else:
        where = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    bf16 = precision == "bf16" or (precision == "auto" and kind in ("cuda", "xla"))
    if bf16 and kind == "cpu":
        log.warning("bf16 autocast on CPU is slow on most CPUs; fp32 is the default there")
    autocast = torch.autocast(device_type=where.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    return Runtime(where, rank, world, autocast)


def close() -> None:
    """Under torchrun: leave together and tear the process group down, so that no rank exits while
    another still talks to the store it hosts (that ends in an abort instead of exit code 0)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA allocator peak on GPU; the process's peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
