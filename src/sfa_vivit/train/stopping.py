"""Stopping a run between two steps: SIGTERM (a preempted pod) and Ctrl-C are caught, the step in flight
finishes, a checkpoint is committed, and the run raises `Preempted` with the exit code that says what came
(143 after SIGTERM, which Kubernetes and KFP retry; 130 after Ctrl-C). Every rank stops at the same step."""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any, Callable, Iterator, NamedTuple

import torch

from sfa_vivit.core.runtime import Runtime

log = logging.getLogger("sfa_vivit.train.trainer")

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: the pod did not finish; Kubernetes/KFP retry it


class Preempted(RuntimeError):
    """SIGTERM (or Ctrl-C) arrived; a checkpoint was committed and the run stopped. Start it again to resume.
    `exit_code`: 143 after SIGTERM (Kubernetes and KFP retry the pod), 130 after Ctrl-C."""

    def __init__(self, message: str, exit_code: int = PREEMPTED_EXIT_CODE):
        super().__init__(message)
        self.exit_code = exit_code


class StepFlags(NamedTuple):
    """The per-step decision every rank takes together (`StopSignals.flags`)."""
    stop: bool          # a rank got SIGTERM or Ctrl-C
    checkpoint: bool    # checkpoint_every_minutes have passed since the last commit
    line: bool          # a progress line is due (a log goes no longer than LOG_INTERVAL_S without one)


class StopSignals:
    """The signals that stop a run, caught while it trains (`with StopSignals() as stops:`), and the
    per-step decision every rank takes together (`flags`)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._said = False
        self._previous: dict[int, Any] = {}
        self.committed_at = time.monotonic()   # the last checkpoint commit (or the start)
        self.line_at = time.monotonic()        # the last progress line (or the start)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        """SIGTERM or Ctrl-C: finish this step, commit a checkpoint, stop. A second Ctrl-C stops at once."""
        # No logging here: a handler runs between two bytecodes of the main thread, maybe inside a log handler's
        # write, and a re-entered write fails. The step loop says it (`flags`), at the end of this step.
        self.signum = self.signum or signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __bool__(self) -> bool:
        return self.signum is not None

    def preempted(self, where: str, then: str) -> Preempted:
        """The exception that ends the run: what arrived, `where` it stopped, `then` what to do."""
        ctrl_c = self.signum == signal.SIGINT
        return Preempted(f"{'interrupted (Ctrl-C)' if ctrl_c else 'SIGTERM'} {where}; {then}",
                         130 if ctrl_c else PREEMPTED_EXIT_CODE)

    def flags(self, rt: Runtime, checkpoint_every_minutes: float, line_every_s: float = 0.0) -> StepFlags:
        """What to do at the end of a step, the same on every rank (one collective for all three): stop when any
        rank got a signal; a checkpoint is due when `checkpoint_every_minutes` have passed on any rank since the
        last commit (a preemption then loses minutes, not an epoch); a progress line is due when `line_every_s`
        have passed since the last one (`said_line`), so that a slow step never leaves a log silent."""
        if self.signum and not self._said:
            self._said = True
            log.warning("%s: checkpointing at the end of this step, then stopping%s",
                        "Ctrl-C" if self.signum == signal.SIGINT else "SIGTERM",
                        " (Ctrl-C again to stop without it)" if self.signum == signal.SIGINT else "")
        now = time.monotonic()
        minutes = checkpoint_every_minutes
        due = bool(minutes) and now - self.committed_at >= minutes * 60
        line = bool(line_every_s) and now - self.line_at >= line_every_s
        flags = rt.all_reduce(torch.tensor([float(bool(self.signum)), float(due), float(line)]), "max")
        return StepFlags(*(bool(v) for v in flags.tolist()))   # one host sync for all three

    def said_line(self) -> None:
        """A progress line was printed now."""
        self.line_at = time.monotonic()

    def batches(self, loader: Any, on_stop: Callable[[], None]) -> Iterator[Any]:
        """The loader's batches; when a stop signal has arrived and the loader fails (its workers, signalled
        with the whole process group, are gone), `on_stop()` stops the run there, between steps."""
        batches = iter(loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except RuntimeError:
                if not self.signum:
                    raise
                on_stop()
                return
            yield batch
