"""Shared by the benchmark scripts: where results go and what machine produced them."""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib.metadata import version
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "sfa_vivit": version("sfa-vivit")}
    for package in ("av", "webdataset", "pillow"):
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


def line_plot(path: Path, series: dict[str, tuple[list, list]], *, xlabel: str, ylabel: str, title: str,
              log2_x: bool = False) -> None:
    """One PNG of labelled lines (x, y), the house style of every benchmark plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if log2_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
