"""The optimizer and its schedule: the peak learning rate after the batch-size rule, SGD (the paper's) or
AdamW over the trainable parameters, and linear warm-up then cosine decay per step."""

from __future__ import annotations

import math

import torch

from sfa_vivit.models.vivit import ViViT
from sfa_vivit.train.config import TrainConfig


def learning_rate(c: TrainConfig) -> float:
    """Peak learning rate after the batch-size scaling rule."""
    return c.base_lr * (c.batch_size / c.reference_batch_size if c.lr_scaling == "linear" else 1.0)


def make_optimizer(c: TrainConfig, model: ViViT) -> torch.optim.Optimizer:
    """The optimizer of `model`'s trainable parameters at the peak learning rate (the schedule scales it
    per step). SGD with momentum is the paper's; AdamW (beta1 = `momentum`, decoupled `weight_decay`) is
    for training a small model from scratch, where SGD waits at chance for a seed-dependent number of
    epochs. With weight decay on and exempt_from_decay='model', the model's `no_weight_decay()` set
    (norms, biases, position embeddings, CLS tokens) forms a second group without decay, as timm and
    nanoGPT do; the paper's recipes use no weight decay, so for them both settings are the same."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if c.weight_decay > 0 and c.exempt_from_decay == "model":
        exempt = model.no_weight_decay()
        groups = [{"params": [p for n, p in named if n not in exempt], "weight_decay": c.weight_decay},
                  {"params": [p for n, p in named if n in exempt], "weight_decay": 0.0}]
    else:
        groups = [{"params": [p for _, p in named], "weight_decay": c.weight_decay}]
    if c.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=learning_rate(c), betas=(c.momentum, 0.999))
    return torch.optim.SGD(groups, lr=learning_rate(c), momentum=c.momentum)


def learning_rate_at(c: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The schedule: linear warm-up over warmup_epochs, then cosine to zero at the last step."""
    peak = learning_rate(c)
    warmup = c.warmup_epochs * steps_per_epoch
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, c.epochs * steps_per_epoch - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
