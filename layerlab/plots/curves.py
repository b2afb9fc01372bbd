"""Robust-overfitting curves across runs (CURE Fig. 4, 5c; RWP Fig. 1a) from ``curves.csv`` and
``overfitting.csv`` only."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator

from layerlab.plots.style import new_figure, save

PANELS = (("test", "robust_acc", "test robust accuracy (%)"), ("test", "natural_acc", "test natural accuracy (%)"),
          ("train", "acc", "training accuracy (%)"))


def plot_curves(curves_csv: str | Path, overfitting_csv: str | Path | None, path: str | Path) -> Path:
    """Three panels (test robust, test natural, training accuracy) with one line per run; the test robust panel
    also shows the validation robust accuracy (dashed) and marks each run's best epoch."""
    df = pd.read_csv(curves_csv)
    if df.empty:
        raise ValueError(f"{curves_csv} has no rows")
    best = pd.read_csv(overfitting_csv) if overfitting_csv is not None else pd.DataFrame()
    run_names = list(dict.fromkeys(df["run"]))
    colours = dict(zip(run_names, sns.color_palette("colorblind", len(run_names))))
    fig, axes = new_figure(ncols=len(PANELS), width=4.5, height=3.6)
    for ax, (split, metric, label) in zip(axes[0], PANELS):
        for run in run_names:
            line = df[(df["run"] == run) & (df["split"] == split) & (df["metric"] == metric)].sort_values("epoch")
            ax.plot(line["epoch"], line["value"], color=colours[run], label=run)
            if (split, metric) == ("test", "robust_acc"):
                val = df[(df["run"] == run) & (df["split"] == "val") & (df["metric"] == metric)].sort_values("epoch")
                ax.plot(val["epoch"], val["value"], color=colours[run], linestyle="--", linewidth=1)
                row = best[best["run"] == run] if not best.empty else best
                if not row.empty:
                    r = row.iloc[0]
                    ax.plot([r["best_epoch"]], [r["best_rob"]], marker="*", markersize=11, color=colours[run],
                            linestyle="none")
        ax.set(xlabel="epoch", ylabel=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].set_title("robust (solid test, dashed val, ★ best)")
    axes[0, 1].set_title("natural (test)")
    axes[0, 2].set_title("training")
    axes[0, 0].legend(fontsize="x-small")
    return save(fig, path)
