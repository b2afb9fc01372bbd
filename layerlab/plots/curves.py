"""Robust-overfitting curves across runs (CURE Fig. 4, 5c; RWP Fig. 3c) from ``curves.csv`` and
``overfitting.csv`` only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator

from layerlab.plots.style import new_figure, save

PANELS = (("test", "robust_acc", "test robust accuracy (%)"), ("test", "natural_acc", "test natural accuracy (%)"),
          ("train", "acc", "training accuracy (%)"))


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p")


def draw_curves(df: pd.DataFrame, ax, split: str, metric: str, colours: dict[str, Any], *,
                with_val: bool = False) -> None:
    """One line per run of a tidy curves frame (``curves.csv``): ``split``/``metric`` against the epoch, each run
    with its own colour and marker, and with ``with_val`` the validation curve of ``metric`` dashed beside it."""
    for i, run in enumerate(colours):
        line = df[(df["run"] == run) & (df["split"] == split) & (df["metric"] == metric)].sort_values("epoch")
        ax.plot(line["epoch"], line["value"], color=colours[run], label=run, marker=MARKERS[i % len(MARKERS)],
                markersize=4)
        if with_val:
            val = df[(df["run"] == run) & (df["split"] == "val") & (df["metric"] == metric)].sort_values("epoch")
            ax.plot(val["epoch"], val["value"], color=colours[run], linestyle="--", linewidth=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def run_colours(df: pd.DataFrame) -> dict[str, Any]:
    """A colour per run of a curves frame, in order of appearance: the colour-blind-safe palette while it has
    enough colours, else evenly spaced hues (a palette cycled over more runs would repeat colours)."""
    names = list(dict.fromkeys(df["run"]))
    palette = sns.color_palette("colorblind" if len(names) <= 8 else "husl", len(names))
    return dict(zip(names, palette))


def plot_curves(curves_csv: str | Path, overfitting_csv: str | Path | None, path: str | Path,
                title: str | None = None) -> Path:
    """Three panels (test robust, test natural, training accuracy) with one line per run; the test robust panel
    also shows the validation robust accuracy (dashed) and marks each run's best epoch. The legend sits beside
    the panels; ``title`` names the figure."""
    df = pd.read_csv(curves_csv)
    if df.empty:
        raise ValueError(f"{curves_csv} has no rows")
    best = pd.read_csv(overfitting_csv) if overfitting_csv is not None else pd.DataFrame()
    colours = run_colours(df)
    fig, axes = new_figure(ncols=len(PANELS), width=4.5, height=3.6)
    for ax, (split, metric, label) in zip(axes[0], PANELS):
        robust = (split, metric) == ("test", "robust_acc")
        draw_curves(df, ax, split, metric, colours, with_val=robust)
        for run in colours if robust and not best.empty else ():
            row = best[best["run"] == run]
            if not row.empty:
                r = row.iloc[0]
                ax.plot([r["best_epoch"]], [r["best_rob"]], marker="*", markersize=11, color=colours[run],
                        linestyle="none")
        ax.set(xlabel="epoch", ylabel=label)
    axes[0, 0].set_title("robust (solid test, dashed val, ★ best)")
    axes[0, 1].set_title("natural (test)")
    axes[0, 2].set_title("training")
    axes[0, -1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title:
        fig.suptitle(title, fontsize="medium")
    return save(fig, path)
