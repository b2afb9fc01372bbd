"""CURE Fig. 6a/6b views from ``layer_stats.jsonl`` only: mean gradient per block over training, and
the percentage of weights updated per layer in the initial / middle / final phase of training (per step, and at
least once per epoch)."""

from __future__ import annotations

import textwrap

from pathlib import Path
from typing import Any

import seaborn as sns
from matplotlib.ticker import MaxNLocator

from layerlab.analysis.layer_stats import (
    PHASES,
    UPDATED_VIEWS,
    block_gradients,
    read_layer_stats,
    updated_by_phase,
)
from layerlab.plots.style import new_figure, save


def draw_block_gradients(stats, ax, title: str = "Gradient magnitude per block", ylabel: bool = True) -> None:
    """Line per block: mean |gradient| (entries weighted equally) against the epoch, log scale."""
    data = block_gradients(stats)
    sns.lineplot(data=data, x="epoch", y="grad_mean_abs", hue="block", marker="o", ax=ax)
    ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel="mean |gradient|" if ylabel else "", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_block_gradients(stats, path: str | Path) -> Path:
    """One run's mean |gradient| per block over training."""
    fig, axes = new_figure(width=5.5, height=3.8)
    draw_block_gradients(stats, axes[0, 0])
    axes[0, 0].legend(title="block", fontsize="small")
    return save(fig, path)


def plot_block_gradient_panels(stats: dict[str, Any], path: str | Path) -> Path:
    """CURE Fig. 6a: mean |gradient| per block over training, one panel per run (``label -> layer stats``)."""
    fig, axes = new_figure(ncols=len(stats), width=4.2, height=3.6)
    for i, (ax, (label, frame)) in enumerate(zip(axes[0], stats.items())):
        draw_block_gradients(frame, ax, title=label, ylabel=i == 0)  # one y label per row
        ax.legend(fontsize="x-small")
    return save(fig, path)


def draw_updated_by_phase(stats, ax, view: str = "per_step", weights_only: bool = True, title: str = "") -> None:
    """Bars per layer (conv/linear weights in forward order), one colour per phase: the percent of entries
    updated in ``view`` (:data:`~layerlab.analysis.layer_stats.UPDATED_VIEWS`)."""
    data = updated_by_phase(stats, weights_only=weights_only, view=view)
    phases = [p for p in PHASES if p in set(data["phase"])]
    sns.barplot(data=data, x="layer", y="updated_percent", hue="phase", hue_order=phases, ax=ax)
    names = data.drop_duplicates("layer").sort_values("layer")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{i + 1} {b}" for i, b in enumerate(names["block"])], rotation=90, fontsize="x-small")
    ax.set(xlabel="layer (forward order) and block", ylabel=UPDATED_VIEWS[view][1], ylim=(0, 105), title=title)
    ax.legend(title="phase", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_updated_by_phase(stats, path: str | Path, label: str = "run", weights_only: bool = True,
                          note: str | None = None) -> Path:
    """Weights updated per layer and phase of run ``label``: the share a step changes and, where the run
    recorded it, the share changed at least once per epoch (which tells a mask that keeps the same entries every
    step from one whose entries move); ``note`` goes under the title."""
    views = [v for v in UPDATED_VIEWS if UPDATED_VIEWS[v][0] in stats]
    layers = stats[stats["shape"].map(len) > 1]["param"].nunique() if weights_only else stats["param"].nunique()
    fig, axes = new_figure(nrows=len(views), width=max(6.0, 0.35 * layers + 2), height=3.6)
    for ax, view in zip(axes[:, 0], views):
        draw_updated_by_phase(stats, ax, view, weights_only, title=f"{label}: {UPDATED_VIEWS[view][1]}")
    for ax in axes[:-1, 0]:
        ax.set_xlabel("")  # one x label, under the bottom panel
    notes = ([note] if note else []) + (["the at-least-once view needs a run trained with it recorded"]
                                        if len(views) == 1 else [])
    if notes:
        wrapped = [textwrap.fill(f"({n})", 100) for n in notes]
        axes[0, 0].set_title("\n".join([axes[0, 0].get_title(), *wrapped]), fontsize="small")
    fig.tight_layout()
    return save(fig, path)


def plot_grads(source: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Both views of a run (``source`` is the run directory or its layer_stats.jsonl) into ``out_dir``
    (default: the run's ``figures/``)."""
    source = Path(source)
    stats = read_layer_stats(source)
    run_dir = source if source.is_dir() else source.parent
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "figures"
    return [plot_block_gradients(stats, out_dir / "grads_per_block.png"),
            plot_updated_by_phase(stats, out_dir / "updated_per_layer.png")]
