"""Robust overfitting across runs (CURE Fig. 4, 5c, Table 3; RWP Table 1), from ``metrics.jsonl`` only.

``curves.csv`` is tidy (run, epoch, split, metric, value): split ``test`` and ``val`` carry
``natural_acc`` / ``robust_acc`` (the trainer's per-epoch evaluation: PGD-``epoch_eval_steps`` on
``eval_size`` test examples and on the held-out validation split), split ``train`` carries ``loss`` / ``acc``
(on the training-time examples, adversarial for AT). ``overfitting.csv`` reports, per run, the test accuracies
at the *best* epoch and at the *last* epoch and their difference (last - best, as in CURE Table 3: a negative
robust delta is robust overfitting). The best epoch maximizes the
validation robust accuracy (``select_on="val"``, default: no test information is used to choose it) or the
test robust accuracy (``select_on="test"``, the optimistic choice some papers report); the ``selected_on``
column says which one each row used. Ties go to the earliest epoch, as in the trainer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from layerlab import runs
from layerlab.plots.curves import plot_curves

CURVE_COLUMNS = ("run", "epoch", "split", "metric", "value")
OVERFITTING_COLUMNS = ("run", "selected_on", "best_epoch", "best_nat", "best_rob", "last_nat", "last_rob",
                       "delta_nat", "delta_rob")
# metrics.jsonl key -> (split, metric)
METRIC_KEYS = {
    "natural_acc": ("test", "natural_acc"), "robust_acc": ("test", "robust_acc"),
    "val_natural_acc": ("val", "natural_acc"), "val_robust_acc": ("val", "robust_acc"),
    "train_loss": ("train", "loss"), "train_acc": ("train", "acc"),
}
SELECT_KEYS = {"val": "val_robust_acc", "test": "robust_acc"}


def run_labels(run_dirs: Sequence[str | Path]) -> list[str]:
    """Short unique names: the directory name, or parent/name when two runs share a name."""
    paths = [Path(p) for p in run_dirs]
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def _metrics(run_dir: Path) -> list[dict]:
    rows = runs.read_jsonl(run_dir / "metrics.jsonl")
    if not rows:
        raise FileNotFoundError(f"{run_dir / 'metrics.jsonl'} is missing or empty: pass layerlab run directories")
    return sorted(rows, key=lambda r: r["epoch"])


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))


def curves_of(metrics: dict[str, list[dict]]) -> pd.DataFrame:
    """Tidy per-epoch curves of ``{run label: metrics.jsonl rows}`` (missing/None values are left out)."""
    rows = []
    for label, rows_of_run in metrics.items():
        for r in rows_of_run:
            for key, (split, metric) in METRIC_KEYS.items():
                if _finite(r.get(key)):
                    rows.append({"run": label, "epoch": int(r["epoch"]), "split": split, "metric": metric,
                                 "value": float(r[key])})
    return pd.DataFrame(rows, columns=list(CURVE_COLUMNS))


def load_curves(run_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """Tidy per-epoch curves of every run directory."""
    return curves_of({label: _metrics(Path(d)) for label, d in zip(run_labels(run_dirs), run_dirs)})


def overfitting_row(label: str, metrics: list[dict], select_on: str = "val") -> dict | None:
    """Best/last/delta of test accuracy for one run; None when it has no robust accuracy at all."""
    if select_on not in SELECT_KEYS:
        raise ValueError(f"unknown select_on {select_on!r}; use 'val' or 'test'")
    used = select_on
    if not any(_finite(r.get(SELECT_KEYS[used])) for r in metrics):
        if used == "val" and any(_finite(r.get("robust_acc")) for r in metrics):
            warnings.warn(f"{label}: no val_robust_acc in metrics.jsonl; best epoch selected on test robust accuracy")
            used = "test"
        else:
            warnings.warn(f"{label}: no robust accuracy in metrics.jsonl; left out of the overfitting table")
            return None
    key = SELECT_KEYS[used]
    best = None
    for r in metrics:  # first maximum: the earliest epoch wins ties, as in the trainer
        if _finite(r.get(key)) and (best is None or r[key] > best[key]):
            best = r
    last = metrics[-1]
    nan = float("nan")

    def get(r: dict, k: str) -> float:
        return float(r[k]) if _finite(r.get(k)) else nan

    row = {"run": label, "selected_on": used, "best_epoch": int(best["epoch"]),
           "best_nat": get(best, "natural_acc"), "best_rob": get(best, "robust_acc"),
           "last_nat": get(last, "natural_acc"), "last_rob": get(last, "robust_acc")}
    row["delta_nat"] = row["last_nat"] - row["best_nat"]
    row["delta_rob"] = row["last_rob"] - row["best_rob"]
    return row


def overfitting_table(run_dirs: Sequence[str | Path], select_on: str = "val") -> pd.DataFrame:
    """One overfitting row per run (see the module docstring)."""
    rows = [overfitting_row(label, _metrics(Path(d)), select_on) for label, d in zip(run_labels(run_dirs), run_dirs)]
    return pd.DataFrame([r for r in rows if r is not None], columns=list(OVERFITTING_COLUMNS))


def write_curves(run_dirs: Sequence[str | Path], out: str | Path, select_on: str = "val",
                 plot: bool = True) -> dict[str, Path]:
    """Write ``curves.csv``, ``overfitting.csv`` and (from them) ``curves.png`` into directory ``out``."""
    if not run_dirs:
        raise ValueError("pass at least one run directory")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"curves": out / "curves.csv", "overfitting": out / "overfitting.csv"}
    load_curves(run_dirs).to_csv(paths["curves"], index=False)
    overfitting_table(run_dirs, select_on).to_csv(paths["overfitting"], index=False)
    if plot:
        paths["figure"] = plot_curves(paths["curves"], paths["overfitting"], out / "curves.png")
    return paths
