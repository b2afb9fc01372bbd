"""Accuracy comparisons drawn from the gallery's tables: the freeze study (CURE Fig. 2b, 11), the natural-robust
trade-off (CURE Fig. 1, 5a), RWP's c_min / K2 sweeps (RWP Fig. 3) and CURE's ablation (Table 7).

Each ``draw_*`` function draws on an ``ax`` it is given (so notebooks and apps can place it); each ``plot_*``
function makes a figure of them and writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from layerlab.plots.style import new_figure, save

NRR_LEVELS = (20, 40, 60, 80)


def draw_freeze_panel(part: pd.DataFrame, ax, title: str) -> None:
    """Natural and robust accuracy bars of ST, SAT and each U-spec model (one row of the freeze-study table each)."""
    x = np.arange(len(part))
    ax.bar(x - 0.2, part["natural_acc"], width=0.4, label="natural")
    ax.bar(x + 0.2, part["robust_acc"], width=0.4, label="PGD")
    ax.set_xticks(x)
    ax.set_xticklabels(part["model"], rotation=45, ha="right")
    ax.set(ylim=(0, 100), ylabel="test accuracy (%)", title=title)


def plot_freeze_study(table: pd.DataFrame, path: str | Path) -> Path:
    """CURE Fig. 2b / 11: one panel per ``panel`` of the freeze-study table."""
    panels = list(dict.fromkeys(table["panel"]))
    fig, axes = new_figure(ncols=len(panels), width=max(4.5, 0.7 * table.groupby("panel").size().max() + 2),
                           height=3.6)
    for ax, panel in zip(axes[0], panels):
        draw_freeze_panel(table[table["panel"] == panel], ax, panel)
    axes[0, 0].legend(fontsize="small")
    return save(fig, path)


def draw_nrr_isolines(ax, levels: tuple[int, ...] = NRR_LEVELS) -> None:
    """Curves of equal NRR = 2 nat rob / (nat + rob) in the (natural, robust) accuracy plane."""
    xs = np.linspace(1, 100, 200)
    for level in levels:
        ys = level * xs / np.maximum(2 * xs - level, 1e-9)
        ok = (2 * xs > level) & (ys <= 100)
        ax.plot(xs[ok], ys[ok], color="0.8", linewidth=0.8, zorder=0)
        ax.annotate(f"NRR {level}", (xs[ok][-1], ys[ok][-1]), fontsize=7, color="0.5")


def draw_tradeoff(table: pd.DataFrame, ax) -> None:
    """Natural vs robust accuracy, one labelled point per method (columns ``method``, ``natural``, ``robust``,
    ``robust_attack``), over NRR iso-lines."""
    draw_nrr_isolines(ax)
    for _, r in table.iterrows():
        ax.scatter(r["natural"], r["robust"], s=40, zorder=2)
        ax.annotate(r["method"], (r["natural"], r["robust"]), textcoords="offset points", xytext=(4, 3),
                    fontsize=8)
    rob_name = table["robust_attack"].iloc[0] if len(table) else "robust"
    ax.set(xlim=(0, 100), ylim=(0, 100), xlabel="natural accuracy (%)", ylabel=f"{rob_name} accuracy (%)",
           title="Natural-robust trade-off")


def plot_tradeoff(table: pd.DataFrame, path: str | Path) -> Path:
    """CURE Fig. 1 / 5a."""
    fig, axes = new_figure(width=5.0, height=4.2)
    draw_tradeoff(table, axes[0, 0])
    return save(fig, path)


SWEEP_LABELS = {"c_min": "c_min", "steps": "K2 (perturbation steps)"}


def draw_sweep(part: pd.DataFrame, refs: dict[str, dict[str, Any]], ax, param: str) -> None:
    """RWP natural and robust accuracy against one hyper-parameter, with reference runs' robust accuracy."""
    part = part.sort_values("value")
    ax.plot(part["value"], part["robust_acc"], marker="o", label="RWP robust")
    ax.plot(part["value"], part["natural_acc"], marker="s", linestyle="--", label="RWP natural")
    for (name, ref), style in zip(refs.items(), (":", "-.")):
        ax.axhline(ref["robust_acc"], color="0.4", linestyle=style, linewidth=1, label=f"{name} robust")
    ax.set(xlabel=SWEEP_LABELS.get(param, param), ylabel="test accuracy (%)", ylim=(0, 100),
           title=f"RWP: {param} sweep")


def plot_sweeps(table: pd.DataFrame, refs: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """RWP Fig. 3: one panel per swept parameter, with AT / AWP (``refs``: name -> summary) as references."""
    params = list(dict.fromkeys(table["param"]))
    fig, axes = new_figure(ncols=len(params), width=4.3, height=3.6)
    for ax, param in zip(axes[0], params):
        draw_sweep(table[table["param"] == param], refs, ax, param)
    axes[0, 0].legend(fontsize="x-small")
    return save(fig, path)


def draw_ablation(table: pd.DataFrame, ax) -> None:
    """Natural, robust and NRR bars with RGP and revision on or off (columns ``rgp``, ``revision``)."""
    x = np.arange(len(table))
    for i, (col, label) in enumerate((("natural_acc", "natural"), ("robust_acc", "PGD"), ("nrr", "NRR"))):
        ax.bar(x + (i - 1) * 0.27, table[col], width=0.27, label=label)
    ax.set_xticks(x)
    ax.set_xticklabels([f"RGP {'on' if a else 'off'}\nrevision {'on' if b else 'off'}"
                        for a, b in zip(table["rgp"], table["revision"])], fontsize=8)
    ax.set(ylim=(0, 100), ylabel="%", title="CURE ablation (Table 7)")
    ax.legend(fontsize="small")


def plot_ablation(table: pd.DataFrame, path: str | Path) -> Path:
    """CURE Table 7 as bars."""
    fig, axes = new_figure(width=6.0, height=3.6)
    draw_ablation(table, axes[0, 0])
    return save(fig, path)
