"""The gallery's comparisons over training seeds (layerlab.gallery.results.seed_table and friends) and the plots
that draw them with error bars, on synthetic run directories with known numbers."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer

from layerlab.gallery.results import overfitting_seed_table, seed_runs, seed_table, shown_checkpoint
from layerlab.plots.accuracy import draw_ablation, draw_freeze_panel, draw_sweep, draw_tradeoff
from layerlab.plots.style import new_figure, place_labels
from layerlab.train import nrr


def fake_run(root: Path, name: str, last: tuple[float, float], best: tuple[float, float] | None = None,
             evals: dict[str, dict[str, float]] | None = None, n: int = 1000) -> Path:
    """A finished run: summary.json with last and best (natural, PGD-20) accuracy; ``evals``: checkpoint ->
    attack -> accuracy, written as that checkpoint's evaluation file with a worst case over every attack."""
    run = root / name
    run.mkdir(parents=True)
    best = best or last
    run.joinpath("summary.json").write_text(json.dumps({
        "natural_acc": last[0], "robust_acc": last[1], "n_test": 1000,
        "best": {"natural_acc": best[0], "robust_acc": best[1], "n_test": 1000}}))
    for checkpoint, acc in (evals or {}).items():
        attacks = [a for a in acc if a not in ("natural", "worst")]
        report = {"n": n, "results": {a: {"accuracy": v} for a, v in acc.items() if a != "worst"},
                  "worst_case": {"linf": {"accuracy": acc["worst"], "attacks": ["natural", *attacks]}}}
        name = "eval.json" if checkpoint == "best" else f"eval-{checkpoint}.json"
        run.joinpath(name).write_text(json.dumps(report))
    return run


def three_seeds(root: Path, name: str, naturals, robusts, **kw) -> Path:
    for seed, (nat, rob) in enumerate(zip(naturals, robusts)):
        fake_run(root, name if seed == 0 else f"{name}-s{seed}", (nat, rob), **kw)
    return root / name


def test_seed_runs_finds_the_finished_seed_siblings_in_seed_order(tmp_path):
    for name in ("AT", "AT-s2", "AT-s1", "AT-s10", "AT-n1000-e60", "ATX-s1", "AT-s3"):
        (tmp_path / name).mkdir()
        if name != "AT-s3":  # unfinished: no summary
            (tmp_path / name / "summary.json").write_text("{}")
    assert [p.name for p in seed_runs(tmp_path / "AT")] == ["AT", "AT-s1", "AT-s2", "AT-s10"]


def test_seed_table_is_the_mean_and_sample_std_over_seeds(tmp_path):
    nat, rob = [40.0, 42.0, 47.0], [20.0, 21.0, 25.0]
    run = three_seeds(tmp_path, "AT", nat, rob, best=(30.0, 30.0))
    table = seed_table({"AT": run})
    assert list(table["checkpoint"]) == ["best", "last"]
    last = table[table["checkpoint"] == "last"].iloc[0]
    assert last["natural"] == pytest.approx(statistics.fmean(nat))
    assert last["natural_std"] == pytest.approx(statistics.stdev(nat))
    assert last["robust"] == pytest.approx(statistics.fmean(rob)) and last["robust_attack"] == "PGD-20"
    assert last["nrr"] == pytest.approx(statistics.fmean(nrr(a, b) for a, b in zip(nat, rob)))  # NRR per seed
    assert (last["n_seeds"], last["seeds"], last["n_images"]) == (3, "0 1 2", "1000")
    best = table[table["checkpoint"] == "best"].iloc[0]
    assert best["natural"] == 30.0 and best["natural_std"] == 0.0
    assert np.isnan(last["cw_inf"]) and np.isnan(last["aa"])  # no evaluation file: the trainer's numbers only


def test_a_single_seed_has_no_std(tmp_path):
    table = seed_table({"AT": fake_run(tmp_path, "AT", (40.0, 20.0))})
    assert (table["n_seeds"] == 1).all() and table["natural_std"].isna().all()
    assert table["natural"].tolist() == [40.0, 40.0]


def test_the_headline_robust_measure_is_the_strongest_every_run_has(tmp_path):
    full = {"last": {"natural": 50.0, "pgd20": 30.0, "cw100": 28.0, "aa": 26.0, "worst": 25.0}}
    at = fake_run(tmp_path, "AT", (50.0, 30.0), evals=full, n=500)
    cure = fake_run(tmp_path, "CURE", (60.0, 10.0), evals={"last": {"natural": 60.0, "pgd20": 10.0, "worst": 10.0}})
    # CURE's worst case covers PGD-20 alone: it is no worst case, so neither row may use one
    table = seed_table({"AT": at, "CURE": cure}).set_index(["method", "checkpoint"])
    assert table.loc[("AT", "last"), "robust_attack"] == table.loc[("CURE", "last"), "robust_attack"] == "PGD-20"
    assert table.loc[("AT", "last"), "aa"] == 26.0 and table.loc[("AT", "last"), "cw_inf"] == 28.0
    assert table.loc[("AT", "last"), "n_images"] == "500"
    cure.joinpath("eval-last.json").unlink()
    fake_run(tmp_path, "CURE2", (0, 0), evals={"last": {"natural": 60.0, "pgd20": 10.0, "cw100": 9.0, "aa": 8.0,
                                                           "worst": 7.5}})
    table = seed_table({"AT": at, "CURE2": tmp_path / "CURE2"}).set_index(["method", "checkpoint"])
    assert table.loc[("AT", "last"), "robust"] == 25.0 and table.loc[("CURE2", "last"), "robust"] == 7.5
    assert table.loc[("AT", "last"), "robust_attack"] == "worst case"
    assert table.loc[("AT", "best"), "robust_attack"] == "PGD-20"  # the best checkpoint was not evaluated
    assert shown_checkpoint(table.reset_index(), "cw_inf") == "last"


def test_overfitting_table_takes_last_minus_best_per_seed(tmp_path):
    best, last = [(40.0, 30.0), (41.0, 28.0), (39.0, 29.0)], [(42.0, 24.0), (42.0, 25.0), (40.0, 20.0)]
    for seed, (b, e) in enumerate(zip(best, last)):
        fake_run(tmp_path, "AT" if seed == 0 else f"AT-s{seed}", e, best=b)
    row = overfitting_seed_table({"AT": tmp_path / "AT"}).iloc[0]
    deltas = [e[1] - b[1] for b, e in zip(best, last)]
    assert row["delta_rob"] == pytest.approx(statistics.fmean(deltas))
    assert row["delta_rob_std"] == pytest.approx(statistics.stdev(deltas))
    assert row["best_rob"] == pytest.approx(29.0) and row["n_seeds"] == 3 and row["robust_attack"] == "PGD-20"


def vertical_bar_lengths(container) -> list[float]:
    """Lengths of the vertical error bars of an errorbar container (bars, or points with x and y bars)."""
    out = []
    for collection in container.lines[2]:
        for seg in collection.get_segments():
            (x0, y0), (x1, y1) = seg
            if x0 == x1:
                out.append(abs(y1 - y0))
    return out


def bar_containers(ax) -> list[BarContainer]:
    return [c for c in ax.containers if isinstance(c, BarContainer)]


def test_tradeoff_error_bars_are_two_std_long(tmp_path):
    at = three_seeds(tmp_path, "AT", [40.0, 42.0, 47.0], [20.0, 21.0, 25.0])
    st = fake_run(tmp_path, "ST", (70.0, 0.5))
    table = seed_table({"AT": at, "ST": st})
    last = table[table["checkpoint"] == "last"]
    fig, axes = new_figure()
    draw_tradeoff(last, axes[0, 0])
    containers = axes[0, 0].containers
    assert len(containers) == 2
    assert vertical_bar_lengths(containers[0]) == pytest.approx([2 * statistics.stdev([20.0, 21.0, 25.0])])
    assert vertical_bar_lengths(containers[1]) == []  # one seed: no bar
    labels = [t.get_text() for t in axes[0, 0].texts]
    assert "AT" in labels and "ST" in labels


def test_bar_charts_carry_the_seed_std(tmp_path):
    u23 = three_seeds(tmp_path, "U-23", [30.0, 33.0, 36.0], [15.0, 16.0, 20.0])
    sat = three_seeds(tmp_path, "AT", [38.0, 38.5, 39.0], [26.0, 26.0, 26.3])
    table = seed_table({"SAT": sat, "U-23": u23}).rename(columns={"method": "model"})
    part = table[table["checkpoint"] == "last"]
    fig, axes = new_figure()
    draw_freeze_panel(part, axes[0, 0], "freeze")
    natural, robust = bar_containers(axes[0, 0])
    lengths = vertical_bar_lengths(robust.errorbar)
    assert lengths == pytest.approx([2 * statistics.stdev([26.0, 26.0, 26.3]), 2 * statistics.stdev([15, 16, 20])])
    assert axes[0, 0].get_ylim()[1] < 100  # the range follows the data, not 0-100
    ablation = part.rename(columns={"model": "run"}).assign(rgp=[True, False], revision=[True, True])
    fig, axes = new_figure()
    draw_ablation(ablation, axes[0, 0])
    nrr_bars = bar_containers(axes[0, 0])[2]
    assert len(vertical_bar_lengths(nrr_bars.errorbar)) == 2


def test_sweep_draws_error_bars_and_reference_bands(tmp_path):
    runs = {f"RWP-cmin{v}": three_seeds(tmp_path, f"RWP-cmin{v}", [37, 38, 39], [25 + v, 26 + v, 24 + v])
            for v in (1, 2, 3)}
    at = three_seeds(tmp_path, "AT", [38, 38, 38], [26.0, 27.0, 28.0])
    every = seed_table({**runs, "AT": at})
    every = every[every["checkpoint"] == "last"]
    part = every[every["method"] != "AT"].assign(value=[1, 2, 3])
    fig, axes = new_figure()
    ax = axes[0, 0]
    draw_sweep(part, every[every["method"] == "AT"], ax, "c_min")
    assert vertical_bar_lengths(ax.containers[0]) == pytest.approx([2.0, 2.0, 2.0])  # std of (v, v+1, v-1) = 1
    lo, hi = ax.get_ylim()
    assert 0 < lo and hi < 100
    band = [p for p in ax.patches if p.get_alpha() and p.get_alpha() < 0.5]
    assert len(band) == 1 and band[0].get_bbox().height == pytest.approx(2.0)  # AT's mean +- std


def test_placed_labels_do_not_overlap_each_other():
    xs = np.array([37.0, 37.5, 38.0, 36.8, 37.2, 60.0])
    ys = np.array([25.0, 25.3, 24.8, 25.1, 24.9, 8.0])
    fig, axes = new_figure()
    ax = axes[0, 0]
    ax.scatter(xs, ys)
    ax.set(xlim=(30, 65), ylim=(5, 30))
    texts = place_labels(ax, xs, ys, ["AWP", "AT", "TRADES", "RWP", "MART", "CURE"])
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    frame = ax.get_window_extent(renderer)
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)


def test_placed_labels_are_deterministic():
    def offsets():
        fig, axes = new_figure()
        axes[0, 0].set(xlim=(0, 10), ylim=(0, 10))
        return [t.xyann for t in place_labels(axes[0, 0], [5, 5.1, 5.2], [5, 5.1, 4.9], ["a", "bb", "ccc"])]

    first = offsets()
    assert first == offsets() and len(set(first)) == 3


def test_tables_keep_the_column_order_the_reference_tables_read(tmp_path):
    from layerlab.gallery.reference import comparison_rows

    at = fake_run(tmp_path, "AT", (40.0, 25.0), evals={"last": {"natural": 40.0, "pgd20": 25.0, "cw100": 22.0,
                                                                "aa": 21.0, "worst": 20.0}})
    seed_table({"AT": at}).to_csv(tmp_path / "cure_table1_tradeoff.csv", index=False)
    rows = {r["method"]: r for r in comparison_rows("tradeoff", tmp_path)}
    assert rows["AT"]["ours cw"] == 22.0 and rows["AT"]["ours aa"] == 21.0  # the last checkpoint, evaluated
    overfitting_seed_table({"AT": at}).to_csv(tmp_path / "cure_table3_overfitting.csv", index=False)
    rows = {r["method"]: r for r in comparison_rows("overfitting", tmp_path)}
    assert rows["AT"]["ours robust_last"] == 25.0  # PGD-20: the best checkpoint has no worst case


def test_curves_of_several_seeds_are_a_mean_with_a_std_band(tmp_path, monkeypatch):
    from layerlab.plots import curves as plots

    rows = []
    for run, shift in (("AT", 0.0), ("AT-s1", 2.0), ("AT-s2", 4.0), ("CURE", 10.0)):
        for epoch in (1, 2, 3):
            for split, metric in (("test", "robust_acc"), ("val", "robust_acc"), ("test", "natural_acc"),
                                  ("train", "acc")):
                rows.append({"run": run, "epoch": epoch, "split": split, "metric": metric,
                             "value": 10 * epoch + shift})
    pd.DataFrame(rows).to_csv(tmp_path / "curves.csv", index=False)
    pd.DataFrame([{"run": r, "best_epoch": 3, "best_rob": 30 + s} for r, s in (("AT", 0), ("AT-s1", 2),
                                                                             ("AT-s2", 4), ("CURE", 10))]).to_csv(
        tmp_path / "overfitting.csv", index=False)
    figs = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figs.append(fig) or path)
    plots.plot_curves(tmp_path / "curves.csv", tmp_path / "overfitting.csv", tmp_path / "c.png",
                      groups={"AT": "AT", "AT-s1": "AT", "AT-s2": "AT", "CURE": "CURE"})
    ax = figs[0].axes[0]
    at = next(line for line in ax.lines if line.get_label() == "AT")
    assert list(at.get_ydata()) == pytest.approx([12.0, 22.0, 32.0])  # mean of the three seeds
    (band,) = ax.collections  # AT's +- std band; CURE is one run
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.max() - ys.min() == pytest.approx(32 + 2 - (12 - 2))  # std of (0, 2, 4) = 2
    stars = [line for line in ax.lines if line.get_marker() == "*"]
    assert len(stars) == 1 and list(stars[0].get_ydata()) == [40]  # CURE's best epoch only


def test_best_minus_last_compares_the_same_test_images(tmp_path):
    """The last checkpoint evaluated on 1000 images but the best one not: the delta uses the trainer's numbers
    for both (one test split), not 1000 evaluated images against the summary's."""
    run = fake_run(tmp_path, "AT", (40.0, 20.0), best=(38.0, 26.0),
                   evals={"last": {"natural": 41.0, "pgd20": 19.0, "cw100": 18.0, "aa": 17.0, "worst": 16.5}})
    row = overfitting_seed_table({"AT": run}).iloc[0]
    assert (row["best_rob"], row["last_rob"], row["delta_rob"]) == (26.0, 20.0, -6.0)
    assert row["n_images"] == "1000" and row["robust_attack"] == "PGD-20"
    fake_run(tmp_path, "AT2", (0, 0), evals={c: {"natural": 40.0, "pgd20": p, "cw100": p - 1, "aa": p - 2,
                                                   "worst": p - 3} for c, p in (("best", 30.0), ("last", 24.0))})
    row = overfitting_seed_table({"AT2": tmp_path / "AT2"}).iloc[0]
    assert (row["best_rob"], row["delta_rob"], row["robust_attack"]) == (27.0, -6.0, "worst case")


def test_a_rows_seeds_are_measured_alike(tmp_path):
    """Seed 0 evaluated on 500 images, seeds 1 and 2 not: the row averages the trainer's numbers of all three,
    never 500 evaluated images with two test splits."""
    three_seeds(tmp_path, "AT", [40.0, 41.0, 42.0], [20.0, 21.0, 22.0])
    (tmp_path / "AT" / "eval-last.json").write_text(json.dumps({
        "n": 500, "results": {"natural": {"accuracy": 99.0}, "pgd20": {"accuracy": 99.0}}}))
    last = seed_table({"AT": tmp_path / "AT"}, checkpoints=("last",)).iloc[0]
    assert (last["natural"], last["pgd20"], last["n_images"]) == (41.0, 21.0, "1000")


def test_sum_sits_beside_nrr_on_the_same_robust_number(tmp_path):
    """CURE Table 8: SUM (natural + robust) beside NRR, per seed on the table's headline robust measure."""
    evals = {"last": {"natural": 80.0, "pgd20": 50.0, "aa": 40.0, "worst": 39.0}}
    table = seed_table({"A": fake_run(tmp_path, "A", (80.0, 50.0), evals=evals)}, checkpoints=("last",))
    row = table.iloc[0]
    assert row["robust_attack"] == "worst case" and row["sum"] == 119.0 and row["nrr"] == pytest.approx(nrr(80, 39))
    table = seed_table({"B": fake_run(tmp_path, "B", (70.0, 30.0))}, checkpoints=("last",))
    assert table.iloc[0]["sum"] == 100.0 and table.iloc[0]["robust_attack"] == "PGD-20"
