"""Where a process computes: its device(s), its rank among the processes of a job, bf16 autocast, when the
host waits for the device, peak memory and compilations. Training, the feature-cache build, evaluation and
the memory benchmark all start here, on CPU, CUDA and XLA alike.

Processes and devices:

- CPU and CUDA: one process per device. Ranks come from the environment torchrun (or an engine that starts
  processes the same way) sets: WORLD_SIZE, RANK, LOCAL_RANK; with more than one process the default
  process group is initialised here (NCCL on CUDA, gloo on CPU) and the trainer wraps the model in DDP.
- XLA (TPU): one process per host, driving every device of the host through SPMD: the model is replicated
  over a one-axis mesh of all devices and each batch is sharded over that axis (data parallelism; XLA
  inserts the gradient all-reduce). torch-xla recommends SPMD on TPUs, it needs no launcher on one host,
  and it is what the xla test tier runs on XLA:CPU (`PJRT_DEVICE=CPU CPU_NUM_DEVICES=N`), whereas the
  multi-process launcher (`torch_xla.launch`) hangs in its first all-reduce there. On a multi-host slice
  (GKE injects TPU_WORKER_ID and TPU_WORKER_HOSTNAMES into each host's container:
  https://cloud.google.com/kubernetes-engine/docs/how-to/tpus#tpu-env-vars) there is one process per host;
  the hosts form one mesh and a gloo process group for the little they exchange on the CPU (a stop
  flag, digests); each host reads its own part of every global batch.

On XLA nothing runs until the host asks for a value or `step()` cuts the graph: `lazy` says so, and the
trainer reads losses every `log_every` steps instead of every step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import resource
import threading
from typing import Any, Callable, ContextManager, Iterable, Iterator

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "xla")
PRECISIONS = ("auto", "fp32", "bf16")
DEFAULT_MASTER_PORT = "8476"   # the control-plane port of a multi-host TPU job (SFA_MASTER_PORT overrides)


class RuntimeSetupError(ValueError):
    """The requested device cannot be used in this process."""


@dataclasses.dataclass
class Runtime:
    device: torch.device
    rank: int
    world: int
    autocast: ContextManager    # reusable: bf16 autocast on CUDA / XLA (by default), else a no-op
    devices: int = 1            # devices this process drives (XLA: every device of the host, over `mesh`)
    mesh: Any = None            # XLA SPMD: the one-axis ('data') mesh of every device of the job

    @property
    def kind(self) -> str:
        return self.device.type

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, tracks and writes."""
        return self.rank == 0

    @property
    def lazy(self) -> bool:
        """The device runs behind the host: reading a value (`.item()`) waits for every queued step."""
        return self.kind in ("cuda", "xla")

    @property
    def static_shapes(self) -> bool:
        """Every new shape is a new compiled graph (XLA): pad the last batch rather than run a short one."""
        return self.kind == "xla"

    @property
    def spmd_hosts(self) -> bool:
        """Several hosts run one SPMD program: every host must run every step (XLA with more than one rank)."""
        return self.kind == "xla" and self.world > 1

    @property
    def bf16(self) -> bool:
        return isinstance(self.autocast, torch.autocast)

    @property
    def batch_multiple(self) -> int:
        """A global batch must be a multiple of this (one share per device of the job)."""
        return self.world * self.devices

    def per_device_multiple(self, n: int) -> int:
        """`n` rounded up to a multiple of this process's devices (a batch every device gets a share of)."""
        return -(-n // self.devices) * self.devices

    def describe(self) -> str:
        where = f"{self.devices} {self.kind} devices (SPMD)" if self.devices > 1 else self.kind
        return f"{self.world} rank(s) on {where}"

    # --- moving data -------------------------------------------------------------------------
    def put(self, batch: Any) -> Any:
        """`batch` (a tensor or a dict/list of them, nested) on this process's device. On XLA every tensor
        with a batch axis is sharded over the mesh (this process's rows of the global batch)."""
        if self.kind == "xla":
            import torch_xla.core.xla_model as xm
            placed = xm.send_cpu_data_to_device(batch, self.device, _BatchSharding(self.mesh, self.world > 1))
            return placed[0] if torch.is_tensor(batch) else placed   # a lone tensor comes back in a list
        return map_tensors(batch, lambda t: t.to(self.device, non_blocking=True))

    def feed(self, batches: Iterable[Any], prefetch: int = 2) -> Iterator[Any]:
        """`batches` on the device. On XLA the transfers run in a thread ahead of the step (up to `prefetch`
        batches), so the device never waits for the host; elsewhere each batch is moved when asked for.
        An exception in the loader reaches the caller as it would have without the thread."""
        if self.kind != "xla":
            for batch in batches:
                yield self.put(batch)
            return
        yield from _prefetched(batches, self.put, prefetch)

    # --- the step ----------------------------------------------------------------------------
    def seed(self, seed: int) -> None:
        """Seed the host's and the device's generators (dropout, drop-path on XLA draw from the device's)."""
        torch.manual_seed(seed)
        if self.kind == "xla":
            import torch_xla.core.xla_model as xm
            xm.set_rng_state(seed, self.device)

    def step(self) -> None:
        """On XLA, cut the lazily built graph of the step here and run it (asynchronously); elsewhere nothing."""
        if self.kind == "xla":
            import torch_xla
            torch_xla.sync()

    def synchronize(self) -> None:
        """Wait until the device has finished what was queued (before reading a clock)."""
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.kind == "xla":
            import torch_xla
            import torch_xla.core.xla_model as xm
            torch_xla.sync()
            xm.wait_device_ops()

    def compilations(self) -> int | None:
        """Graphs XLA has compiled in this process so far (None off XLA). Flat after warm-up when every
        step has the same shapes."""
        if self.kind != "xla":
            return None
        import torch_xla.debug.metrics as met
        data = met.metric_data("CompileTime")
        return int(data[0]) if data else 0

    # --- between processes -------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """The reduction of `tensor` over every rank (itself for one process); op is sum, min or max. The
        reduction runs on this process's device with NCCL (which has no CPU tensors), on the CPU with gloo
        (CPU and XLA jobs); use the returned tensor."""
        if self.world > 1:
            tensor = tensor.to(self.device if self.kind == "cuda" else "cpu")
            dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                                        "max": dist.ReduceOp.MAX}[op])
        return tensor

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_gather_object(self, value: Any) -> list[Any]:
        if self.world == 1:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def replicas_identical(self, tensors: Iterable[torch.Tensor]) -> bool:
        """On XLA: every device holds the same bytes of each (replicated) tensor. Elsewhere one device per
        process holds one copy (compare digests across ranks for DDP)."""
        if self.kind != "xla" or self.devices == 1:
            return True
        import torch_xla
        torch_xla.sync()
        for tensor in tensors:
            shards = [data.cpu() for data, _ in torch_xla._XLAC._get_local_shards([tensor.detach()])[0]]
            if len(shards) != self.devices or any(not torch.equal(shards[0], s) for s in shards[1:]):
                return False
        return True

    def peak_memory_bytes(self) -> int:
        return peak_memory_bytes(self.device)


class _BatchSharding:
    """torch-xla's input sharding for a whole (nested) batch: every tensor's first axis over the mesh's
    'data' axis, whatever its rank; 0-d tensors replicated. `minibatch`: this host holds its rows only."""

    def __init__(self, mesh: Any, minibatch: bool):
        self.mesh, self.minibatch, self._specs = mesh, minibatch, {}

    def xla_spec(self, tensor: torch.Tensor) -> Any:
        if self.mesh is None or tensor.dim() == 0:
            return None
        if tensor.dim() not in self._specs:
            import torch_xla.distributed.spmd as xs
            self._specs[tensor.dim()] = xs.ShardingSpec(self.mesh, ("data",) + (None,) * (tensor.dim() - 1),
                                                        minibatch=self.minibatch)
        return self._specs[tensor.dim()].xla_spec(tensor)


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`value` with fn applied to every tensor in it (through dicts, lists and tuples)."""
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(v, fn) for v in value)
    return value


def pad_rows(tensor: torch.Tensor, rows: int, fill: float = 0) -> torch.Tensor:
    """`tensor` with at least `rows` rows, the missing ones `fill` (one batch shape for XLA's graphs)."""
    missing = rows - tensor.shape[0]
    return torch.cat([tensor, tensor.new_full((missing, *tensor.shape[1:]), fill)]) if missing > 0 else tensor


_DONE = object()


def _prefetched(items: Iterable[Any], fn: Callable[[Any], Any], depth: int) -> Iterator[Any]:
    """fn(item) for each item, computed by a thread up to `depth` items ahead. Stops the thread when the
    consumer stops early; re-raises the thread's exception in the consumer."""
    slots: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                slots.put(fn(item))
            slots.put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            slots.put(e)

    thread = threading.Thread(target=work, name="sfa-device-feed", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():      # unblock a producer waiting on a full queue
            try:
                slots.get(timeout=0.05)
            except queue.Empty:
                pass


def on_cpu() -> Runtime:
    """The CPU in this process's group (torch.distributed's, when initialised): fp32, nothing to start."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    return Runtime(torch.device("cpu"), rank, world, contextlib.nullcontext())


def start(device: str = "auto", precision: str = "auto", *, data_parallel: bool = True) -> Runtime:
    """Resolve `device` (auto: CUDA when visible, else CPU) and join the job's process group.
    data_parallel=False (the memory benchmark): on XLA, one device without SPMD.

    Raises RuntimeSetupError when the device is unknown or not present here."""
    if device not in DEVICES:
        raise RuntimeSetupError(f"device={device!r} is not one of {list(DEVICES)}")
    if precision not in PRECISIONS:
        raise RuntimeSetupError(f"precision={precision!r} is not one of {list(PRECISIONS)}")
    kind = resolve_device(device)
    devices, mesh = 1, None
    if kind == "xla":
        where, devices, mesh = _start_xla(data_parallel)
    elif kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeSetupError("device=cuda but no CUDA device is visible")
        where = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(where)
    else:
        where = torch.device("cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    bf16 = precision == "bf16" or (precision == "auto" and kind in ("cuda", "xla"))
    if bf16 and kind == "cpu":
        log.warning("bf16 autocast on CPU is slow on most CPUs; fp32 is the default there")
    autocast = torch.autocast(device_type=where.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    return Runtime(where, rank, world, autocast, devices, mesh)


def resolve_device(device: str) -> str:
    """`auto`: CUDA when a GPU is visible, else XLA when a PJRT device is configured (PJRT_DEVICE, as in the
    TPU image) and torch-xla is installed, else the CPU. Other names are returned as they are."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("PJRT_DEVICE"):
        import importlib.util
        if importlib.util.find_spec("torch_xla") is not None:
            return "xla"
    return "cpu"


def _start_xla(data_parallel: bool) -> tuple[torch.device, int, Any]:
    try:
        import torch_xla
        import torch_xla.runtime as xr
    except ImportError:
        raise RuntimeSetupError(f"device=xla needs torch-xla: pip install -c constraints-xla.txt torch==2.9.0 "
                                f"torch_xla==2.9.0 (this environment has torch {torch.__version__}; the TPU image "
                                "in containers/ has the pair)") from None
    if not data_parallel:
        return torch_xla.device(), 1, None
    import numpy as np
    import torch_xla.distributed.spmd as xs
    hosts_env()
    if not xr.is_spmd():
        xr.use_spmd()         # before any XLA tensor exists: every later tensor is global
    count = xr.global_runtime_device_count()
    mesh = xs.Mesh(np.arange(count), (count,), ("data",))
    return torch_xla.device(), xr.addressable_runtime_device_count(), mesh


def hosts_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """On a multi-host TPU slice: torch.distributed's variables (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) from the ones GKE injects (TPU_WORKER_ID, TPU_WORKER_HOSTNAMES), or else from those of a
    Kubeflow Trainer node (PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT), set in `env`
    (default os.environ) unless already set; returns what it set ({} on one host)."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env:
        return {}
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) < 2 and int(env.get("PET_NNODES", "1") or 1) > 1:
        values = {"RANK": env.get("PET_NODE_RANK", "0"), "WORLD_SIZE": env["PET_NNODES"],
                  "MASTER_ADDR": env.get("PET_MASTER_ADDR", "localhost"),
                  "MASTER_PORT": env.get("PET_MASTER_PORT", DEFAULT_MASTER_PORT)}
        env.update(values)
        return values
    if len(hosts) < 2:
        return {}
    try:
        worker = int(env["TPU_WORKER_ID"])
    except (KeyError, ValueError):
        raise RuntimeSetupError(f"TPU_WORKER_HOSTNAMES names {len(hosts)} hosts but TPU_WORKER_ID is "
                                f"{env.get('TPU_WORKER_ID')!r}: not a host index") from None
    values = {"RANK": str(worker), "WORLD_SIZE": str(len(hosts)), "MASTER_ADDR": hosts[0],
              "MASTER_PORT": env.get("SFA_MASTER_PORT", DEFAULT_MASTER_PORT)}
    env.update(values)
    return values


def close() -> None:
    """Under torchrun: leave together and tear the process group down, so that no rank exits while
    another still talks to the store it hosts (that ends in an abort instead of exit code 0)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA allocator peak on GPU; the device's peak on a TPU; the process's peak resident set on CPU and
    on XLA:CPU (whose devices live in the process's memory)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "xla":
        import torch_xla.core.xla_model as xm
        with contextlib.suppress(Exception):      # XLA:CPU reports no device memory
            info = xm.get_memory_info(device)
            peak = info.get("peak_bytes_used") or info.get("bytes_used")
            if peak:
                return int(peak)
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's peak resident set. VmHWM (Linux) belongs to this process image alone; ru_maxrss
    survives exec, so a child started from a large parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def versions() -> dict[str, Any]:
    """torch (and torch-xla) versions and the devices this process sees, for `sfa info` and run records."""
    found: dict[str, Any] = {"torch": torch.__version__, "cuda_devices": torch.cuda.device_count()}
    try:
        import torch_xla
    except ImportError:
        found["torch_xla"] = None
        return found
    found["torch_xla"] = torch_xla.__version__
    found["pjrt_device"] = os.environ.get("PJRT_DEVICE")
    if found["pjrt_device"]:
        import torch_xla.runtime as xr
        with contextlib.suppress(Exception):
            found["xla_devices"] = xr.global_runtime_device_count()
            found["xla_device_kind"] = xr.device_type()
    return found
