"""Robustness figures, drawn only from written files (eval.json, corruptions.csv, minpert/attributions JSON+NPZ).

Every function takes paths, so a figure can be redrawn without recomputing anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from layerlab.plots.style import HEATMAP_CMAP, new_figure, save

GROUP_ORDER = ("noise", "blur", "weather", "digital")


def _read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def plot_corruptions(csv: str | Path, out: str | Path, title: str | None = None) -> Path:
    """Accuracy vs severity, one panel per corruption group, one line per corruption (clean as a dashed line)."""
    df = pd.read_csv(csv)
    clean = df[df["type"] == "clean"]["accuracy"]
    groups = [g for g in GROUP_ORDER if g in set(df["group"])]
    fig, axes = new_figure(ncols=max(1, len(groups)), width=3.6, height=3.2)
    for ax, group in zip(axes[0], groups):
        part = df[df["group"] == group]
        for name, rows in part.groupby("type", sort=False):
            rows = rows.sort_values("severity")
            ax.plot(rows["severity"], rows["accuracy"], marker="o", label=name.replace("_", " "))
        if len(clean):
            ax.axhline(float(clean.iloc[0]), color="0.3", linestyle="--", linewidth=1, label="clean")
        ax.set_title(group)
        ax.set_xlabel("severity")
        ax.set_xticks(sorted(part["severity"].unique()))
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    axes[0][0].set_ylabel("accuracy (%)")
    if title:
        fig.suptitle(f"{title}: accuracy under each corruption", y=1.04)
    return save(fig, out)


def plot_corruption_groups(csvs: Mapping[str, str | Path], out: str | Path) -> Path:
    """Mean accuracy per corruption group and severity, one line per run (CURE Fig. 7 style)."""
    frames = []
    for label, path in csvs.items():
        df = pd.read_csv(path)
        frames.append(df[df["type"] != "clean"].assign(run=label))
    data = pd.concat(frames)
    groups = [g for g in GROUP_ORDER if g in set(data["group"])]
    fig, axes = new_figure(ncols=max(1, len(groups)), width=3.6, height=3.2)
    for ax, group in zip(axes[0], groups):
        mean = data[data["group"] == group].groupby(["run", "severity"], sort=False)["accuracy"].mean().reset_index()
        for label in csvs:
            rows = mean[mean["run"] == label].sort_values("severity")
            ax.plot(rows["severity"], rows["accuracy"], marker="o", label=label)
        ax.set_title(group)
        ax.set_xlabel("severity")
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("mean accuracy (%)")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"{', '.join(csvs)}: mean accuracy per corruption group", y=1.04)
    return save(fig, out)


def plot_eps_sweep(evals: Mapping[str, str | Path], out: str | Path) -> Path:
    """PGD-20 accuracy vs eps (in 1/255) from each run's eval.json (CURE Fig. 5b)."""
    fig, axes = new_figure(width=4.8, height=3.5)
    ax = axes[0][0]
    for label, path in evals.items():
        report = _read_json(path)
        if "eps_sweep" not in report:
            raise ValueError(f"{path} has no eps sweep; run `layerlab eval --attacks eps-sweep` first")
        points = report["eps_sweep"]["points"]
        ax.plot([p["eps_255"] for p in points], [p["accuracy"] for p in points], marker="o", label=label)
    ax.set_xlabel("eps (x 1/255)")
    ax.set_ylabel("PGD-20 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{', '.join(evals)}: PGD-20 against eps", fontsize="medium")
    ax.legend(fontsize=8)
    return save(fig, out)


def _show(ax, image: np.ndarray) -> None:
    """Draw a 3 x H x W image in [0, 1] without ticks."""
    ax.imshow(np.clip(np.transpose(image, (1, 2, 0)), 0, 1), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_minpert(json_path: str | Path, out: str | Path, npz_path: str | Path | None = None) -> Path:
    """Grid: first row clean images, then one row per model with its minimal adversarial image and eps."""
    info = _read_json(json_path)
    arrays = np.load(npz_path or Path(json_path).with_suffix(".npz"))
    clean, names = arrays["clean"], info.get("class_names")
    models = info["models"]
    cols = len(info["indices"])
    fig, axes = new_figure(ncols=max(1, cols), nrows=len(models) + 1, width=1.45, height=1.65)

    def label(k: int) -> str:
        return names[k] if names else str(k)

    for j in range(cols):
        _show(axes[0][j], clean[j])
        axes[0][j].set_xlabel(f"{label(info['labels'][j])}", fontsize=8)
    axes[0][0].set_ylabel("clean", fontsize=9)
    for i, model in enumerate(models, start=1):
        adv = arrays[f"adv_{i - 1}"]
        for j, entry in enumerate(model["images"]):
            ax = axes[i][j]
            _show(ax, adv[j])
            eps = entry["eps_255"]
            if entry["orig_pred"] != entry["label"]:
                text = f"misclassified\n({label(entry['orig_pred'])})"
            else:
                text = "not found" if eps is None else f"eps {eps:.2f}/255\n-> {label(entry['adv_pred'])}"
            ax.set_xlabel(text, fontsize=7)
        axes[i][0].set_ylabel(model["name"], fontsize=9)
    fig.suptitle("minimum L-inf perturbation", fontsize=10)
    return save(fig, out)


def _heat(ax, amap: np.ndarray) -> None:
    """Draw an H x W attribution magnitude map scaled to its 99th percentile."""
    top = float(np.percentile(amap, 99)) or 1.0
    ax.imshow(np.clip(amap / top, 0, 1), cmap=HEATMAP_CMAP, interpolation="nearest", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_attributions(json_path: str | Path, out: str | Path, npz_path: str | Path | None = None,
                      title: str | None = None) -> Path:
    """Grid: clean images, then per model a saliency row and an integrated-gradients row (``title`` above)."""
    info = _read_json(json_path)
    arrays = np.load(npz_path or Path(json_path).with_suffix(".npz"))
    clean, models = arrays["clean"], info["models"]
    cols = clean.shape[0]
    fig, axes = new_figure(ncols=max(1, cols), nrows=1 + 2 * len(models), width=1.35, height=1.4)
    for j in range(cols):
        _show(axes[0][j], clean[j])
    axes[0][0].set_ylabel("clean", fontsize=8)
    for i, model in enumerate(models):
        for r, kind in enumerate(("saliency", "ig")):
            row = 1 + 2 * i + r
            maps = arrays[f"{kind}_{i}"]
            for j in range(cols):
                _heat(axes[row][j], maps[j])
            axes[row][0].set_ylabel(f"{model['name']}\n{'saliency' if kind == 'saliency' else 'IG'}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return save(fig, out)


def plot_block_attributions(json_path: str | Path, out: str | Path, stat: str = "share",
                            note: str = "") -> Path:
    """Bars: per-block layer-attribution statistic (default: share of the absolute mass) for each model; ``note``
    is added to the title."""
    info = _read_json(json_path)
    models = info["models"]
    blocks: Sequence[str] = info.get("block_order") or list(models[0]["blocks"])
    fig, axes = new_figure(width=1.2 * max(3, len(blocks)) + 1.5, height=3.4)
    ax = axes[0][0]
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        values = [model["blocks"][b][stat] for b in blocks]
        ax.bar(np.arange(len(blocks)) + (i - (len(models) - 1) / 2) * width, values, width=width,
               label=model["name"])
    ax.set_xticks(np.arange(len(blocks)))
    ax.set_xticklabels(blocks)
    ax.set_ylabel({"share": "share of |attribution| mass"}.get(stat, stat))
    ax.set_title(f"layer attributions ({info['layer_method']}){note}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save(fig, out)
