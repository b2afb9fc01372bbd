"""Tests for robust-overfitting curves and tables (layerlab.analysis.curves) and their figure."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from layerlab.analysis.curves import (
    CURVE_COLUMNS,
    OVERFITTING_COLUMNS,
    load_curves,
    overfitting_table,
    run_labels,
)


def write_run(path, rows):
    path.mkdir(parents=True)
    with open(path / "metrics.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps({"lr": 0.1, "train_loss": 1.0, "train_acc": 40.0, "seconds": 1.0, **r}) + "\n")
    return path


@pytest.fixture
def run_a(tmp_path):
    """Validation-best epoch 2, test-best epoch 3, last epoch 4 (robust overfitting)."""
    rows = [(1, 50, 20, 52, 22), (2, 55, 30, 54, 28), (3, 60, 32, 58, 27), (4, 65, 25, 63, 24)]
    return write_run(tmp_path / "A", [{"epoch": e, "natural_acc": n, "robust_acc": r, "val_natural_acc": vn,
                                       "val_robust_acc": vr} for e, n, r, vn, vr in rows])


@pytest.fixture
def run_b(tmp_path):
    """No validation split; a tie of the test robust accuracy at epochs 2 and 3 (written out of order)."""
    rows = [(3, 47, 15), (1, 40, 10), (2, 45, 15)]
    return write_run(tmp_path / "B", [{"epoch": e, "natural_acc": n, "robust_acc": r} for e, n, r in rows])


def test_overfitting_table_by_hand(run_a, run_b):
    with pytest.warns(UserWarning, match="no val_robust_acc"):
        val = overfitting_table([run_a, run_b], "val").set_index("run")
    assert tuple(val.reset_index().columns) == OVERFITTING_COLUMNS
    a = val.loc["A"]
    assert (a["selected_on"], a["best_epoch"], a["best_nat"], a["best_rob"]) == ("val", 2, 55, 30)
    assert (a["last_nat"], a["last_rob"], a["delta_nat"], a["delta_rob"]) == (65, 25, 10, -5)
    b = val.loc["B"]  # falls back to test, labelled so; the earliest of tied epochs wins
    assert (b["selected_on"], b["best_epoch"], b["best_rob"], b["last_nat"], b["delta_nat"], b["delta_rob"]) == \
        ("test", 2, 15, 47, 2, 0)
    test = overfitting_table([run_a], "test").set_index("run").loc["A"]
    assert (test["selected_on"], test["best_epoch"], test["best_nat"], test["best_rob"]) == ("test", 3, 60, 32)
    assert (test["delta_nat"], test["delta_rob"]) == (5, -7)
    with pytest.raises(ValueError, match="select_on"):
        overfitting_table([run_a], "train")


def test_runs_without_robust_accuracy_are_left_out(tmp_path, run_a):
    st = write_run(tmp_path / "ST", [{"epoch": 1, "natural_acc": 90, "robust_acc": None}])
    with pytest.warns(UserWarning, match="no robust accuracy"):
        table = overfitting_table([run_a, st])
    assert list(table["run"]) == ["A"]


def test_tidy_curves(run_a, run_b):
    curves = load_curves([run_a, run_b])
    assert tuple(curves.columns) == CURVE_COLUMNS
    # A: 4 epochs x (test nat/rob, val nat/rob, train loss/acc); B: 3 epochs x (test nat/rob, train loss/acc)
    assert len(curves) == 4 * 6 + 3 * 4
    row = curves[(curves["run"] == "A") & (curves["epoch"] == 3) & (curves["split"] == "val")
                 & (curves["metric"] == "robust_acc")]
    assert row["value"].item() == 27
    assert set(curves["split"]) == {"test", "val", "train"}


def test_run_labels_disambiguate(tmp_path):
    assert run_labels([tmp_path / "x" / "AT", tmp_path / "y" / "AT", tmp_path / "ST"]) == ["x/AT", "y/AT", "ST"]


def test_missing_metrics_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        load_curves([tmp_path / "empty"])


def test_cli_writes_csvs_and_figure(run_a, run_b, tmp_path):
    from typer.testing import CliRunner

    from layerlab.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["plot", "curves", str(run_a), str(run_b), "--select-on", "test",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "overfitting.csv")
    assert list(table["selected_on"]) == ["test", "test"] and list(table["best_epoch"]) == [3, 2]
    assert len(pd.read_csv(out / "curves.csv")) == 36
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # the figure needs only the two CSVs
    from layerlab.plots.curves import plot_curves

    png = plot_curves(out / "curves.csv", out / "overfitting.csv", tmp_path / "again.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_epochs_without_evaluation_carry_only_the_training_curves(tmp_path):
    """A run trained with ``eval_every`` > 1: rows of unevaluated epochs have no accuracy keys."""
    evaluated = {2: (55, 30, 54, 28), 4: (65, 25, 63, 24)}
    rows = [{"epoch": e, **(dict(zip(("natural_acc", "robust_acc", "val_natural_acc", "val_robust_acc"),
                                     evaluated[e])) if e in evaluated else {})} for e in (1, 2, 3, 4)]
    run = write_run(tmp_path / "C", rows)
    curves = load_curves([run])
    assert sorted(curves[curves["split"] == "train"]["epoch"].unique()) == [1, 2, 3, 4]
    assert sorted(curves[curves["split"] != "train"]["epoch"].unique()) == [2, 4]
    row = overfitting_table([run]).iloc[0]
    assert (row["best_epoch"], row["best_rob"], row["last_rob"]) == (2, 30, 25)
