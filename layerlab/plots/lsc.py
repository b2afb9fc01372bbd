"""RWP Fig. 2 (loss landscapes per LSC group) from ``lsc.csv``, and the share of training adversarial examples
with loss below c_min over training from ``removal_rate.csv`` (an extension: the paper's appendix Fig. 4 shows
the removal rate of AT that drops those examples, which these runs do not)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator

from layerlab.plots.style import new_figure, save


def draw_lsc_landscape(part: pd.DataFrame, ax, title: str, legend: bool = True) -> None:
    """One checkpoint's rows of an ``lsc.csv``: a curve per LSC group, loss against mu, mean over directions
    (band: min-max over directions); ``legend``: with the groups' legend inside the axes."""
    groups = part.drop_duplicates("group").sort_values("group_lo")["group"].tolist()
    colours = dict(zip(groups, sns.color_palette("viridis", len(groups))))
    stats = part.groupby(["group", "mu"])["loss"].agg(["mean", "min", "max"]).reset_index()
    sizes = part.groupby("group")["n_examples"].first()
    for group in groups:
        line = stats[stats["group"] == group].sort_values("mu")
        ax.plot(line["mu"], line["mean"], color=colours[group], label=f"{group} (n={sizes[group]})")
        ax.fill_between(line["mu"], line["min"], line["max"], color=colours[group], alpha=0.15, linewidth=0)
    ax.set(xlabel="μ (filter-normalized direction)", ylabel="adversarial loss g_j(μ)", title=title)
    if legend:
        ax.legend(title="LSC group", fontsize="x-small", title_fontsize="small")


def plot_lsc(csv_path: str | Path, path: str | Path, label: str | None = None) -> Path:
    """RWP Fig. 2: one panel per checkpoint of an ``lsc.csv`` of run ``label``, one legend beside them."""
    df = pd.read_csv(csv_path)
    if df.empty:
        raise ValueError(f"{csv_path} has no rows")
    checkpoints = list(dict.fromkeys(df["checkpoint"]))
    fig, axes = new_figure(ncols=len(checkpoints), width=4.5, height=3.8)
    for ax, name in zip(axes[0], checkpoints):
        part = df[df["checkpoint"] == name]
        epoch = part["epoch"].iloc[0]
        draw_lsc_landscape(part, ax, f"{name}" + (f" (epoch {int(epoch)})" if pd.notna(epoch) else ""),
                           legend=False)
    for ax in axes[0, 1:]:
        ax.set_ylabel("")
    axes[0, -1].legend(title="LSC group (n: rightmost panel)", fontsize="x-small", title_fontsize="small",
                       loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if label:
        fig.suptitle(f"{label}: adversarial loss landscape per LSC group", fontsize="medium", y=1.03)
    return save(fig, path)


def draw_removal_rate(df: pd.DataFrame, ax, label: str | None = None) -> None:
    """Percent of training adversarial examples with loss below c_min (a ``removal_rate.csv``) over training."""
    df = df.sort_values("epoch")
    ax.plot(df["epoch"], 100 * df["removal_rate"], marker="o", label=label)
    ax.set(xlabel="epoch", ylabel=f"examples with loss < {df['c_min'].iloc[0]:g} (%)", ylim=(0, 105))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_removal_rate(csv_path: str | Path, path: str | Path) -> Path:
    """One run's removal rate against the epoch, each point named by its checkpoint."""
    df = pd.read_csv(csv_path)
    if df.empty:
        raise ValueError(f"{csv_path} has no rows")
    fig, axes = new_figure(width=5.0, height=3.5)
    ax = axes[0, 0]
    draw_removal_rate(df, ax)
    for _, r in df.iterrows():
        ax.annotate(str(r["checkpoint"]), (r["epoch"], 100 * r["removal_rate"]), fontsize="x-small",
                    textcoords="offset points", xytext=(3, 3))
    ax.set_title("Adversarial examples below c_min")
    return save(fig, path)


def plot_removal_rates(csvs: dict[str, str | Path], path: str | Path) -> Path:
    """The share of training adversarial examples with loss below c_min over training, one line per run
    (``label -> removal_rate.csv``); an extension, not a figure of the paper."""
    fig, axes = new_figure(width=5.0, height=3.6)
    ax = axes[0, 0]
    for label, csv in csvs.items():
        draw_removal_rate(pd.read_csv(csv), ax, label)
    ax.set_title(f"{', '.join(csvs)}: small-loss adversarial examples\n(extension, not a paper figure)",
                 fontsize="medium")
    ax.legend(fontsize="small")
    return save(fig, path)
