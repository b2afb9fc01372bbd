"""The one plotting style: readable in print, colour-blind safe, same look for every figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are written to files; works headless and in CI

import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

PALETTE = "colorblind"
HEATMAP_CMAP = "magma"


def apply_style() -> None:
    """Seaborn's paper context with a white grid and the colour-blind palette."""
    sns.set_theme(context="paper", style="whitegrid", palette=PALETTE, font_scale=1.2)
    plt.rcParams.update({"figure.dpi": 120, "savefig.dpi": 200, "savefig.bbox": "tight",
                         "axes.titleweight": "bold"})


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 4.5, height: float = 3.5):
    """A styled figure with an ``nrows`` x ``ncols`` grid of axes (always a 2-D array)."""
    apply_style()
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, axes


def save(fig, path: str | Path) -> Path:
    """Write ``fig`` (PNG unless the suffix says otherwise), close it, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
