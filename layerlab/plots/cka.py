"""CKA heatmap (CURE Fig. 3, 12) drawn only from a ``cka.json`` written by :mod:`layerlab.analysis.cka`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
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


def plot_cka(json_path: str | Path, png_path: str | Path) -> Path:
    """Heatmap of the CKA matrix in ``json_path`` (rows: ``rows``, columns: ``cols``; null = NaN)."""
    data = json.loads(Path(json_path).read_text())
    matrix = np.array([[np.nan if v is None else v for v in row] for row in data["matrix"]], dtype=float)
    frame = pd.DataFrame(matrix, index=data["rows"], columns=data["cols"])
    side = max(len(data["rows"]), len(data["cols"]))
    size = max(3.5, 0.45 * side + 1.5)
    fig, axes = new_figure(width=size + 1.0, height=size)
    ax = axes[0, 0]
    sns.heatmap(frame, ax=ax, vmin=0.0, vmax=1.0, cmap=HEATMAP_CMAP, square=True,
                annot=side <= ANNOTATE_MAX, fmt=".2f", annot_kws={"fontsize": 7},
                cbar_kws={"label": "linear CKA"})
    ax.grid(False)
    ax.set_ylabel(data.get("row_label", "rows"))
    ax.set_xlabel(data.get("col_label", "columns"))
    ax.set_title(_title(data))
    ax.tick_params(axis="x", rotation=90)
    ax.tick_params(axis="y", rotation=0)
    return save(fig, png_path)
