"""The local pipeline's terminal: task k of N with the elapsed time, our steps' own lines, nothing else.

kfp.local prints everything a task does to stdout: its executor input and output as JSON, KFP's own
lines, warnings about settings the local runner ignores, third-party warnings with escape codes, download
bars. All of it goes to the run's `pipeline.log`; the terminal gets a line when a task starts and ends
("[5/15] train-stage1 ...") and the lines our steps log and their progress lines, prefixed by their task. A
task that fails gets its last lines on the terminal too, so the error is never only in the file.
"""

from __future__ import annotations

import collections
import io
import json
import re
import time
from pathlib import Path
from typing import Any, TextIO

from sfa_vivit.core.progress import clock

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTED = re.compile(r"Executing task '([^']+)'")
_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
# A line our code logged inside a task (KFP's executor formats the task's log records so).
_LOGGED = re.compile(r"^\s*\[KFP Executor [^\]]* (INFO|WARNING|ERROR|CRITICAL)\]: (.*)$")
# KFP's executor's own lines, in the same format.
_JSON = ("{", "}", "[", "]", '"')
_KFP_OWN = ("Looking for component", "Loading KFP component", "Got executor_input", "Wrote executor output")
# A progress line of our own bars in a log (sfa_vivit.core.progress.LOG_FORMAT: no bar graphic, unlike a third
# party's download bars): "prep:  50% 384/768 [00:17<00:17, 21.80video/s]".
_PROGRESS = re.compile(r"^\s*([^:|\[]+): +\d+% \S+/\S+ \[")


def task_count(pipeline_spec: Any, fan_out: int, run_baseline: bool) -> int:
    """How many tasks kfp.local will execute for this pipeline: every executor task, a ParallelFor's body
    `fan_out` times, and of an If/Else the branch that runs (the one with train-baseline when the baseline runs)."""
    def count(dag: Any) -> int:
        total = 0
        for task in dag.tasks.values():
            component = pipeline_spec.components[task.component_ref.name]
            if component.WhichOneof("implementation") != "dag":
                total += 1
                continue
            if task.component_ref.name.startswith("comp-condition-branches"):
                branches = [pipeline_spec.components[t.component_ref.name].dag for t in component.dag.tasks.values()]
                chosen = [b for b in branches if ("train-baseline" in b.tasks) == run_baseline]
                total += count(chosen[0]) if chosen else max(count(b) for b in branches)
            else:
                total += count(component.dag) * (fan_out if task.WhichOneof("iterator") is not None else 1)
        return total
    return count(pipeline_spec.root.dag)


def plain(text: str) -> str:
    """`text` without terminal colour codes."""
    return _ANSI.sub("", text)


class TaskLog(io.TextIOBase):
    """A stdout for kfp.local: every line to `log`, the lines worth reading to `terminal`."""

    def __init__(self, log: TextIO, terminal: TextIO, total: int, history: dict[str, float] | None = None):
        self.log, self.terminal, self.total = log, terminal, total
        self.history = history or {}
        self.start = time.monotonic()
        self.task, self.task_start, self.started = "", 0.0, 0
        self.durations: dict[str, float] = {}
        self.recent: collections.deque[str] = collections.deque(maxlen=40)
        self.pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.log.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self._line(plain(line))
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.terminal.flush()

    def _say(self, text: str) -> None:
        self.terminal.write(text + "\n")
        self.terminal.flush()

    def _line(self, line: str) -> None:
        started, finished, logged = _STARTED.search(line), _FINISHED.search(line), _LOGGED.match(line)
        if started:
            self.task, self.task_start = started.group(1), time.monotonic()
            self.started += 1
            self.recent.clear()
            last = self.history.get(self.task)
            expect = f"; took {clock(last)} last run" if last is not None else ""
            self._say(f"[{self.started}/{self.total}] {self.task} (elapsed {clock(time.monotonic() - self.start)}"
                      f"{expect})")
        elif finished:
            took = time.monotonic() - self.task_start
            self.durations[finished.group(1)] = round(took, 1)
            if finished.group(2) != "SUCCESS":
                self._say(f"  {finished.group(1)} failed after {clock(took)}; its last lines:")
                for earlier in self.recent:
                    if earlier.strip():
                        self._say(f"  | {earlier.strip()}")
        elif not (logged and logged.group(2).startswith(_KFP_OWN)) and not line.strip().startswith(_JSON):
            self.recent.append(line)         # a failed task's tail: not KFP's lines nor its executor JSON
        if _PROGRESS.match(line):
            self._say(f"  {self.task}: {line.strip()}")
        elif logged and not logged.group(2).startswith(_KFP_OWN):
            self._say(f"  {self.task}: {logged.group(2)}" if logged.group(1) == "INFO" else
                      f"  {self.task}: {logged.group(1)} {logged.group(2)}")


def load_history(path: Path) -> dict[str, float]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def save_history(path: Path, durations: dict[str, float]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(durations, indent=1))
    except OSError:
        pass
