"""Training: one Trainer for baseline, SFA stage 1, SFA stage 2 and the ablations."""

from sfa_vivit.train.config import RECIPES, TrainConfig, resolve
from sfa_vivit.train.trainer import NonFiniteLoss, Preempted, Trainer, TrainError, train

__all__ = ["RECIPES", "TrainConfig", "resolve", "Trainer", "train", "TrainError", "Preempted", "NonFiniteLoss"]
