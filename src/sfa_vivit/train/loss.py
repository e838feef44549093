"""The training loss: label-smoothed soft targets (several heads concatenated), cross-entropy against them,
and the watch that keeps the losses on the device between reads (a step never waits for the host)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from sfa_vivit.core import runtime
from sfa_vivit.data.augment import one_hot


def soft_targets(labels: Any, num_classes: int | dict[str, int], smoothing: float) -> torch.Tensor:
    """Label-smoothed one-hot targets (B, total classes), several heads concatenated in order."""
    if isinstance(num_classes, dict):
        return torch.cat([one_hot(labels[h], k, smoothing) for h, k in num_classes.items()], dim=-1)
    return one_hot(labels, num_classes, smoothing)


def soft_target_loss(out: Any, targets: torch.Tensor, num_classes: int | dict[str, int]) -> torch.Tensor:
    """Cross-entropy against soft targets, summed over heads (fp32 whatever the autocast)."""
    logits = torch.cat(list(out.values()), dim=-1) if isinstance(out, dict) else out
    sizes = list(num_classes.values()) if isinstance(num_classes, dict) else [num_classes]
    loss = 0.0
    for lg, tg in zip(logits.float().split(sizes, dim=-1), targets.split(sizes, dim=-1)):
        loss = loss + (-(tg * F.log_softmax(lg, dim=-1)).sum(-1)).mean()
    return loss


@dataclasses.dataclass
class LossRead:
    total: float          # the sum of the losses read
    last: float           # the last step's loss
    bad: bool             # one of them was not finite
    first_step: int       # the step of the first of them


class LossWatch:
    """The training losses kept on the device between reads, so that a step never waits for the host.
    A read leaves zeroed sums behind that the device has computed (buffers, like the sums of any step,
    not constants of the next step's graph), so every step after the first has the same graph."""

    def __init__(self, rt: runtime.Runtime) -> None:
        self.rt = rt
        self.sum: torch.Tensor | None = None
        self.last: torch.Tensor | None = None
        self.bad: torch.Tensor | None = None
        self.first_step: int | None = None

    def add(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach().float()
        if self.sum is None:
            self.sum, self.bad = torch.zeros_like(loss), torch.zeros_like(loss)
        if self.first_step is None:
            self.first_step = step
        self.sum = self.sum + loss
        self.bad = torch.maximum(self.bad, (~torch.isfinite(loss)).float())
        self.last = loss

    def read(self) -> LossRead | None:
        """The losses since the last read (None when there were none); empties the watch."""
        if self.first_step is None:
            return None
        total, last, bad = torch.stack([self.sum, self.last, self.bad]).cpu().tolist()
        read = LossRead(total, last, bad > 0, self.first_step)
        self.sum, self.bad = torch.zeros_like(self.sum), torch.zeros_like(self.bad)
        self.rt.step()
        self.first_step = None
        return read

    def read_all(self, rt: runtime.Runtime) -> tuple[LossRead | None, bool]:
        """`read()`, and whether a loss since the last read was not finite on any rank (one collective)."""
        read = self.read()
        bad = rt.all_reduce(torch.tensor([0.0 if read is None else float(read.bad)]), "max")
        return read, bool(bad.item() > 0)
