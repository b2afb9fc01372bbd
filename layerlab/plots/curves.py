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
    with its own colour and marker, and with ``with_val`` the validation curve of ``metric`` dashed beside it.
    Several rows of one run and epoch (its training seeds) are drawn as their mean with a +- std band."""
    for i, run in enumerate(colours):
        line = _mean_line(df, run, split, metric)
        ax.plot(line.index, line["mean"], color=colours[run], label=run, marker=MARKERS[i % len(MARKERS)],
                markersize=4)
        if (line["count"] > 1).any():
            ax.fill_between(line.index, line["mean"] - line["std"], line["mean"] + line["std"], color=colours[run],
                            alpha=0.18, linewidth=0)
        if with_val:
            val = _mean_line(df, run, "val", metric)
            ax.plot(val.index, val["mean"], color=colours[run], linestyle="--", linewidth=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _mean_line(df: pd.DataFrame, run: str, split: str, metric: str) -> pd.DataFrame:
    """Mean, sample std and count per epoch of one run's ``split``/``metric`` rows."""
    rows = df[(df["run"] == run) & (df["split"] == split) & (df["metric"] == metric)]
    return rows.groupby("epoch")["value"].agg(["mean", "std", "count"]).sort_index()


def run_colours(df: pd.DataFrame) -> dict[str, Any]:
    """A colour per run of a curves frame, in order of appearance: the first run (the reference: AT, SAT) black,
    the others ten distinct hues (the markers of :func:`draw_curves` tell apart runs beyond ten)."""
    names = list(dict.fromkeys(df["run"]))
    palette = sns.color_palette("colorblind" if len(names) <= 7 else "tab10", max(1, len(names) - 1))
    return {name: "black" if i == 0 else palette[(i - 1) % len(palette)] for i, name in enumerate(names)}


def plot_curves(curves_csv: str | Path, overfitting_csv: str | Path | None, path: str | Path,
                title: str | None = None, groups: dict[str, str] | None = None) -> Path:
    """Three panels (test robust, test natural, training accuracy) with one line per run; the test robust panel
    also shows the validation robust accuracy (dashed) and marks each run's best epoch. ``groups`` (run -> group,
    e.g. each training seed -> its run name) draws a group's runs as their mean with a +- std band (no best-epoch
    mark: each seed has its own). The legend sits beside the panels; ``title`` names the figure."""
    df = pd.read_csv(curves_csv)
    if df.empty:
        raise ValueError(f"{curves_csv} has no rows")
    best = pd.read_csv(overfitting_csv) if overfitting_csv is not None else pd.DataFrame()
    if groups:
        sizes = pd.Series(groups).value_counts()
        best = best[best["run"].map(lambda r: sizes.get(groups.get(r, r), 1) == 1)] if not best.empty else best
        df = df.assign(run=df["run"].map(lambda r: groups.get(r, r)))
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
        fig.suptitle(title, fontsize="medium", y=1.03)
    return save(fig, path)
