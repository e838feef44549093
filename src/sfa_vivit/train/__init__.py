"""Training: one Trainer for baseline, SFA stage 1, SFA stage 2 and the ablations; `run_config` assembles a
run's config (recipe, mode, --init, config file, --set) as `sfa train` does."""

from sfa_vivit.train.config import RECIPES, TrainConfig, resolve
from sfa_vivit.train.start import TrainError, run_config
from sfa_vivit.train.trainer import NonFiniteLoss, Preempted, Trainer, train

__all__ = ["RECIPES", "TrainConfig", "resolve", "run_config", "Trainer", "train", "TrainError", "Preempted",
           "NonFiniteLoss"]
