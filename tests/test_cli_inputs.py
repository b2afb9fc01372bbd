"""Bad command-line inputs are refused before any work: one error line naming the fix, nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


from conftest import invoke, refused

# Tiny settings for the commands (the same sizes as tests/conftest.py's TINY).
TINY_ARGS = ["--profile", "smoke", "--epochs", "1", "--width", "0.0625", "--train-size", "64", "--test-size", "32",
             "--val-size", "16", "--eval-size", "16", "--batch-size", "32", "--attack-steps", "1",
             "--epoch-eval-steps", "1", "--eval-steps", "1", "--device", "cpu", "--no-progress"]


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_batch_size_zero_is_refused_and_nothing_is_written(tmp_path):
    line = refused(invoke("train", "--out", tmp_path / "run", *TINY_ARGS, "--batch-size", "0"))
    assert "--batch-size must be positive" in line and "got 0" in line
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("epochs", ["0", "-1"])
def test_epochs_below_one_are_refused_and_nothing_is_written(tmp_path, epochs):
    line = refused(invoke("train", "--out", tmp_path / "run", *TINY_ARGS, "--epochs", epochs))
    assert "--epochs must be positive" in line and f"got {epochs}" in line
    assert files_under(tmp_path) == []


def test_a_string_for_a_numeric_hyper_parameter_is_refused(tmp_path):
    line = refused(invoke("train", "--out", tmp_path / "run", *TINY_ARGS, "--method", "trades", "--arg", "beta=abc"))
    assert "beta must be a number" in line and "'abc'" in line and "--arg beta=" in line
    assert files_under(tmp_path) == []


def test_version_prints_the_package_version():
    from importlib.metadata import version

    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"layerlab {version('layerlab')}"


@pytest.mark.parametrize("command", [[], ["train"], ["freeze-study"], ["cka"], ["reproduce"], ["plot", "grads"]])
def test_on_off_options_are_shown_as_flags(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    text = invoke(*command, "--help").stdout
    assert "<bool>" not in text
    assert "--help" in text
    if command == ["train"]:
        assert "--download" in text and "--no-reinit" in text and "--resume" in text and "<int>" in text


def test_the_lock_file_is_removed_after_a_clean_run(tmp_path):
    result = invoke("train", "--out", tmp_path / "run", *TINY_ARGS, "--method", "st")
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no .run.lock beside it


def test_an_empty_image_folder_train_split_names_the_folder(tmp_path):
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "test" / "a").mkdir(parents=True)
    out = tmp_path / "runs" / "run"
    line = refused(invoke("train", "--out", out, *TINY_ARGS, "--dataset", f"folder:{data}"))
    assert f"{data / 'train'} has no class folders" in line and "<class>/" in line
    assert not any(p.is_file() for p in (tmp_path / "runs").rglob("*"))  # no files, no lock file


def test_eval_refuses_a_checkpoint_of_another_architecture(st_run, tmp_path):
    import torch

    from layerlab import runs
    from layerlab.models import build_model

    run = tmp_path / "ST"
    shutil.copytree(st_run, run)
    best = run / "checkpoints" / "best.pt"
    meta = {**torch.load(best, weights_only=True)["meta"], "model": "preactresnet18"}
    runs.save_checkpoint(best, build_model("preactresnet18", num_classes=meta["num_classes"], width=meta["width"]),
                         meta)
    before = files_under(run)
    line = refused(invoke("eval", "--run", run, "--n", "16", "--device", "cpu"))
    assert "holds a preactresnet18" in line and "resnet18" in line and "another run" in line
    assert files_under(run) == before and not (run / "eval.json").exists()


def test_resume_with_options_that_differ_from_the_run_is_refused(st_run, tmp_path, snapshot_files):
    run = tmp_path / "ST"
    shutil.copytree(st_run, run)
    before = snapshot_files(run)
    line = refused(invoke("train", "--out", run, "--resume", "--epochs", "3", "--lr", "0.5", "--no-progress"))
    assert f"cannot resume {run}" in line and "epochs: 1 vs 3" in line and "lr: 0.05 vs 0.5" in line
    assert "--overwrite" in line
    assert snapshot_files(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ST"]


def test_resume_without_options_continues_with_the_runs_own_settings(st_run, tmp_path):
    run = tmp_path / "ST"
    shutil.copytree(st_run, run)
    result = invoke("train", "--out", run, "--resume", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "st: natural" in result.stdout
