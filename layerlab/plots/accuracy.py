"""Accuracy comparisons drawn from the gallery's tables: the freeze study (CURE Fig. 2b, 11), the natural-robust
trade-off (CURE Fig. 1, 5a), RWP's c_min / K2 sweeps (RWP Fig. 3) and CURE's ablation (Table 7).

The tables hold, per model and checkpoint, the mean over training seeds of each accuracy (``natural``,
``robust``, ``cw_inf``, ``nrr``, ...) with its sample standard deviation beside it (``COL_std``) and the seed count
(``n_seeds``); error bars are +- one standard deviation over seeds (none for a single seed). Each ``draw_*``
function draws on an ``ax`` it is given (so notebooks and apps can place it); each ``plot_*`` function makes a
figure of them and writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from layerlab.plots.style import new_figure, place_labels, save

NRR_LEVELS = (20, 40, 60, 80)


def std_of(table: pd.DataFrame, col: str) -> np.ndarray:
    """The error bars of ``col``: its ``COL_std`` column, 0 where there is none (a single seed)."""
    if f"{col}_std" not in table:
        return np.zeros(len(table))
    return table[f"{col}_std"].astype(float).fillna(0.0).to_numpy()


def bars(errors: np.ndarray) -> np.ndarray | None:
    """Error bars to draw: None when every one is 0 (single seeds), so no caps are drawn at the points."""
    return errors if np.any(errors > 0) else None


def seeds_note(table: pd.DataFrame) -> str:
    """``n=3 seeds, 1000 test images; error bars: ±1 std over seeds`` from a table's ``n_seeds`` and ``n_images``
    columns (``no error bars`` when every row has one seed)."""
    parts = []
    many = "n_seeds" in table and len(table) and int(table["n_seeds"].max()) > 1
    if "n_seeds" in table and len(table):
        lo, hi = int(table["n_seeds"].min()), int(table["n_seeds"].max())
        parts.append(f"n={lo if lo == hi else f'{lo}-{hi}'} seed{'s' if hi > 1 else ''}")
    if "n_images" in table and len(table):
        parts.append(f"{'/'.join(sorted({str(n) for n in table['n_images']}))} test images")
    return ", ".join(parts) + ("; error bars: ±1 std over seeds" if many else "; no error bars")


def robust_name(table: pd.DataFrame) -> str:
    """The headline robust attack of a table (``robust_attack``), joined when its rows differ."""
    names = [n for n in dict.fromkeys(table.get("robust_attack", pd.Series(dtype=str))) if isinstance(n, str) and n]
    return " / ".join(names) or "robust"


def _headroom(values: np.ndarray, errors: np.ndarray) -> float:
    """An upper y limit 15% above the highest bar or error bar (at most 100)."""
    top = np.nanmax(values + errors) if len(values) else 1.0
    return min(100.0, max(1.0, 1.15 * float(top)))


def draw_freeze_panel(part: pd.DataFrame, ax, title: str) -> None:
    """Natural and robust accuracy bars (mean +- std over seeds) of ST, SAT and each U-spec model."""
    x = np.arange(len(part))
    ax.bar(x - 0.2, part["natural"], width=0.4, yerr=bars(std_of(part, "natural")), capsize=2, label="natural")
    ax.bar(x + 0.2, part["robust"], width=0.4, yerr=bars(std_of(part, "robust")), capsize=2,
           label=f"robust ({robust_name(part)})")
    ax.set_xticks(x)
    ax.set_xticklabels(part["model"], rotation=45, ha="right")
    top = _headroom(np.concatenate([part["natural"], part["robust"]]),
                    np.concatenate([std_of(part, "natural"), std_of(part, "robust")]))
    ax.set(ylim=(0, top), ylabel="test accuracy (%)", title=title)


def plot_freeze_study(table: pd.DataFrame, path: str | Path, checkpoint: str = "last") -> Path:
    """CURE Fig. 2b / 11: one panel per ``panel`` of the freeze-study table, at ``checkpoint``."""
    table = table[table["checkpoint"] == checkpoint] if "checkpoint" in table else table
    panels = list(dict.fromkeys(table["panel"]))
    fig, axes = new_figure(ncols=len(panels), width=max(4.5, 0.7 * table.groupby("panel").size().max() + 2),
                           height=3.8)
    for ax, panel in zip(axes[0], panels):
        draw_freeze_panel(table[table["panel"] == panel], ax, panel)
    axes[0, -1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"Freeze study, {checkpoint} checkpoint ({seeds_note(table)})",
                 fontsize="medium", y=1.02)
    return save(fig, path)


def draw_nrr_isolines(ax, levels: tuple[int, ...] = NRR_LEVELS) -> None:
    """Curves of equal NRR = 2 nat rob / (nat + rob) in the (natural, robust) accuracy plane, inside the axes'
    limits (set them first)."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    xs = np.linspace(max(x0, 1e-3), x1, 400)
    for level in levels:
        ys = level * xs / np.maximum(2 * xs - level, 1e-9)
        ok = (2 * xs > level) & (ys >= y0) & (ys <= y1)
        if ok.sum() < 2:
            continue
        ax.plot(xs[ok], ys[ok], color="0.8", linewidth=0.8, zorder=0)
        ax.annotate(f"NRR {level}", (xs[ok][-1], ys[ok][-1]), fontsize=7, color="0.5", ha="right", va="bottom")


def _limits(values: np.ndarray, errors: np.ndarray) -> tuple[float, float]:
    """Axis limits around values and their error bars, padded by 10% of the span (within 0-100)."""
    lo, hi = float(np.nanmin(values - errors)), float(np.nanmax(values + errors))
    pad = max(2.0, 0.1 * (hi - lo))
    return max(0.0, lo - pad), min(100.0, hi + pad)


def draw_tradeoff(table: pd.DataFrame, ax, robust: str = "robust", robust_label: str | None = None) -> None:
    """Natural vs robust accuracy (column ``robust``), one labelled point per method with +- std error bars
    over seeds in both directions, over NRR iso-lines."""
    rows = table[table[robust].notna()]
    xs, ys = rows["natural"].to_numpy(float), rows[robust].to_numpy(float)
    xerr, yerr = std_of(rows, "natural"), std_of(rows, robust)
    for x, y, dx, dy in zip(xs, ys, xerr, yerr):
        ax.errorbar(x, y, xerr=dx or None, yerr=dy or None, fmt="o", markersize=6, capsize=2, zorder=2)
    if len(rows):
        ax.set_xlim(*_limits(xs, xerr))
        ax.set_ylim(*_limits(ys, yerr))
    draw_nrr_isolines(ax)
    place_labels(ax, xs, ys, list(rows["method"]))
    ax.set(xlabel="natural accuracy (%)", ylabel=f"{robust_label or robust_name(rows)} accuracy (%)")


def plot_tradeoff(table: pd.DataFrame, path: str | Path, checkpoint: str = "last") -> Path:
    """CURE Fig. 1 / 5a at ``checkpoint``: natural accuracy against C&W (the paper's axis) and, beside it, the
    headline robust accuracy (AutoAttack or the worst case over the evaluated attacks)."""
    table = table[table["checkpoint"] == checkpoint] if "checkpoint" in table else table
    panels = [("cw_inf", "C&W (CW-inf)")] if table["cw_inf"].notna().any() else []
    panels.append(("robust", robust_name(table)))
    fig, axes = new_figure(ncols=len(panels), width=5.0, height=4.4)
    for ax, (col, label) in zip(axes[0], panels):
        draw_tradeoff(table, ax, col, label)
        ax.set_title(f"natural vs {label}", fontsize="medium")
    fig.suptitle(f"Natural-robust trade-off, {checkpoint} checkpoint ({seeds_note(table)})",
                 fontsize="medium", y=1.02)
    return save(fig, path)


SWEEP_LABELS = {"c_min": "c_min", "steps": "K2 (perturbation steps)"}


def draw_sweep(part: pd.DataFrame, refs: pd.DataFrame, ax, param: str) -> None:
    """RWP's natural and robust accuracy (mean +- std over seeds) against one hyper-parameter, with reference
    runs' robust accuracy (``refs``: rows of ``method``, ``robust``, ``robust_std``) as lines and +- std bands.
    The natural accuracy has its own axis on the right, so neither is squeezed into 0-100."""
    part = part.sort_values("value")
    x = part["value"].to_numpy(float)
    ax.errorbar(x, part["robust"], yerr=bars(std_of(part, "robust")), marker="o", capsize=3, color="C0",
                label=f"RWP robust ({robust_name(part)})")
    for ref, std, style in zip(refs.to_dict("records"), std_of(refs, "robust"), (":", "-.", "--")):
        ax.axhline(ref["robust"], color="0.35", linestyle=style, linewidth=1.2, label=f"{ref['method']} robust")
        if std:
            ax.axhspan(ref["robust"] - std, ref["robust"] + std, color="0.5", alpha=0.12, linewidth=0)
    ax.set_ylim(*_limits(np.concatenate([part["robust"].to_numpy(float), refs["robust"].to_numpy(float)]),
                         np.concatenate([std_of(part, "robust"), std_of(refs, "robust")])))
    ax.set(xlabel=SWEEP_LABELS.get(param, param), ylabel="robust accuracy (%)",
           title=f"RWP: {SWEEP_LABELS.get(param, param)} sweep")
    ax.set_xticks(x)
    nat = ax.twinx()
    nat.errorbar(x, part["natural"], yerr=bars(std_of(part, "natural")), marker="s", linestyle="--", capsize=3,
                 color="C1", label="RWP natural")
    nat.set_ylim(*_limits(part["natural"].to_numpy(float), std_of(part, "natural")))
    nat.set_ylabel("natural accuracy (%)", color="C1")
    nat.tick_params(axis="y", colors="C1")
    nat.grid(False)


def plot_sweeps(table: pd.DataFrame, refs: pd.DataFrame, path: str | Path, checkpoint: str = "last") -> Path:
    """RWP Fig. 3: one panel per swept parameter at ``checkpoint``, with AT / AWP (``refs``, rows of the same
    kind of table) as references; one legend beside the panels."""
    if "checkpoint" in table:
        table = table[table["checkpoint"] == checkpoint]
        refs = refs[refs["checkpoint"] == checkpoint]
    params = list(dict.fromkeys(table["param"]))
    fig, axes = new_figure(ncols=len(params), width=4.6, height=3.8)
    for ax, param in zip(axes[0], params):
        draw_sweep(table[table["param"] == param], refs, ax, param)
    legend: dict[str, Any] = {}  # label -> handle, over both y axes of the panels
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), fontsize="small", loc="upper center",
               bbox_to_anchor=(0.5, 0.0), ncol=3)
    fig.suptitle(f"RWP sweeps, {checkpoint} checkpoint ({seeds_note(table)})",
                 fontsize="medium", y=1.02)
    fig.tight_layout()
    return save(fig, path)


ABLATION_BARS = (("natural", "natural"), ("robust", None), ("nrr", "NRR"))


def draw_ablation(table: pd.DataFrame, ax) -> None:
    """Natural, robust and NRR bars (mean +- std over seeds) with RGP and revision on or off (columns ``rgp``,
    ``revision``)."""
    x = np.arange(len(table))
    values, errors = [], []
    for i, (col, label) in enumerate(ABLATION_BARS):
        ax.bar(x + (i - 1) * 0.27, table[col], width=0.27, yerr=bars(std_of(table, col)), capsize=2,
               label=label or f"robust ({robust_name(table)})")
        values.append(table[col].to_numpy(float))
        errors.append(std_of(table, col))
    ax.set_xticks(x)
    ax.set_xticklabels([f"RGP {'on' if a else 'off'}\nrevision {'on' if b else 'off'}"
                        for a, b in zip(table["rgp"], table["revision"])], fontsize=8)
    ax.set(ylim=(0, _headroom(np.concatenate(values), np.concatenate(errors))), ylabel="%",
           title="CURE ablation (Table 7)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_ablation(table: pd.DataFrame, path: str | Path, checkpoint: str = "last") -> Path:
    """CURE Table 7 as bars at ``checkpoint``."""
    table = table[table["checkpoint"] == checkpoint] if "checkpoint" in table else table
    fig, axes = new_figure(width=6.5, height=3.8)
    draw_ablation(table, axes[0, 0])
    axes[0, 0].set_title(f"CURE ablation (Table 7), {checkpoint} checkpoint\n{seeds_note(table)}",
                         fontsize="medium")
    return save(fig, path)
