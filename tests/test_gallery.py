"""Tests for layerlab.gallery.reference (the papers' numbers) and layerlab.gallery.manifest (the README's tables)."""

from __future__ import annotations

import pandas as pd
import pytest

from layerlab.gallery.reference import TABLES, comparison_rows, comparison_table, markdown_table
from layerlab.train import nrr


def test_published_rows_are_consistent_with_themselves():
    """Transcription check: Table 1's NRR is the harmonic mean of natural and C&W (CURE's printed 65.04 is
    the paper's own slip, 65.40), and Table 3's delta is last - best."""
    for method, row in TABLES["tradeoff"].rows.items():
        want = 65.40 if method == "CURE" else row["nrr_cw"]
        assert nrr(row["natural"], row["cw"]) == pytest.approx(want, abs=0.01)
    for row in TABLES["overfitting"].rows.values():
        assert row["natural_last"] - row["natural_best"] == pytest.approx(row["natural_delta"], abs=0.011)
        assert row["robust_last"] - row["robust_best"] == pytest.approx(row["robust_delta"], abs=0.011)
    assert TABLES["cure_ablation"].rows["no RGP, no revision"] == {
        k: TABLES["tradeoff"].rows["TRADES"][k] for k in ("natural", "pgd20")}  # Table 7's first row is TRADES


def test_comparison_reads_our_csv_beside_the_paper(tmp_path):
    pd.DataFrame([{"method": "AT", "natural": 40.0, "pgd20": 30.0, "cw_inf": 20.0, "aa": 10.0},
                  {"method": "RWP", "natural": 1.0, "pgd20": 1.0, "cw_inf": 1.0, "aa": 1.0}]).to_csv(
        tmp_path / "cure_table1_tradeoff.csv", index=False)
    rows = {r["method"]: r for r in comparison_rows("tradeoff", tmp_path)}
    assert set(rows) == {"AT", "TRADES", "MART", "CURE"}  # the paper's rows; RWP has none in Table 1
    assert rows["AT"]["paper natural"] == 82.78 and rows["AT"]["ours natural"] == 40.0
    assert rows["AT"]["ours nrr_cw"] == pytest.approx(2 * 40 * 20 / 60)
    assert rows["CURE"]["ours natural"] is None
    lines = comparison_table("tradeoff", tmp_path)
    assert lines[0].startswith("Published: CURE Table 1") and "| AT | 82.78 | 40.00 |" in "\n".join(lines)
    assert comparison_rows("freeze_study", tmp_path) == [] and comparison_rows("tradeoff", tmp_path / "x") == []


def test_markdown_table_blanks_missing_values():
    assert markdown_table([{"a": 1.234, "b": None}, {"a": float("nan"), "b": "x"}]) == [
        "| a | b |", "|---|---|", "| 1.23 |  |", "|  | x |"]


def test_table_keeps_integer_ids_beside_blanks(tmp_path):
    """A block spec column with blanks (ST, SAT) is read back as "12", not "12.00"; accuracies keep 2 decimals."""
    from layerlab.gallery.manifest import _csv_rows

    pd.DataFrame([{"model": "ST", "spec": "", "acc": 71.1}, {"model": "U-12", "spec": "12", "acc": 33.0}]).to_csv(
        tmp_path / "t.csv", index=False)
    rows, columns = _csv_rows(tmp_path / "t.csv")
    assert markdown_table(rows, columns)[2:] == ["| ST |  | 71.10 |", "| U-12 | 12 | 33.00 |"]


def test_costed_logs_an_analysis_only_when_it_succeeds(tmp_path):
    from layerlab import runs

    with runs.costed(tmp_path, "cka"):
        pass
    with pytest.raises(RuntimeError), runs.costed(tmp_path, "eval"):
        raise RuntimeError("attack failed")
    with runs.costed(tmp_path, "cka"):
        pass
    costs = runs.analysis_costs(tmp_path)
    assert set(costs) == {"cka"} and costs["cka"] >= 0 and len(runs.read_jsonl(tmp_path / runs.COSTS)) == 2


def test_costed_logs_wall_time_and_process_cpu_time_apart(tmp_path):
    import time

    from layerlab import runs

    with runs.costed(tmp_path, "sleep"):
        time.sleep(0.3)  # wall time passes, this process's CPU time hardly does
    row = runs.read_jsonl(tmp_path / runs.COSTS)[0]
    assert row["seconds"] >= 0.3 and row["cpu_seconds"] < 0.2


def test_gallery_wall_time_counts_each_run_and_analysis_once(tmp_path):
    from layerlab import runs
    from layerlab.gallery.manifest import _analysis_cost, gallery_wall_time

    (tmp_path / "eval.json").write_text("{}")
    (tmp_path / "cka.json").write_text("{}")
    runs.append_jsonl(tmp_path / runs.COSTS, {"what": "eval", "seconds": 30.0})
    entry = _analysis_cost(tmp_path)
    assert entry["analysis_seconds"] == 30.0 and entry["uncosted"] == ["cka.json"]
    run = {"dir": str(tmp_path), "train_seconds": 100.0, **entry}
    older = {**run, "analysis_seconds": 10.0}  # the same run read by an earlier group, before its eval grew
    shared = {"/root/analysis": {"analysis_seconds": 5.0, "analysis_costs": {"minpert": 5.0}, "uncosted": []}}
    manifests = [{"runs": [older]}, {"runs": [run], "shared_analyses": shared}, {"runs": [run]}]
    cost = gallery_wall_time(manifests)
    assert cost["runs"] == 1 and cost["training_seconds"] == 100.0 and cost["analysis_seconds"] == 35.0
    assert cost["total_seconds"] == 135.0 and cost["uncosted"] == [f"{tmp_path.name}/cka.json"]


def test_train_seconds_counts_a_stalled_epoch_at_the_run_median(tmp_path):
    """A process paused mid-epoch inflates that epoch's wall time; the gallery counts it at the median."""
    from layerlab import runs
    from layerlab.gallery.manifest import STALL_FACTOR, _train_seconds, gallery_wall_time, stalled_epochs

    walls = [100.0, 110.0, 90.0, 105.0 * STALL_FACTOR + 1, 105.0]  # median 105; epoch 4 stalled
    for i, w in enumerate(walls):
        runs.append_jsonl(tmp_path / "metrics.jsonl", {"epoch": i + 1, "seconds": w - 5.0, "eval_seconds": 5.0})
    summary = {"seconds": sum(walls) + 20.0, "final_eval_seconds": 20.0}
    row = _train_seconds(tmp_path, summary)
    assert row["stalled_epochs"] == [{"epoch": 4, "seconds": 316.0, "median_seconds": 105.0}]
    assert row["recorded_train_seconds"] == summary["seconds"]
    assert row["train_seconds"] == pytest.approx(summary["seconds"] - (316.0 - 105.0))
    assert stalled_epochs(runs.read_jsonl(tmp_path / "metrics.jsonl")[:2]) == []  # too few epochs for a median
    steady = [{"epoch": i + 1, "seconds": w} for i, w in enumerate([100.0, 100.0 * STALL_FACTOR, 100.0])]
    assert stalled_epochs(steady) == []  # exactly STALL_FACTOR x the median is not a stall
    cost = gallery_wall_time([{"runs": [{"dir": str(tmp_path), **row}]}])
    assert cost["training_seconds"] == row["train_seconds"]
    assert cost["stalled_epochs"] == [{"run": tmp_path.name, **row["stalled_epochs"][0]}]


def test_a_groups_tables_name_no_path_of_this_machine(tmp_path, monkeypatch) -> None:
    from types import SimpleNamespace

    from layerlab.gallery.manifest import make_portable

    monkeypatch.chdir(tmp_path)
    root, data, figures = tmp_path / "runs-xyz", tmp_path / "data", tmp_path / "figs"
    group = figures / "01_freeze_study"
    (group / "fig_data").mkdir(parents=True)
    (group / "table.csv").write_text(f"model,dir\nAT,{root}/AT\n")
    (group / "fig_data" / "rows.json").write_text(f'{{"data": "{data}/cifar10"}}')
    (group / "plot.png").write_bytes(b"\x89PNG" + str(root).encode())
    make_portable(group, SimpleNamespace(root=root, data_dir=str(data), figures=figures))
    assert (group / "table.csv").read_text() == "model,dir\nAT,RUN_ROOT/AT\n"
    assert (group / "fig_data" / "rows.json").read_text() == '{"data": "$LAYERLAB_DATA/cifar10"}'
    assert (group / "plot.png").read_bytes() == b"\x89PNG" + str(root).encode()  # binary files are left alone


def test_the_gallery_evaluates_the_profiles_checkpoint_into_its_own_file(tmp_path, st_run):
    import shutil
    from types import SimpleNamespace

    from layerlab import runs
    from layerlab.gallery.results import evaluated
    from layerlab.gallery.settings import SETTINGS, FigureSettings

    assert SETTINGS["cpu"].eval_checkpoint == "last"  # where the experiments' claims read their evaluations
    run = tmp_path / "ST"
    shutil.copytree(st_run, run)
    ctx = SimpleNamespace(s=FigureSettings(eval_n=8, eval_checkpoint="last"), data_dir=None, progress=False)
    report = evaluated(ctx, run, ["natural", "pgd3"])
    assert report["checkpoint"] == "last" and report["n"] == 8 and set(report["results"]) == {"natural", "pgd3"}
    assert runs.read_json(run / "eval-last.json") == report and not (run / "eval.json").exists()
    assert evaluated(ctx, run, ["natural"]) == report  # nothing missing: nothing run again


def test_a_remade_group_drops_the_figures_it_no_longer_draws(tmp_path):
    from layerlab.gallery.manifest import drop_leftover_figures

    for name in ("kept.png", "renamed_since.png", "table.csv"):
        (tmp_path / name).write_text("x")
    assert drop_leftover_figures(tmp_path, {"fig": tmp_path / "kept.png"}) == ["renamed_since.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.png", "table.csv"]
