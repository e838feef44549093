"""Shared by the benchmark scripts: where results go and what machine produced them."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from importlib.metadata import version
from pathlib import Path

from sfa_vivit.core.plots import line_plot  # noqa: F401 - the benchmarks' plot helper

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "sfa_vivit": version("sfa-vivit")}
    for package in ("av", "webdataset", "pillow", "simplejpeg"):
        try:
            info[package] = version(package)
        except Exception:  # noqa: BLE001 - optional
            pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def save(name: str, result: dict) -> Path:
    """Write results/<name>.json with the command line and machine; returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
              "machine": machine(), **result}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"command: {result['command']}\nmachine: {json.dumps(result['machine'])}\nwrote {path}")
    return path


def interval95(values: list[float]) -> list[float] | None:
    """Two-sided 95% t interval of the mean of `values` (seeds are independent repeats)."""
    if len(values) < 2:
        return None
    from scipy import stats
    mean = statistics.fmean(values)
    half = float(stats.t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / len(values) ** 0.5
    return [round(mean - half, 3), round(mean + half, 3)]


def judge(ci: list[float] | None, ok) -> str:
    """'met' when all of the interval satisfies `ok`, 'not met' when none of it does, else 'undetermined'
    (the seeds cannot tell)."""
    if ci is None:
        return "undetermined"
    return "met" if ok(ci[0]) and ok(ci[1]) else "not met" if not ok(ci[0]) and not ok(ci[1]) else "undetermined"
