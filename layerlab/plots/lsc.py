"""RWP Fig. 2 / appendix Fig. 4 views from ``lsc.csv`` and ``removal_rate.csv`` only."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import seaborn as sns

from layerlab.plots.style import new_figure, save


def plot_lsc(csv_path: str | Path, path: str | Path) -> Path:
    """One panel per checkpoint, one curve per LSC group: loss against mu, mean over directions
    (band: min-max over directions)."""
    df = pd.read_csv(csv_path)
    if df.empty:
        raise ValueError(f"{csv_path} has no rows")
    checkpoints = list(dict.fromkeys(df["checkpoint"]))
    fig, axes = new_figure(ncols=len(checkpoints), width=4.5, height=3.8)
    groups = df.drop_duplicates("group").sort_values("group_lo")["group"].tolist()
    colours = dict(zip(groups, sns.color_palette("viridis", len(groups))))
    for ax, name in zip(axes[0], checkpoints):
        part = df[df["checkpoint"] == name]
        stats = part.groupby(["group", "mu"])["loss"].agg(["mean", "min", "max"]).reset_index()
        sizes = part.groupby("group")["n_examples"].first()
        for group in [g for g in groups if g in set(stats["group"])]:
            line = stats[stats["group"] == group].sort_values("mu")
            ax.plot(line["mu"], line["mean"], color=colours[group], label=f"{group} (n={sizes[group]})")
            ax.fill_between(line["mu"], line["min"], line["max"], color=colours[group], alpha=0.15, linewidth=0)
        epoch = part["epoch"].iloc[0]
        ax.set(xlabel="μ (filter-normalized direction)", ylabel="adversarial loss g_j(μ)",
               title=f"{name}" + (f" (epoch {int(epoch)})" if pd.notna(epoch) else ""))
        ax.legend(title="LSC group", fontsize="x-small", title_fontsize="small")
    return save(fig, path)


def plot_removal_rate(csv_path: str | Path, path: str | Path) -> Path:
    """Percent of training adversarial examples with loss below c_min, against the epoch."""
    df = pd.read_csv(csv_path)
    if df.empty:
        raise ValueError(f"{csv_path} has no rows")
    df = df.sort_values("epoch")
    fig, axes = new_figure(width=5.0, height=3.5)
    ax = axes[0, 0]
    ax.plot(df["epoch"], 100 * df["removal_rate"], marker="o")
    for _, r in df.iterrows():
        ax.annotate(str(r["checkpoint"]), (r["epoch"], 100 * r["removal_rate"]), fontsize="x-small",
                    textcoords="offset points", xytext=(3, 3))
    ax.set(xlabel="epoch", ylabel=f"examples with loss < {df['c_min'].iloc[0]:g} (%)", ylim=(0, 105),
           title="Adversarial examples below c_min")
    return save(fig, path)
