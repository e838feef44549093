"""Progress bars that read well in a terminal and in a log file.

On a terminal: tqdm as usual. Anywhere else (a pod's log, `> run.log 2>&1`, CI), tqdm's carriage returns
would make one endless line: there the bar is printed as whole lines, at most one every `LOG_INTERVAL_S`.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

LOG_INTERVAL_S = 15.0
# A bar's line in a log: no bar graphic (a third party's tqdm lines keep theirs, so the local pipeline's terminal
# can tell our progress lines from download bars: kubeflow/local_log.py).
LOG_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _Lines:
    """A file for tqdm that turns each redraw into one line."""

    def __init__(self, stream: Any):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def clock(seconds: float) -> str:
    """'1:02:03', '4:05' or '0:07': a duration as a clock reads it."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str,
        disable: bool = False, **kwargs: Any):
    """A tqdm progress bar (on stderr) that becomes whole log lines when stderr is not a terminal."""
    from tqdm import tqdm
    stream = sys.stderr
    if not disable and not stream.isatty():
        kwargs = {"mininterval": LOG_INTERVAL_S, "bar_format": LOG_FORMAT, **kwargs, "file": _Lines(stream)}
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, **kwargs)
