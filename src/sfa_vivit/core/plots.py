"""One plotting helper for every figure the project writes (benchmarks, membench, the report)."""

from __future__ import annotations

from pathlib import Path


def line_plot(path: str | Path, series: dict[str, tuple[list, list]], *, xlabel: str, ylabel: str, title: str,
              log2_x: bool = False, hlines: dict[str, float] | None = None, integer_x: bool = False) -> None:
    """A PNG of labelled lines (x, y), with optional labelled horizontal reference lines. Both axes start at
    zero (a log-scaled x excepted), so that a 7% difference is drawn as 7%; `integer_x`: whole-number x ticks
    (epochs)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    for label, y in (hlines or {}).items():
        ax.axhline(y, color="grey", linestyle="--", linewidth=1, label=label)
    if log2_x:
        ax.set_xscale("log", base=2)
    else:
        ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    if integer_x:
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
