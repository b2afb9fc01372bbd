"""CKA heatmap (CURE Fig. 3, 12) drawn only from a ``cka.json`` written by :mod:`layerlab.analysis.cka`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import seaborn as sns

from layerlab.plots.style import HEATMAP_CMAP, new_figure, save

ANNOTATE_MAX = 12  # write the values into the cells when the matrix is at most this many layers a side


def _title(data: dict) -> str:
    """A short title naming the comparison, the attack and the sample size."""
    if data.get("mode") == "nat-vs-adv":
        title = "CKA: natural vs adversarial"
    else:
        title = f"CKA: {'adversarial' if data.get('adversarial') else 'natural'} inputs"
    attack = data.get("attack")
    if attack:
        title += f"\nPGD-{attack['steps']} eps={attack['eps'] * 255:.0f}/255"
    return f"{title}, n={data['n']}"


def cka_view(data: dict[str, Any], blocks: Sequence[str] = ()) -> tuple[list[str], list[str], np.ndarray]:
    """Row names, column names and the matrix of a ``cka.json`` (null = NaN), restricted to ``blocks`` (all when
    empty)."""
    keep_r = [i for i, r in enumerate(data["rows"]) if not blocks or r in blocks]
    keep_c = [j for j, c in enumerate(data["cols"]) if not blocks or c in blocks]
    full = np.array([[np.nan if v is None else v for v in row] for row in data["matrix"]], dtype=float)
    matrix = full[np.ix_(keep_r, keep_c)] if keep_r and keep_c else np.zeros((0, 0))
    return [data["rows"][i] for i in keep_r], [data["cols"][j] for j in keep_c], matrix


def draw_cka(ax, rows: Sequence[str], cols: Sequence[str], matrix: np.ndarray, *, annot: bool, fmt: str = ".2f",
             fontsize: int = 7, cbar: bool = True) -> None:
    """A CKA heatmap on ``ax`` (0 to 1, the style's heatmap colours), rows down and columns across."""
    sns.heatmap(matrix, ax=ax, vmin=0.0, vmax=1.0, cmap=HEATMAP_CMAP, square=True, annot=annot, fmt=fmt,
                annot_kws={"fontsize": fontsize}, xticklabels=list(cols), yticklabels=list(rows), cbar=cbar,
                cbar_kws={"label": "linear CKA"} if cbar else None)
    ax.grid(False)
    ax.tick_params(axis="x", rotation=90)
    ax.tick_params(axis="y", rotation=0)


def plot_cka(json_path: str | Path, png_path: str | Path, label: str | None = None) -> Path:
    """Heatmap of the CKA matrix in ``json_path`` (rows: ``rows``, columns: ``cols``; null = NaN) of model
    ``label`` (named in the title)."""
    data = json.loads(Path(json_path).read_text())
    rows, cols, matrix = cka_view(data)
    side = max(len(rows), len(cols))
    size = max(3.5, 0.45 * side + 1.5)
    fig, axes = new_figure(width=size + 1.0, height=size)
    ax = axes[0, 0]
    draw_cka(ax, rows, cols, matrix, annot=side <= ANNOTATE_MAX)
    ax.set_ylabel(data.get("row_label", "rows"))
    ax.set_xlabel(data.get("col_label", "columns"))
    ax.set_title(f"{label}: {_title(data)}" if label else _title(data))
    return save(fig, png_path)


def plot_cka_grid(json_paths: dict[str, Path], path: str | Path, title: str) -> Path:
    """CURE Fig. 3: one natural-vs-adversarial CKA heatmap per model, side by side (``label -> cka.json``)."""
    cols = min(4, len(json_paths))
    nrows = math.ceil(len(json_paths) / cols)
    fig, axes = new_figure(ncols=cols, nrows=nrows, width=3.6, height=3.4)
    for ax in axes.flat[len(json_paths):]:
        ax.axis("off")
    for ax, (label, jp) in zip(axes.flat, json_paths.items()):
        data = json.loads(Path(jp).read_text())
        rows, columns, matrix = cka_view(data)
        draw_cka(ax, rows, columns, matrix, annot=len(matrix) <= 8, fmt=".1f", fontsize=6, cbar=False)
        diag = np.nanmean(np.diag(matrix)) if matrix.shape[0] == matrix.shape[1] else np.nan
        ax.set_title(f"{label} (diag {diag:.2f})", fontsize=9)
        ax.set_xlabel("adversarial", fontsize=8)
        ax.set_ylabel("natural", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # rows of panels: keep each title clear of the tick labels above
    return save(fig, path)
