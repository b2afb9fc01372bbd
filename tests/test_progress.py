"""Progress of long operations: a header line when a run starts, bars with an ETA on stderr, nothing with
progress off, and results alone on stdout."""

from __future__ import annotations

import re

import pytest
import torch
from typer.testing import CliRunner

from conftest import train_tiny_cnn
from layerlab import evaluation as ev
from layerlab.analysis.corruptions import evaluate_corruptions
from layerlab.analysis.minimum import bisection_min_eps
from layerlab.cli import app
from layerlab.config import TrainConfig, make_config, profile_of
from layerlab.data import load_splits, to_float
from layerlab.train import train

# A tqdm bar: "DESC: ... N/TOTAL [elapsed<remaining, rate]" (remaining is "?" until a rate is known).
ETA = r"\d+/{total} \[\d\d:\d\d<(\d\d:\d\d|\?)"


def bars(err: str) -> list[str]:
    """The distinct bar states and lines written to stderr (tqdm redraws a line with carriage returns)."""
    return [part.strip() for part in re.split(r"[\r\n]", err) if part.strip()]


def has_bar(err: str, desc: str, total: int) -> bool:
    return any(line.startswith(f"{desc}:") and re.search(ETA.format(total=total), line) for line in bars(err))


@pytest.fixture(scope="module")
def tiny_model():
    s = load_splits("digits", train_size=300, test_size=40, val_size=0)
    return train_tiny_cnn(to_float(s.train.images), s.train.labels), to_float(s.test.images), s.test.labels


def test_profile_of_names_the_profile_and_what_was_changed():
    assert profile_of(make_config("tiny")) == "tiny"
    assert profile_of(make_config("smoke", epochs=2, lr=0.05)) == "smoke (changed: epochs)"  # lr is not smoke's
    assert profile_of(make_config("cpu", dataset="cifar100", width=0.5)) == "cpu (changed: dataset, width)"
    assert profile_of(TrainConfig()) == "paper (changed: keep_every)"  # the defaults are the papers' settings
    assert profile_of(make_config("smoke", width=0.3, epochs=9, train_size=10, val_size=5, test_size=7,
                                  eval_size=3, attack_steps=1)) == "custom"


def test_a_run_starts_with_a_header_and_shows_every_phase(tiny_cfg, digits_splits, tmp_path, capsys):
    cfg = tiny_cfg(method="at", epochs=2)
    run_dir = tmp_path / "run"
    train(cfg, run_dir, progress=True, splits=digits_splits, stop_after=1)
    out, err = capsys.readouterr()
    assert out == ""
    assert bars(err)[0] == (f"train at resnet18 (width 0.0625) on digits (64 train / 32 test), 2 epochs, "
                            f"profile custom -> {run_dir} on cpu")
    assert has_bar(err, "epoch 1/2", 2) and has_bar(err, "epoch 1 test", 1) and has_bar(err, "epoch 1 val", 1)
    summary = train(cfg, run_dir, progress=True, splits=digits_splits, resume=True)
    out, err = capsys.readouterr()
    assert out == "" and bars(err)[0].startswith("resume at resnet18 (width 0.0625) on digits")
    assert "from epoch 2 of 2" in bars(err)[0]
    assert has_bar(err, "at run", 1)  # the epochs of this process
    assert has_bar(err, "test PGD-2 (last model)", 1)
    assert has_bar(err, f"test PGD-2 (best, epoch {summary['best_epoch']} model)", 1)
    train(cfg, tmp_path / "quiet", progress=False, splits=digits_splits)
    assert capsys.readouterr() == ("", "")


def test_attack_suite_corruptions_and_bisection_show_bars(tiny_model, capsys):
    model, x, y = tiny_model
    ev.evaluate_model(model, x, y, ["fgsm", "pgd2", "eps-sweep"], eps=8 / 255, sweep_255=[2, 8], batch_size=16,
                      progress=True)
    err = capsys.readouterr().err
    assert has_bar(err, "attacks", 4)  # natural first, then the three asked for
    for name in ("natural", "fgsm", "pgd2", "pgd20@2/255", "pgd20@8/255"):
        assert has_bar(err, name, 3), name  # 40 images in batches of 16
    evaluate_corruptions(model, (x[:8] * 255).to(torch.uint8), y[:8], types=["contrast", "brightness"],
                         severities=[1, 5], progress=True)
    assert has_bar(capsys.readouterr().err, "corruptions", 4)
    bisection_min_eps(model, x[:4], y[:4], iters=3, steps=2, progress=True)
    assert has_bar(capsys.readouterr().err, "bisection", 3)
    ev.evaluate_model(model, x, y, ["fgsm"], eps=8 / 255)
    evaluate_corruptions(model, (x[:8] * 255).to(torch.uint8), y[:8], types=["contrast"], severities=[1])
    assert capsys.readouterr() == ("", "")  # progress is off unless asked for


def test_eval_cli_keeps_bars_on_stderr_and_results_on_stdout(st_run, tmp_path):
    import shutil

    run = tmp_path / "st"
    shutil.copytree(st_run, run)
    result = CliRunner().invoke(app, ["eval", "--run", str(run), "--attacks", "natural,fgsm", "--n", "8",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert has_bar(result.stderr, "attacks", 2) and has_bar(result.stderr, "fgsm", 1)
    assert "it/s" not in result.stdout and "attacks:" not in result.stdout
    assert re.search(r"^fgsm\s+\d+\.\d\d%$", result.stdout, re.M)
    quiet = CliRunner().invoke(app, ["eval", "--run", str(run), "--attacks", "natural", "--n", "8", "--device",
                                     "cpu", "--no-progress"])
    assert quiet.exit_code == 0 and quiet.stderr == ""
