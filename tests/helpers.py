"""Shared by the trainer, cache, evaluation, DDP and MLflow tests: the tiny recipe and small utilities."""

import socket
from pathlib import Path

from sfa_vivit import checkpoints
from sfa_vivit.train import resolve
from sfa_vivit.train.config import tiny_sets

TINY = [*tiny_sets(), "final_eval_views=1x1"]


def config(mode, *extra, epochs=1, frames=4):
    return resolve(mode, "synthetic", sets=[*TINY, f"epochs={epochs}", f"num_frames={frames}", *extra])


def final_state(out):
    return checkpoints.load(Path(out) / "model").model.state_dict()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
