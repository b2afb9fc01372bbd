"""Figures of the named experiments (:mod:`layerlab.experiments`): every point and bar is a mean over training seeds
with the sample standard deviation as its error bar, and the number of seeds is written on the figure.

The inputs are the experiments' own tables: the per-group summary (``NAME.csv``: ``METRIC_mean``, ``METRIC_std``,
``n_seeds`` per group) and the per-epoch curves of every run (``NAME-curves.csv``).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from layerlab.plots.style import new_figure, save

LABELS = {"best_robust": "PGD-20, best checkpoint", "last_robust": "PGD-20, last checkpoint",
          "best_worst": "worst case, best checkpoint", "last_worst": "worst case, last checkpoint",
          "best_natural": "natural, best checkpoint", "last_natural": "natural, last checkpoint",
          "last_nrr": "NRR (PGD-20), last checkpoint", "last_worst_nrr": "NRR (worst case), last checkpoint"}
ACCURACY = "test accuracy (%)"


def present(table: pd.DataFrame, metrics: Sequence[str]) -> list[str]:
    """The ``metrics`` the summary table has a mean for in at least one group."""
    return [m for m in metrics if f"{m}_mean" in table and table[f"{m}_mean"].notna().any()]


def _seeds_note(table: pd.DataFrame) -> str:
    counts = sorted(set(int(n) for n in table["n_seeds"]))
    return "mean ± std over " + "/".join(map(str, counts)) + " seeds"


def draw_sweep(table: pd.DataFrame, x: str, metrics: Sequence[str], ax, xlabel: str) -> None:
    """One line per metric against the numeric column ``x``, with standard-deviation error bars."""
    part = table.sort_values(x)
    for metric in present(part, metrics):
        ax.errorbar(part[x], part[f"{metric}_mean"], yerr=part[f"{metric}_std"].fillna(0.0), marker="o", capsize=3,
                    label=LABELS.get(metric, metric))
    ax.set(xlabel=xlabel, ylabel=ACCURACY)
    ax.legend(fontsize="small", loc="best")


def plot_sweep(table: pd.DataFrame, x: str, metrics: Sequence[str], path: str | Path, *, xlabel: str,
               title: str) -> Path:
    fig, axes = new_figure(width=5.0)
    draw_sweep(table, x, metrics, axes[0, 0], xlabel)
    axes[0, 0].set_title(f"{title}\n({_seeds_note(table)})", fontsize="medium")
    return save(fig, path)


def draw_group_bars(table: pd.DataFrame, metrics: Sequence[str], ax, *, ylabel: str = ACCURACY,
                    hatched: Sequence[str] = (), hatch_label: str = "") -> None:
    """Grouped bars (one group of bars per experiment group) with standard-deviation error bars; the bars of the
    ``hatched`` groups are hatched, and ``hatch_label`` says in the legend what that marks."""
    metrics = present(table, metrics)
    x = np.arange(len(table))
    width = 0.8 / max(1, len(metrics))
    marked = [g in hatched for g in table["group"]]
    for k, metric in enumerate(metrics):
        bars = ax.bar(x + (k - (len(metrics) - 1) / 2) * width, table[f"{metric}_mean"], width=width,
                      yerr=table[f"{metric}_std"].fillna(0.0), capsize=3, label=LABELS.get(metric, metric))
        for bar, mark in zip(bars, marked):
            bar.set_hatch("//" if mark else None)
    ax.set_xticks(x)
    ax.set_xticklabels(table["group"], rotation=30, ha="right")
    ax.set(ylabel=ylabel)
    handles, _ = ax.get_legend_handles_labels()
    if any(marked):
        handles.append(Patch(facecolor="none", edgecolor="grey", hatch="//", label=hatch_label))
    ax.legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))


def plot_group_bars(table: pd.DataFrame, metrics: Sequence[str], path: str | Path, *, title: str,
                    ylabel: str = ACCURACY, hatched: Sequence[str] = (), hatch_label: str = "") -> Path:
    """:func:`draw_group_bars` under ``title`` (wrapped), with the seed counts."""
    fig, axes = new_figure(width=max(5.0, 0.9 * len(table) + 2.0))
    draw_group_bars(table, metrics, axes[0, 0], ylabel=ylabel, hatched=hatched, hatch_label=hatch_label)
    axes[0, 0].set_title(f"{textwrap.fill(title, 70)}\n({_seeds_note(table)})", fontsize="medium")
    return save(fig, path)


def draw_epoch_means(curves: pd.DataFrame, column: str, ax, ylabel: str) -> None:
    """Per group: the mean of ``column`` over seeds at each epoch, a band of one standard deviation around it."""
    for group, part in curves.dropna(subset=[column]).groupby("group", sort=False):
        stats = part.groupby("epoch")[column].agg(["mean", "std", "count"])
        n = int(stats["count"].max())
        line, = ax.plot(stats.index, stats["mean"], label=f"{group} (n={n})")
        ax.fill_between(stats.index, stats["mean"] - stats["std"].fillna(0.0), stats["mean"] + stats["std"].fillna(0.0),
                        color=line.get_color(), alpha=0.2)
    ax.set(xlabel="epoch", ylabel=ylabel)
    ax.legend(fontsize="small", loc="best")


def plot_epoch_curves(curves: pd.DataFrame, panels: dict[str, str], path: str | Path, *, title: str) -> Path:
    """One panel per ``{column: y label}``: every group's per-epoch mean over seeds with a one-std band."""
    fig, axes = new_figure(ncols=len(panels), width=5.5)
    fig.subplots_adjust(wspace=0.35)
    for ax, (column, label) in zip(axes[0], panels.items()):
        draw_epoch_means(curves, column, ax, label)
    axes[0, 0].set_title(f"{title}\n(mean ± std over seeds)", fontsize="medium")
    return save(fig, path)


def plot_curves_and_removal(curves: pd.DataFrame, path: str | Path, *, title: str) -> Path:
    """Test robust accuracy per epoch for every group and, beside it, the removal rate of the groups that record one."""
    panels = {"robust_acc": "test PGD accuracy (%)"}
    if "removal_rate" in curves and curves["removal_rate"].notna().any():
        curves = curves.assign(removal_rate=100.0 * curves["removal_rate"])
        panels["removal_rate"] = "training examples removed (loss below c_min, %)"
    return plot_epoch_curves(curves, panels, path, title=title)
