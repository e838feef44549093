"""Shared by the trainer, cache, evaluation, DDP and MLflow tests: the tiny recipe and small utilities."""

import socket
from pathlib import Path

from sfa_vivit import checkpoints
from sfa_vivit.train import resolve

TINY = ["model.width=32", "model.spatial_depth=1", "model.temporal_depth=1", "model.heads=2", "model.mlp_dim=64",
        "model.patch=8", "image_size=32", "batch_size=4", "workers=0", "final_eval_views=1x1", "log_every=1"]


def config(mode, *extra, epochs=1, frames=4):
    return resolve(mode, "synthetic", sets=[*TINY, f"epochs={epochs}", f"num_frames={frames}", *extra])


def final_state(out):
    return checkpoints.load(Path(out) / "model").model.state_dict()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
