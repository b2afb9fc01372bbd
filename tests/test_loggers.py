"""The trainer's per-epoch metrics hook and the loggers it feeds (CSV, TensorBoard, W&B)."""

from __future__ import annotations

import csv
import sys

import pytest
from typer.testing import CliRunner

from layerlab import runs
from layerlab.analysis.layer_stats import STATS_FILE, block_gradients, block_summary, read_layer_stats
from layerlab.callbacks import Callback
from layerlab.cli import app
from layerlab.loggers import CSVLogger, TensorBoardLogger, WandbLogger, loggers, scalars
from layerlab.train import train


class _Recorder(Callback):
    """Keeps what the metrics hooks receive."""

    def __init__(self):
        self.epochs: list[tuple[int, dict, dict]] = []
        self.ended: list[dict] = []

    def on_epoch_metrics(self, epoch, metrics, blocks):
        self.epochs.append((epoch, dict(metrics), {b: dict(v) for b, v in blocks.items()}))

    def on_train_end(self, run_dir, summary):
        self.ended.append(summary)


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_callback_receives_each_epochs_metrics_and_block_statistics(tiny_cfg, digits_splits, tmp_path):
    spy = _Recorder()
    run_dir = tmp_path / "run"
    summary = train(tiny_cfg(method="at", epochs=2, update="34"), run_dir, progress=False, splits=digits_splits,
                    callbacks=[spy])
    assert [e for e, _, _ in spy.epochs] == [1, 2]
    assert [m for _, m, _ in spy.epochs] == runs.read_jsonl(run_dir / "metrics.jsonl")
    assert spy.ended == [summary] == [runs.read_json(run_dir / "summary.json")]
    # blocks: the trainable parts only (update 34 freezes the others), each the numel-weighted mean of
    # its tensors in layer_stats.jsonl, as the pandas aggregation of the plots computes it
    stats = read_layer_stats(run_dir / STATS_FILE)
    by_block = block_gradients(stats)
    for epoch, _, blocks in spy.epochs:
        assert list(blocks) == ["block3", "block4"]
        rows = stats[stats["epoch"] == epoch]
        for block, values in blocks.items():
            expected = by_block[(by_block["epoch"] == epoch) & (by_block["block"] == block)]["grad_mean_abs"].item()
            assert values["grad_mean_abs"] == pytest.approx(expected, rel=1e-12) and expected > 0
            part = rows[rows["block"] == block]
            updated = (part["updated_fraction"] * part["numel"]).sum() / part["numel"].sum()
            assert values["updated_fraction"] == pytest.approx(updated, rel=1e-12) and 0 < updated <= 1
            assert updated <= values["updated_once_fraction"] <= 1  # changed at least once >= changed per step
    # without gradient statistics the hook still gets the metrics, with no blocks
    quiet = _Recorder()
    train(tiny_cfg(grad_stats=False), tmp_path / "nostats", progress=False, splits=digits_splits, callbacks=[quiet])
    assert [(e, b) for e, _, b in quiet.epochs] == [(1, {})]


def test_block_statistics_show_cures_gradient_mask(tiny_cfg, digits_splits, tmp_path):
    """CURE's RGP mask holds p = 30% of every conv weight tensor (the head is a Linear, unmasked): the blocks'
    updated fraction drops to about 70% (their BatchNorm entries stay updated), while plain AT updates everything."""
    seen = {}
    for method, args in (("at", {}), ("cure", {"p": 30})):
        spy = _Recorder()
        train(tiny_cfg(method=method, method_args=args), tmp_path / method, progress=False, splits=digits_splits,
              callbacks=[spy])
        seen[method] = {block: v["updated_fraction"] for block, v in spy.epochs[-1][2].items()}
    assert all(f > 0.99 for f in seen["at"].values())
    assert all(0.69 < seen["cure"][b] < 0.75 for b in ("stem", "block1", "block2", "block3", "block4"))
    assert seen["cure"]["head"] > 0.99


def test_scalars_flatten_metrics_and_blocks_and_drop_missing_values():
    metrics = {"epoch": 3, "lr": 0.1, "natural_acc": 50.0, "robust_acc": None, "val_robust_acc": float("nan")}
    blocks = {"block2": {"grad_mean_abs": 0.5, "updated_fraction": 0.25}}
    assert scalars(metrics, blocks) == {"metrics/lr": 0.1, "metrics/natural_acc": 50.0,
                                        "grad_mean_abs/block2": 0.5, "updated_fraction/block2": 0.25}


def test_csv_and_tensorboard_loggers_write_every_epoch(tiny_cfg, digits_splits, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run_dir = tmp_path / "run"
    cfg = tiny_cfg(method="at", epochs=2)
    train(cfg, run_dir, progress=False, splits=digits_splits, callbacks=loggers(["csv,tensorboard"]), stop_after=1)
    summary = train(cfg, run_dir, progress=False, splits=digits_splits, resume=True,
                    callbacks=loggers(["csv", "tensorboard"]))
    metrics = runs.read_jsonl(run_dir / "metrics.jsonl")
    stats = runs.read_jsonl(run_dir / STATS_FILE)
    blocks = {e: block_summary([r for r in stats if r["epoch"] == e]) for e in (1, 2)}

    rows = _read_csv(run_dir / "log.csv")  # one row per epoch, also across the resume
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row, m in zip(rows, metrics):
        assert float(row["metrics/natural_acc"]) == m["natural_acc"]
        assert float(row["metrics/robust_acc"]) == m["robust_acc"]
        assert float(row["grad_mean_abs/block1"]) == blocks[m["epoch"]]["block1"]["grad_mean_abs"]
    assert float(rows[-1]["final/robust_acc"]) == summary["robust_acc"]
    assert float(rows[-1]["best/nrr"]) == summary["best"]["nrr"]
    assert rows[0]["final/robust_acc"] == ""

    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"metrics/natural_acc", "metrics/train_loss", "grad_mean_abs/stem", "updated_fraction/head",
            "final/natural_acc", "best/robust_acc"} <= tags
    nat = acc.Scalars("metrics/natural_acc")
    assert [e.step for e in nat] == [1, 2]
    assert [e.value for e in nat] == pytest.approx([m["natural_acc"] for m in metrics])
    upd = acc.Scalars("updated_fraction/block4")
    assert [e.value for e in upd] == pytest.approx([blocks[e]["block4"]["updated_fraction"] for e in (1, 2)])
    assert [(e.step, e.value) for e in acc.Scalars("final/nrr")] == [(2, pytest.approx(summary["nrr"]))]


def test_unknown_or_missing_loggers_are_refused_before_any_work(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown logger 'mlflow'; use csv, tensorboard, wandb"):
        loggers(["csv", "mlflow"])
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if TensorBoard were not installed
    with pytest.raises(RuntimeError, match=r"pip install tensorboard"):
        TensorBoardLogger()
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(RuntimeError, match=r"pip install wandb.*WANDB_MODE=offline"):
        WandbLogger()
    for name, fix in (("mlflow", "use csv, tensorboard, wandb"), ("tensorboard", "pip install tensorboard")):
        out = tmp_path / name
        result = CliRunner().invoke(app, ["train", "--out", str(out), "--profile", "tiny", "--logger", name])
        assert result.exit_code == 2 and result.stdout == ""
        assert [line for line in result.stderr.splitlines() if line.strip()] == [f"error: {result.stderr.strip()[7:]}"]
        assert fix in result.stderr and not out.exists()


def test_wandb_logger_offline(tiny_cfg, digits_splits, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")

    class Seen(WandbLogger):
        """Reads back from the live W&B run what each log call left in its summary."""
        seen: list[dict] = []

        def log(self, epoch, values):
            super().log(epoch, values)
            self.seen.append({k: self.run.summary[k] for k in values})

    summary = train(tiny_cfg(method="at", epochs=2), tmp_path / "run", progress=False, splits=digits_splits,
                    callbacks=[Seen()])
    offline = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))  # for `wandb sync` later
    metrics = runs.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [s["metrics/natural_acc"] for s in Seen.seen[:2]] == [m["natural_acc"] for m in metrics]
    assert Seen.seen[0]["grad_mean_abs/stem"] > 0
    assert Seen.seen[2] == {"final/natural_acc": summary["natural_acc"], "final/robust_acc": summary["robust_acc"],
                            "final/nrr": summary["nrr"], **{f"best/{k}": summary["best"][k]
                                                            for k in ("natural_acc", "robust_acc", "nrr")}}


def test_csv_logger_alone_needs_no_package(tmp_path):
    logger = CSVLogger()
    logger.start(tmp_path, {}, 0)
    logger.log(1, {"metrics/a": 1.0})
    logger.log(2, {"metrics/a": 2.0, "grad_mean_abs/stem": 0.5})
    logger.log(2, {"final/nrr": 9.0})
    assert _read_csv(tmp_path / "log.csv") == [
        {"epoch": "1", "metrics/a": "1.0", "grad_mean_abs/stem": "", "final/nrr": ""},
        {"epoch": "2", "metrics/a": "2.0", "grad_mean_abs/stem": "0.5", "final/nrr": "9.0"}]
    logger.start(tmp_path, {}, 1)  # a run resumed after epoch 1 drops the later rows
    assert [r["epoch"] for r in _read_csv(tmp_path / "log.csv")] == ["1"]


def test_a_logger_must_say_how_it_logs():
    from layerlab.loggers import Logger

    class Silent(Logger):
        pass

    with pytest.raises(TypeError, match="abstract"):
        Silent()
