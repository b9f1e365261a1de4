"""Matplotlib without a display (workers and servers have none), and one way to write a figure."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def integer_ticks(ax, axis: str = "x") -> None:
    """Epochs and steps are counts: no 2.5 on their axis."""
    from matplotlib.ticker import MaxNLocator

    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))


def save(fig, path: Path) -> None:
    """Writes the figure as a PNG (creating its folder) and frees it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
