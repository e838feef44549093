"""Checkpoints of ViViT models, and the run folders that hold them.

ViViT checkpoints (`save`/`load`): a folder at any fsspec URL holding ``model.safetensors``,
``config.json`` (model config + caller's ``extra``) and a ``COMMITTED`` marker written last, which
names those files and records their sha256. A folder without the marker is never loaded; loading
never unpickles. A re-save writes changed files under new names before the marker switches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, NamedTuple

import safetensors.torch
import torch

from sfa_vivit.core.storage import join, url_to_fs, write_bytes_atomic
from sfa_vivit.models.vivit import ViViT, ViViTConfig

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MARKER_FILE = "COMMITTED"
STATE_FILE = "state.safetensors"
CHECKPOINT_FORMAT = "sfa-vivit/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: wrong format, missing files, tensors that do not fit."""


# ----------------------------------------------------------------------------------------------
# ViViT checkpoints
# ----------------------------------------------------------------------------------------------

class LoadedCheckpoint(NamedTuple):
    model: ViViT
    extra: dict[str, Any]


def save(model: ViViT, url: str | os.PathLike, *, extra: dict[str, Any] | None = None,
         state: dict[str, torch.Tensor] | None = None) -> str:
    """Write model weights (safetensors), its config and `extra` (JSON) to the folder `url`, and
    optionally more tensors `state` (e.g. optimizer buffers) as state.safetensors.

    Write the new, then switch: every file is written whole (temporary name + rename on local disks;
    single-object uploads on object stores), then the COMMITTED marker, which names the files and holds
    their sha256, is replaced in one write. Over a committed checkpoint, files whose bytes change are
    written under new names (``model.<sha>.safetensors``) so that the committed ones stay intact until
    the marker switches; files the new marker does not name are removed afterwards. A crash or a full
    disk at any point leaves the previous committed checkpoint (or none) loadable, never a torn one.
    Returns the URL. Raises ValueError if `extra` is not JSON-serialisable (before anything is written).
    """
    url = os.fspath(url)
    payload = {"format": CHECKPOINT_FORMAT, "model": model.config.to_dict(), "extra": extra or {}}
    try:
        config_bytes = json.dumps(payload, indent=2, sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint extra for {url} is not JSON-serialisable: {e}") from e
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    blobs = {WEIGHTS_FILE: safetensors.torch.save(weights, metadata={"format": "pt"}), CONFIG_FILE: config_bytes}
    if state is not None:
        blobs[STATE_FILE] = safetensors.torch.save({k: v.detach().to("cpu").contiguous() for k, v in state.items()})

    fs, path = url_to_fs(url)
    fs.makedirs(path, exist_ok=True)
    try:
        current = _marker(fs, path) or {}
    except (ValueError, UnicodeDecodeError):     # a damaged marker commits nothing: write afresh
        current = {}
    if not isinstance(current, dict):
        current = {}
    committed = {_part(name): (name, sha) for name, sha in current.items()}
    marker: dict[str, str] = {}
    for part, blob in blobs.items():
        sha = hashlib.sha256(blob).hexdigest()
        if committed.get(part, (None, None))[1] == sha:      # the same bytes are committed already
            marker[committed[part][0]] = sha
            continue
        name = part if part not in current else _versioned(part, sha)
        write_bytes_atomic(join(url, name), blob)
        marker[name] = sha
    write_bytes_atomic(join(url, MARKER_FILE), json.dumps(marker, indent=2).encode())
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name != MARKER_FILE and name not in marker and _part(name) in (WEIGHTS_FILE, CONFIG_FILE, STATE_FILE):
            fs.rm_file(entry)
    return url


def _versioned(part: str, sha: str) -> str:
    """`model.safetensors` → `model.<sha[:16]>.safetensors`: the name of a replacement file."""
    stem, ext = part.split(".", 1)
    return f"{stem}.{sha[:16]}.{ext}"


def _part(name: str) -> str:
    """Which file of a checkpoint `name` is (`model.<sha>.safetensors` → `model.safetensors`); also
    leftover temporary files (`<name>.tmp-<id>`) map to their part."""
    name = name.split(".tmp-", 1)[0]
    pieces = name.split(".")
    return f"{pieces[0]}.{pieces[-1]}" if len(pieces) == 3 else name


def _marker(fs, path: str) -> dict[str, str] | None:
    """The COMMITTED marker's {file name: sha256}, or None when the folder has none."""
    try:
        return json.loads(fs.cat_file(join(path, MARKER_FILE)))
    except FileNotFoundError:
        return None


def is_committed(url: str | os.PathLike) -> bool:
    """Whether `url` holds a checkpoint whose write completed."""
    fs, path = url_to_fs(os.fspath(url))
    return fs.exists(join(path, MARKER_FILE))


def committed_ancestor(url: str | os.PathLike) -> str | None:
    """`url` itself or the nearest folder above it that holds a committed checkpoint, or None: a run must
    not write into a checkpoint (it would change the files the COMMITTED marker vouches for)."""
    fs, path = url_to_fs(os.fspath(url))
    path = path.rstrip("/")
    while path and path not in ("/", "."):
        if fs.exists(join(path, MARKER_FILE)):
            return path
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent == path:
            break
        path = parent
    return None


def load(url: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load a checkpoint written by `save`: returns (model, extra).

    Raises CheckpointError when the folder has no COMMITTED marker, a file does not match its
    recorded sha256, or the weights do not fit the recorded config.
    """
    url = os.fspath(url)
    blobs = _read_committed(url, (WEIGHTS_FILE, CONFIG_FILE))
    payload = json.loads(blobs[CONFIG_FILE])
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {url}: format {payload.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    model = ViViT(ViViTConfig.from_dict(payload["model"]))
    state = safetensors.torch.load(blobs[WEIGHTS_FILE])
    load_state_dict_checked(model, state, source=url)
    return LoadedCheckpoint(model.to(map_location), payload.get("extra", {}))


def read_config(url: str | os.PathLike) -> dict[str, Any]:
    """A committed checkpoint's config.json without its weights: {'format', 'model', 'extra'} (checked
    against the marker's sha256)."""
    return json.loads(_read_committed(os.fspath(url), (CONFIG_FILE,))[CONFIG_FILE])


def load_state(url: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The extra tensors saved with `save(..., state=...)` (empty if none were)."""
    url = os.fspath(url)
    blobs = _read_committed(url, (STATE_FILE,), optional=True)
    return dict(safetensors.torch.load(blobs[STATE_FILE])) if STATE_FILE in blobs else {}


def _read_committed(url: str, names: tuple[str, ...], optional: bool = False) -> dict[str, bytes]:
    """Read files of a committed checkpoint, each checked against the sha256 in its marker."""
    fs, path = url_to_fs(url)
    try:
        digests = _marker(fs, path)
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {url}: {MARKER_FILE} is not readable JSON (the file was damaged)") from None
    if digests is None:
        raise CheckpointError(f"no committed checkpoint at {url}: {MARKER_FILE} is missing "
                              "(the write was interrupted, or this is not an sfa-vivit checkpoint)")
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise CheckpointError(f"checkpoint {url}: {MARKER_FILE} is not an sfa-vivit commit marker")
    files = {_part(name): name for name in digests}
    blobs = {}
    for part in names:
        if optional and part not in files:
            continue
        name = files.get(part, part)
        try:
            blobs[part] = fs.cat_file(join(path, name))
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {url}: {name} is missing") from None
        if hashlib.sha256(blobs[part]).hexdigest() != digests.get(name):
            raise CheckpointError(f"checkpoint {url}: {name} does not match the sha256 recorded in {MARKER_FILE} "
                                  "(the file was changed or damaged after it was written)")
    return blobs


def load_state_dict_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """load_state_dict(strict) with errors that name the tensor and both shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{source}: tensors do not match the model: missing {missing[:6]}, "
                              f"unexpected {unexpected[:6]}")
    for key, value in state.items():
        check_shape(source, key, tuple(value.shape), tuple(own[key].shape))
    model.load_state_dict(state)


def check_shape(source: str, name: str, got: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if got != expected:
        raise CheckpointError(f"{source}: tensor {name} has shape {got} in the checkpoint but the model "
                              f"needs {expected}; build the model with the checkpoint's sizes")


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's tensors keyed `optimizer.<parameter name>.<buffer>` (independent of parameter order,
    for `save(state=...)`) and its per-group learning rates (for `extra`)."""
    tensors = {f"optimizer.{name}.{buffer}": value for name, p in model.named_parameters()
               for buffer, value in optimizer.state.get(p, {}).items() if torch.is_tensor(value)}
    return tensors, {"param_groups": [{"lr": g["lr"]} for g in optimizer.param_groups]}


def restore_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, torch.Tensor],
                      saved: dict[str, Any]) -> None:
    """Put what `optimizer_state` returned back into `optimizer` (on the parameters' devices)."""
    for group, stored in zip(optimizer.param_groups, saved["param_groups"]):
        group["lr"] = stored["lr"]
    params = dict(model.named_parameters())
    for key, tensor in state.items():
        name, buffer = key[len("optimizer."):].rsplit(".", 1)
        optimizer.state[params[name]][buffer] = tensor.to(params[name].device)


# ----------------------------------------------------------------------------------------------
# Run folders: <run>/checkpoints/step-NNNNNNNN (rotated) and <run>/model (the final model)
# ----------------------------------------------------------------------------------------------

RUN_CHECKPOINTS = "checkpoints"
FINAL_MODEL = "model"


def step_url(run: str, step: int) -> str:
    """Where a run keeps its checkpoint of `step`."""
    return join(run, RUN_CHECKPOINTS, f"step-{step:08d}")


def committed_steps(run: str) -> list[str]:
    """URLs of the run's committed step checkpoints, oldest first (uncommitted folders are skipped)."""
    fs, path = url_to_fs(join(run, RUN_CHECKPOINTS))
    if not fs.exists(path):
        return []
    names = sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False))
    urls = [join(run, RUN_CHECKPOINTS, n) for n in names if n.startswith("step-")]
    return [u for u in urls if is_committed(u)]


def latest_step(run: str) -> str | None:
    """The run's last committed step checkpoint, or None when it has none (a new run)."""
    steps = committed_steps(run)
    return steps[-1] if steps else None


def prune_steps(run: str, keep: int) -> None:
    """Delete all but the run's `keep` newest committed step checkpoints. Each is uncommitted before its
    files go, so an interrupted prune never leaves a half-deleted folder that passes for valid."""
    for url in committed_steps(run)[:-keep]:
        fs, path = url_to_fs(url)
        fs.rm(join(path, MARKER_FILE))
        fs.rm(path, recursive=True)


def copy_committed(src: str, dst: str) -> str:
    """Copy the committed checkpoint at `src` (or the final model of the run folder `src`) to the folder
    `dst`, its COMMITTED marker last: a copy cut off midway is not a checkpoint, and copying again completes
    it. Within one object store the copies are server-side. Returns `dst`."""
    src = resolve_model(src)
    sfs, spath = url_to_fs(src)
    dfs, dpath = url_to_fs(dst)
    marker = _marker(sfs, spath)
    if marker is None:
        raise CheckpointError(f"{src}: no COMMITTED marker")
    dfs.makedirs(dpath, exist_ok=True)
    try:                               # a copy over a committed one (a retry): uncommitted until it is whole
        dfs.rm_file(join(dpath, MARKER_FILE))
    except FileNotFoundError:
        pass
    for name in marker:
        if type(sfs) is type(dfs):
            sfs.copy(join(spath, name), join(dpath, name))
        else:
            dfs.pipe_file(join(dpath, name), sfs.cat_file(join(spath, name)))
    write_bytes_atomic(join(dst, MARKER_FILE), sfs.cat_file(join(spath, MARKER_FILE)))
    return dst


def resolve_model(url: str) -> str:
    """A committed checkpoint at `url`, or the final model of the run folder `url` (what `--init` and
    `sfa evaluate` accept). Raises CheckpointError when neither is there."""
    if is_committed(url):
        return url
    if is_committed(join(url, FINAL_MODEL)):
        return join(url, FINAL_MODEL)
    raise CheckpointError(f"{url}: no committed checkpoint there or at {join(url, FINAL_MODEL)}")
