"""The papers' published numbers that the gallery sets beside ours.

Copied from the CURE paper (Gowda, Zonooz & Arani, ICLR 2024, arXiv 2401.14948v1), table by table;
each :class:`PaperTable` names its source. The CURE figures of the layer-wise study (Fig. 2b, 11),
the eps sweep (Fig. 5b) and the corruptions (Figs. 7, 9) give no numbers in the text, and the RWP
paper's tables were not available to us, so those groups have no column of published numbers.
Ours come from the gallery's CSV tables; the setting differs (see each group's miniature notes), so the
comparison shows the direction of effects, not a reproduction of the values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from layerlab.gallery.results import shown_checkpoint
from layerlab.gallery.settings import CURE_RUN, SETTINGS
from layerlab.train import nrr

_PAPER_NAMES = {"AT": "AT", "TRADES": "TRADES", "MART": "MART", "AWP": "AWP", CURE_RUN: "CURE"}
# our run name (the profile's, or in a profile's overfitting regime) -> the paper's method name
PAPER_NAMES = {**_PAPER_NAMES, **{s.regime.name(run): paper for s in SETTINGS.values() if s.regime
                                  for run, paper in _PAPER_NAMES.items()}}


@dataclass(frozen=True)
class PaperTable:
    """Published rows and how to read the matching numbers out of our CSV."""

    source: str  # paper, table, model, dataset
    columns: tuple[str, ...]  # compared columns, in order
    rows: dict[str, dict[str, float]]  # paper method -> column -> value
    ours_file: str  # CSV in the figure group's directory
    ours: Callable[[pd.DataFrame], dict[str, dict[str, float]]]  # our rows, by paper method name
    note: str = ""


def _at_checkpoint(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """The rows of a table over seeds at the checkpoint its figure shows (a one-checkpoint table as it is)."""
    if "checkpoint" not in frame:
        return frame
    return frame[frame["checkpoint"] == shown_checkpoint(frame, column)]


def _ours_table1(frame: pd.DataFrame) -> dict[str, dict[str, float]]:
    out = {}
    for r in _at_checkpoint(frame, "cw_inf").to_dict("records"):
        name = PAPER_NAMES.get(r["method"])
        if name:
            out[name] = {"natural": r["natural"], "pgd20": r["pgd20"], "cw": r["cw_inf"], "aa": r["aa"],
                         "nrr_cw": nrr(r["natural"], r["cw_inf"])}
    return out


def _ours_table3(frame: pd.DataFrame) -> dict[str, dict[str, float]]:
    out = {}
    for r in frame.to_dict("records"):
        name = PAPER_NAMES.get(Path(str(r["run"])).name)
        if name:
            out[name] = {"natural_best": r["best_nat"], "natural_last": r["last_nat"],
                         "natural_delta": r["delta_nat"], "robust_best": r["best_rob"],
                         "robust_last": r["last_rob"], "robust_delta": r["delta_rob"]}
    return out


def _ours_table7(frame: pd.DataFrame) -> dict[str, dict[str, float]]:
    names = {(False, False): "no RGP, no revision", (True, False): "RGP only", (False, True): "revision only",
             (True, True): "RGP + revision (CURE)"}
    return {names[(bool(r["rgp"]), bool(r["revision"]))]: {"natural": r["natural"], "pgd20": r["pgd20"]}
            for r in _at_checkpoint(frame, "pgd20").to_dict("records")}


TABLES: dict[str, PaperTable] = {
    "tradeoff": PaperTable(
        source="CURE Table 1, ResNet-18, CIFAR-10, L-inf 8/255 (NRR w.r.t. C&W)",
        columns=("natural", "pgd20", "cw", "aa", "nrr_cw"),
        rows={"AT": {"natural": 82.78, "pgd20": 51.30, "cw": 49.72, "aa": 44.63, "nrr_cw": 62.12},
              "TRADES": {"natural": 82.41, "pgd20": 52.76, "cw": 50.43, "aa": 48.37, "nrr_cw": 62.57},
              "MART": {"natural": 80.70, "pgd20": 54.02, "cw": 49.35, "aa": 47.49, "nrr_cw": 61.24},
              "CURE": {"natural": 86.76, "pgd20": 54.92, "cw": 52.48, "aa": 49.69, "nrr_cw": 65.04}},
        ours_file="cure_table1_tradeoff.csv", ours=_ours_table1,
        note="The paper prints CURE's NRR as 65.04; its own natural and C&W numbers give 65.40. AWP and RWP "
             "have no row in CURE's Table 1. Our C&W is CW-inf with 100 steps, our AA the standard AutoAttack; ours "
             "are means over the seeds in the table above, at the checkpoint the figure shows."),
    "overfitting": PaperTable(
        source="CURE Table 3, PreAct ResNet-18, CIFAR-10: best and last checkpoint, robust = AutoAttack",
        columns=("natural_best", "natural_last", "natural_delta", "robust_best", "robust_last", "robust_delta"),
        rows={"AT": {"natural_best": 82.50, "natural_last": 83.99, "natural_delta": 1.49, "robust_best": 48.21,
                     "robust_last": 42.46, "robust_delta": -5.75},
              "TRADES": {"natural_best": 81.19, "natural_last": 82.48, "natural_delta": 1.29,
                         "robust_best": 49.03, "robust_last": 46.80, "robust_delta": -2.23},
              "AWP": {"natural_best": 83.33, "natural_last": 84.39, "natural_delta": 1.06, "robust_best": 50.57,
                      "robust_last": 49.95, "robust_delta": -0.62},
              "CURE": {"natural_best": 86.54, "natural_last": 86.54, "natural_delta": 0.00, "robust_best": 50.23,
                       "robust_last": 50.23, "robust_delta": 0.00}},
        ours_file="cure_table3_overfitting.csv", ours=_ours_table3,
        note="delta = last - best. Our robust accuracy is the table's headline (the worst case over the evaluated "
             "attacks, else AutoAttack, else PGD-20 on the test split; the paper: AutoAttack), our best epoch is "
             "chosen on held-out validation data, and ours are means over the seeds in the table above."),
    "cure_ablation": PaperTable(
        source="CURE Table 7, ResNet-18, CIFAR-10",
        columns=("natural", "pgd20"),
        rows={"no RGP, no revision": {"natural": 82.41, "pgd20": 52.76},
              "RGP only": {"natural": 81.27, "pgd20": 53.20},
              "revision only": {"natural": 83.28, "pgd20": 51.57},
              "RGP + revision (CURE)": {"natural": 86.76, "pgd20": 54.90}},
        ours_file="cure_table7_ablation.csv", ours=_ours_table7),
}


def comparison_rows(key: str, group_dir: Path) -> list[dict[str, Any]]:
    """One row per paper method: the paper's value and ours for every compared column (ours blank when
    the group has no such run, or its table was written in an older layout than the comparison reads)."""
    table = TABLES.get(key)
    path = Path(group_dir) / table.ours_file if table else None
    if table is None or not path.exists():
        return []
    try:
        ours = table.ours(pd.read_csv(path))
    except KeyError:  # a group drawn before its table gained the compared columns: re-make it to compare
        ours = {}
    rows = []
    for method, paper in table.rows.items():
        row: dict[str, Any] = {"method": method}
        for col in table.columns:
            row[f"paper {col}"] = paper.get(col)
            row[f"ours {col}"] = ours.get(method, {}).get(col)
        rows.append(row)
    return rows


def comparison_table(key: str, group_dir: Path) -> list[str]:
    """Markdown lines comparing the paper's numbers for figure group ``key`` with ours in ``group_dir``."""
    rows = comparison_rows(key, group_dir)
    if not rows:
        return []
    table = TABLES[key]
    lines = [f"Published: {table.source}.", "", *markdown_table(rows)]
    return lines + (["", table.note] if table.note else [])


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> list[str]:
    """Rows as Markdown table lines (floats with 2 decimals, missing values blank)."""
    if not rows:
        return []
    columns = columns or list(rows[0])

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and v != v):
            return ""
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows])
