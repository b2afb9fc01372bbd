"""Run records (layerlab.records): export/restore round trips, retraining a record in place, and the waits of
studies that share a run root."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from layerlab import runs
from layerlab.analysis.lsc import recorded_epoch_checkpoints
from layerlab.records import MARKER, export_records, is_record, materialize, restore_records
from layerlab.study import run_or_reuse


@pytest.fixture()
def recorded(tmp_path, st_run):
    """A records directory holding the tiny ST run plus an analysis file computed on it."""
    root = tmp_path / "root"
    shutil.copytree(st_run, root / "ST")
    runs.write_json(root / "ST" / "eval.json", {"checkpoint": "best", "n": 32, "results": {}})
    (root / "analysis").mkdir()
    runs.write_json(root / "analysis" / "minpert.json", {"models": []})
    names = export_records(root, tmp_path / "records")
    assert names == ["ST"]
    return tmp_path / "records"


def test_export_copies_results_never_checkpoints(recorded):
    files = sorted(p.name for p in (recorded / "ST").iterdir())
    assert {"config.json", "summary.json", "metrics.jsonl", "eval.json"} <= set(files)
    assert not any(p.suffix == ".pt" for p in recorded.rglob("*"))
    assert (recorded / "analysis" / "minpert.json").exists()


def test_restored_record_is_reused_without_training(recorded, tmp_path, tiny_cfg, digits_splits):
    root = tmp_path / "fresh"
    assert restore_records(recorded, root) == ["ST"]
    assert is_record(root / "ST") and (root / "ST" / MARKER).exists()
    assert (root / "analysis" / "minpert.json").exists()
    summary = run_or_reuse(tiny_cfg(method="st"), root / "ST", overwrite=False, progress=False, splits=digits_splits)
    assert summary == runs.read_json(recorded / "ST" / "summary.json")
    assert not (root / "ST" / "checkpoints").exists()  # re-used as recorded: nothing was trained


def test_restore_never_touches_an_existing_run(recorded, tmp_path, st_run, snapshot_files):
    root = tmp_path / "root2"
    shutil.copytree(st_run, root / "ST")
    (root / "ST" / "summary.json").unlink()  # an interrupted run: resume, not a record, must continue it
    before = snapshot_files(root / "ST")
    assert restore_records(recorded, root) == []
    assert snapshot_files(root / "ST") == before


def test_materialize_reproduces_the_record_and_keeps_its_analyses(recorded, tmp_path):
    root = tmp_path / "fresh"
    restore_records(recorded, root)
    check = materialize(root / "ST", progress=False, log=None)
    assert check["identical"], check  # training is deterministic: the same weights, the same summary
    assert (root / "ST" / "checkpoints" / "best.pt").exists() and not is_record(root / "ST")
    assert runs.read_json(root / "ST" / "eval.json") == runs.read_json(recorded / "ST" / "eval.json")
    assert runs.read_json(root / "ST" / "reproduced.json")["identical"] is True
    recorded_seconds = runs.read_json(recorded / "ST" / "summary.json")["seconds"]
    assert runs.analysis_costs(root / "ST") == {"training (the record retrained from)": recorded_seconds}
    assert not (root / "ST.record").exists() and not (root / "ST" / MARKER).exists()
    assert materialize(root / "ST", progress=False, log=None) == {}  # a run with weights is left alone


def test_a_run_starting_from_a_record_retrains_the_record_first(recorded, tmp_path, tiny_cfg, digits_splits):
    root = tmp_path / "fresh"
    restore_records(recorded, root)
    init = str(root / "ST" / "checkpoints" / "best.pt")
    cfg = tiny_cfg(method="at", init=init, update="2")
    summary = run_or_reuse(cfg, root / "U-2", overwrite=False, progress=False, splits=digits_splits)
    assert summary["method"] == "at" and (root / "ST" / "checkpoints" / "best.pt").exists()
    assert runs.read_json(root / "ST" / "reproduced.json")["identical"] is True


def test_failed_retraining_puts_the_record_back(recorded, tmp_path, snapshot_files):
    root = tmp_path / "fresh"
    restore_records(recorded, root)
    saved = runs.read_json(root / "ST" / "config.json")
    saved["config"]["dataset"] = f"folder:{tmp_path / 'missing'}"  # the data it needs is gone
    runs.write_json(root / "ST" / "config.json", saved)
    before = snapshot_files(root / "ST")
    with pytest.raises(FileNotFoundError):
        materialize(root / "ST", progress=False, log=None)
    assert snapshot_files(root / "ST") == before and is_record(root / "ST")


def test_export_skips_runs_being_trained_or_set_aside(tmp_path, st_run):
    root = tmp_path / "root"
    shutil.copytree(st_run, root / "ST")
    shutil.copytree(st_run, root / "ST.record")  # a record waiting aside while its run retrains
    with runs.run_lock(root / "ST"):
        assert export_records(root, tmp_path / "rec") == []
    assert export_records(root, tmp_path / "rec") == ["ST"]


def test_export_names_a_missing_run_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_records(tmp_path / "nowhere", tmp_path / "rec")


def test_a_study_waits_for_the_process_training_its_run(tmp_path, st_run, tiny_cfg, digits_splits):
    """Two studies share a run root: the second waits for the first's run instead of failing, then re-uses it."""
    root = tmp_path / "root"
    shutil.copytree(st_run, root / "ST")
    code = (f"import time; from layerlab import runs\nwith runs.run_lock({str(root / 'ST')!r}):\n"
            f" print('locked', flush=True); time.sleep(3)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert runs.is_locked(root / "ST")
        start = time.monotonic()
        summary = run_or_reuse(tiny_cfg(method="st"), root / "ST", overwrite=False, progress=False,
                               splits=digits_splits)
        assert time.monotonic() - start > 1.0  # it waited for the holder
        assert summary == runs.read_json(st_run / "summary.json")
    finally:
        holder.kill()
        holder.wait()
    assert not runs.is_locked(root / "ST")


def test_recorded_epoch_checkpoints_follow_the_config(tmp_path):
    runs.write_json(tmp_path / "config.json", {"config": {"keep_every": 2, "epochs": 7}})
    assert [p.name for p in recorded_epoch_checkpoints(tmp_path)] == ["epoch-2.pt", "epoch-4.pt", "epoch-6.pt"]
    runs.write_json(tmp_path / "config.json", {"config": {"keep_every": 0, "epochs": 7}})
    assert recorded_epoch_checkpoints(tmp_path) == []


def test_records_cli_round_trip(tmp_path, st_run):
    from typer.testing import CliRunner

    from layerlab.cli import app

    root = tmp_path / "root"
    shutil.copytree(st_run, root / "ST")
    cli = CliRunner()
    out = cli.invoke(app, ["records", "export", "--runs", str(root), "--to", str(tmp_path / "rec")])
    assert out.exit_code == 0 and "exported 1 runs" in out.output
    out = cli.invoke(app, ["records", "restore", "--from", str(tmp_path / "rec"), "--runs", str(tmp_path / "new")])
    assert out.exit_code == 0 and "restored 1 runs" in out.output and is_record(tmp_path / "new" / "ST")
    out = cli.invoke(app, ["records", "restore", "--from", str(tmp_path / "nope"), "--runs", str(tmp_path / "x")])
    assert out.exit_code == 2 and "does not exist" in out.output


def test_a_second_process_waits_for_an_analysis_instead_of_repeating_it(tmp_path, st_run):
    """Two gallery workers ask for the same run's CKA: the second waits for the first's result and re-uses it
    (nothing computed, no cost logged twice)."""
    from layerlab.gallery import context
    from layerlab.gallery.results import cka_result

    root = tmp_path / "root"
    shutil.copytree(st_run, root / "ST")
    ctx = context("smoke", root, tmp_path / "figures", progress=False)
    n = ctx.s.cka_n if ctx.cfg.test_size is None else min(ctx.s.cka_n, ctx.cfg.test_size)
    result = {"mode": "nat-vs-adv", "n": n, "checkpoint": "best", "made_by": "holder"}
    code = (f"import time; from layerlab import runs\nwith runs.analysis_lock({str(root / 'ST')!r}, 'cka'):\n"
            f" print('locked', flush=True); time.sleep(3)\n"
            f" runs.write_json({str(root / 'ST' / 'cka.json')!r}, {result!r})")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        path = cka_result(ctx, root / "ST")
        assert time.monotonic() - start > 1.0  # it waited for the holder
    finally:
        holder.kill()
        holder.wait()
    assert runs.read_json(path)["made_by"] == "holder"
    assert not (root / "ST" / runs.COSTS).exists()
    assert not list((root / "ST").glob("*.lock"))  # the lock sits beside the run, never in its records


def test_records_hold_the_run_root_as_a_token_not_a_machine_path(tmp_path):
    root, other = tmp_path / "root", tmp_path / "elsewhere"
    run = root / "CURE"
    run.mkdir(parents=True)
    runs.write_json(run / "config.json", {"config": {"init": str(root / "ST" / "checkpoints" / "best.pt")}})
    runs.write_json(run / "summary.json", {"natural_acc": 1.0})
    assert export_records(root, tmp_path / "rec") == ["CURE"]
    exported = (tmp_path / "rec" / "CURE" / "config.json").read_text()
    assert str(tmp_path) not in exported and "RUN_ROOT/ST/checkpoints/best.pt" in exported
    assert restore_records(tmp_path / "rec", other) == ["CURE"]
    restored = runs.read_json(other / "CURE" / "config.json")["config"]["init"]
    assert restored == str((other / "ST" / "checkpoints" / "best.pt").resolve())


def test_the_run_lock_file_is_removed_by_its_holder(tmp_path):
    with runs.run_lock(tmp_path / "run"):
        assert runs.is_locked(tmp_path / "run") and (tmp_path / ".run.lock").exists()
    assert not (tmp_path / ".run.lock").exists() and not runs.is_locked(tmp_path / "run")
    with pytest.raises(RuntimeError), runs.run_lock(tmp_path / "run"):
        raise RuntimeError("failed")
    assert list(tmp_path.iterdir()) == []


def test_a_run_started_from_a_run_trained_again_since_is_told_apart(tmp_path, st_run, tiny_cfg, digits_splits,
                                                                     snapshot_files):
    from layerlab.experiments import Experiment, RunSpec, StaleRunError, check_inits
    from layerlab.train import train

    root = tmp_path / "root"
    shutil.copytree(st_run, root / "ST")
    train(tiny_cfg(method="at", init=str(root / "ST" / "checkpoints" / "best.pt"), update="2"), root / "U-2",
          progress=False, splits=digits_splits)
    assert runs.read_json(root / "U-2" / "config.json")["init_identity"] == runs.run_identity(root / "ST")
    assert not runs.init_changed(root / "U-2")
    export_records(root, tmp_path / "records")
    exp = Experiment("t", "?", "tiny", (RunSpec("ST"), RunSpec("U-2", init="ST")))
    check_inits(exp, root, exp.specs)  # nothing changed: no error

    # ST trained again with another outcome: U-2 no longer started from it
    summary = runs.read_json(root / "ST" / "summary.json")
    runs.write_json(root / "ST" / "summary.json", {**summary, "natural_acc": summary["natural_acc"] + 1.0})
    assert runs.init_changed(root / "U-2")
    with pytest.raises(StaleRunError, match="U-2 .* started from an earlier training"):
        check_inits(exp, root, exp.specs)

    # a records store holding that U-2 does not restore it beside the new ST
    fresh = tmp_path / "fresh"
    shutil.copytree(root / "ST", fresh / "ST")
    before = snapshot_files(fresh)
    said = []
    assert restore_records(tmp_path / "records", fresh, log=said.append) == []
    assert snapshot_files(fresh) == before and said and "U-2" in said[0]
    # beside the ST it started from, it is restored
    assert restore_records(tmp_path / "records", tmp_path / "empty", log=None) == ["ST", "U-2"]
    # a record that does not say which training of ST it started from: only restored together with its ST
    saved = runs.read_json(tmp_path / "records" / "U-2" / "config.json")
    del saved["init_identity"]
    runs.write_json(tmp_path / "records" / "U-2" / "config.json", saved)
    said.clear()
    assert restore_records(tmp_path / "records", fresh, log=said.append) == [] and "does not record" in said[0]
    assert restore_records(tmp_path / "records", tmp_path / "empty2", log=None) == ["ST", "U-2"]


def test_a_record_reached_through_a_link_is_retrained_and_locked_where_it_is(recorded, tmp_path):
    real, linked = tmp_path / "real", tmp_path / "linked"
    restore_records(recorded, real, log=None)
    linked.mkdir()
    (linked / "ST").symlink_to(real / "ST", target_is_directory=True)
    assert runs._lock_path(linked / "ST") == runs._lock_path(real / "ST")
    assert materialize(linked / "ST", progress=False, log=None)["identical"]
    assert (linked / "ST").is_symlink() and (real / "ST" / "checkpoints" / "best.pt").exists()
    assert not (real / "ST.record").exists() and not (linked / "ST.record").exists()
