"""The one plotting style: readable in print, colour-blind safe, same look for every figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are written to files; works headless and in CI

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402
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


# Offsets (points) tried in turn for a point label: right-above, right-below, left-above, left-below, then
# further out; the first that overlaps no placed label and no other point wins.
_LABEL_OFFSETS = [(dx * r, dy * r) for r in (1, 2, 3, 4)
                  for dx, dy in ((5, 3), (5, -11), (-5, 3), (-5, -11), (0, 9), (0, -17))]


def place_labels(ax, xs, ys, labels, fontsize: float = 8, **kwargs):
    """Annotate the points ``(xs[i], ys[i])`` with ``labels[i]``, each at the first of a fixed list of offsets
    where its text stays inside the axes and overlaps no label placed before it and no other point (else where
    it clashes least). Deterministic; set the axis limits first. Returns the annotations."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    centres = ax.transData.transform(list(zip(xs, ys))) if len(xs) else []
    radius = 4.0 * fig.dpi / 72  # a marker's half-size in pixels
    marks = [Bbox.from_extents(x - radius, y - radius, x + radius, y + radius) for x, y in centres]
    frame = ax.get_window_extent(renderer)
    placed, out = [], []
    for i, (x, y, text) in enumerate(zip(xs, ys, labels)):
        best = None
        for dx, dy in _LABEL_OFFSETS:
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                              ha="left" if dx >= 0 else "right", va="bottom", **kwargs)
            box = ann.get_window_extent(renderer)
            clashes = sum(box.overlaps(b) for b in placed) + sum(box.overlaps(m) for j, m in enumerate(marks)
                                                                  if j != i)
            clashes += not (frame.x0 <= box.x0 and box.x1 <= frame.x1
                            and frame.y0 <= box.y0 and box.y1 <= frame.y1)
            if best is None or clashes < best[0]:
                if best is not None:
                    best[1].remove()
                best = (clashes, ann, box)
            else:
                ann.remove()
            if clashes == 0:
                break
        placed.append(best[2])
        out.append(best[1])
    return out
