"""Training loggers: callbacks that send each epoch's numbers to CSV, TensorBoard or Weights & Biases.

A logger is a :class:`~layerlab.callbacks.Callback` fed by the trainer's ``on_epoch_metrics`` hook: per epoch it
receives the ``metrics.jsonl`` row and the per-block gradient / updated-entry statistics, flattened by
:func:`scalars` into one ``{tag: value}`` mapping:

* ``metrics/KEY`` for every number of the row (``metrics/natural_acc``, ``metrics/robust_acc``,
  ``metrics/train_loss``, ``metrics/lr``, ``metrics/seconds``, ...);
* ``grad_mean_abs/BLOCK``, ``updated_fraction/BLOCK`` and ``updated_once_fraction/BLOCK`` for every trainable
  block (``stem``, ``block1``, ..., ``head``): the mean |gradient| the optimizer saw (after any mask, e.g.
  CURE's), the fraction of the block's entries a step changed (averaged over the epoch's steps) and the fraction
  changed at least once in the epoch (:func:`layerlab.analysis.layer_stats.block_summary`);

and at the end of training ``final/KEY`` and ``best/KEY`` (test accuracies of the last and the best model).

``layerlab train --logger csv --logger tensorboard`` (or ``train(cfg, out, callbacks=loggers(["csv"]))``) writes
into the run directory: ``RUN/log.csv`` (one row per epoch, one column per tag), ``RUN/tensorboard/`` (event
files: ``tensorboard --logdir RUN``), ``RUN/wandb/`` (a W&B run, online when logged in, offline with
``WANDB_MODE=offline`` and synced later with ``wandb sync``). A resumed run drops what it logged after its
checkpoint, as ``metrics.jsonl`` does.

Writing one's own: subclass :class:`Logger` and implement :meth:`Logger.log` (and :meth:`Logger.start` /
:meth:`Logger.close` when it holds a file or a connection); pass an instance in ``callbacks``. Optional packages
are imported when a logger is created, so a missing one fails before any training with the install command.
"""

from __future__ import annotations

import abc
import csv
import hashlib
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from layerlab.callbacks import Callback

LOG_CSV = "log.csv"
TENSORBOARD_DIR = "tensorboard"
WANDB_PROJECT = "layerlab"
SUMMARY_KEYS = ("natural_acc", "robust_acc", "nrr")  # the final/best numbers logged at the end of training


def scalars(metrics: dict[str, Any], blocks: dict[str, dict[str, float]]) -> dict[str, float]:
    """One epoch's numbers as ``{tag: value}`` (see the module docstring); missing values (None, NaN) and the
    epoch number itself are left out."""
    out = {f"metrics/{k}": float(v) for k, v in metrics.items()
           if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    for block, stats in blocks.items():
        for stat, value in stats.items():
            out[f"{stat}/{block}"] = float(value)
    return {k: v for k, v in out.items() if math.isfinite(v)}


def summary_scalars(summary: dict[str, Any]) -> dict[str, float]:
    """``final/KEY`` and ``best/KEY`` test numbers of a run's ``summary.json`` (empty for a stopped run)."""
    out = {f"final/{k}": float(summary[k]) for k in SUMMARY_KEYS if summary.get(k) is not None}
    out.update({f"best/{k}": float(v) for k, v in (summary.get("best") or {}).items()
                if k in SUMMARY_KEYS and v is not None})
    return out


class Logger(Callback, abc.ABC):
    """Base of the loggers: turns the trainer's hooks into :meth:`start`, :meth:`log` and :meth:`close`."""

    def on_train_start(self, model, method, run_dir: Path, cfg, start_epoch: int) -> None:
        self.start(Path(run_dir), cfg.to_dict(), start_epoch)

    def on_epoch_metrics(self, epoch: int, metrics: dict[str, Any], blocks: dict[str, dict[str, float]]) -> None:
        self.log(epoch, scalars(metrics, blocks))

    def on_train_end(self, run_dir: Path, summary: dict[str, Any]) -> None:
        final = summary_scalars(summary)
        if final:
            self.log(int(summary["epochs"]), final)
        self.close()

    def start(self, run_dir: Path, config: dict[str, Any], start_epoch: int) -> None:
        """Open the output for run directory ``run_dir`` trained with ``config``; a resumed run starts after
        epoch ``start_epoch`` (drop anything logged for later epochs)."""

    @abc.abstractmethod
    def log(self, epoch: int, values: dict[str, float]) -> None:
        """Record ``values`` (``{tag: number}``) at step ``epoch`` (1-based); every logger defines it."""

    def close(self) -> None:
        """Flush and release the output."""


class CSVLogger(Logger):
    """``RUN/log.csv``: one row per epoch, one column per tag (the final/best numbers join the last epoch's row)."""

    def __init__(self, filename: str = LOG_CSV) -> None:
        self.filename = filename
        self.path: Path | None = None
        self.rows: list[dict[str, Any]] = []

    def start(self, run_dir: Path, config: dict[str, Any], start_epoch: int) -> None:
        self.path = run_dir / self.filename
        self.rows = []
        if self.path.exists():
            with open(self.path, newline="") as fh:
                self.rows = [r for r in csv.DictReader(fh) if int(r["epoch"]) <= start_epoch]
            self._write()

    def log(self, epoch: int, values: dict[str, float]) -> None:
        if self.rows and int(self.rows[-1]["epoch"]) == epoch:
            self.rows[-1].update(values)
        else:
            self.rows.append({"epoch": epoch, **values})
        self._write()

    def _write(self) -> None:
        """Rewrite the file: a tag first seen late (``final/...``) still gets its column."""
        columns = list(dict.fromkeys(k for row in self.rows for k in row)) or ["epoch"]
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)


class TensorBoardLogger(Logger):
    """``RUN/tensorboard/``: TensorBoard event files (``tensorboard --logdir RUN``), the config as text."""

    INSTALL = "the tensorboard logger needs TensorBoard: pip install tensorboard (or 'layerlab[loggers]')"

    def __init__(self, subdir: str = TENSORBOARD_DIR) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RuntimeError(self.INSTALL) from None
        self._writer_class = SummaryWriter
        self.subdir = subdir
        self.writer = None

    def start(self, run_dir: Path, config: dict[str, Any], start_epoch: int) -> None:
        # purge_step: TensorBoard hides what an interrupted earlier process logged after the resumed epoch.
        self.writer = self._writer_class(log_dir=str(run_dir / self.subdir), purge_step=start_epoch + 1)
        if start_epoch == 0:
            self.writer.add_text("config", "\n".join(f"    {k}: {v!r}" for k, v in config.items()))

    def log(self, epoch: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()  # once per epoch: a killed run keeps every finished epoch

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbLogger(Logger):
    """A Weights & Biases run in ``RUN/wandb/`` named after the run directory, its config as the W&B config.
    ``mode``: ``online``, ``offline`` (no network; ``wandb sync RUN/wandb/offline-run-*`` later) or None for
    wandb's own choice (``WANDB_MODE``, else online)."""

    INSTALL = ("the wandb logger needs Weights & Biases: pip install wandb (offline without an account: "
               "WANDB_MODE=offline)")

    def __init__(self, project: str = WANDB_PROJECT, mode: str | None = None) -> None:
        try:
            import wandb
        except ImportError:
            raise RuntimeError(self.INSTALL) from None
        self._wandb = wandb
        self.project, self.mode = project, mode
        self.run = None

    def start(self, run_dir: Path, config: dict[str, Any], start_epoch: int) -> None:
        # The run id comes from the directory, so a resumed training continues the same W&B run.
        digest = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:10]
        run_id = "".join(c if c.isalnum() else "-" for c in run_dir.name)[:40] + "-" + digest
        self.run = self._wandb.init(project=self.project, name=run_dir.name, id=run_id, resume="allow",
                                    dir=str(run_dir), config=config, mode=self.mode)
        self.run.define_metric("*", step_metric="epoch")  # charts over epochs, each call committed at once

    def log(self, epoch: int, values: dict[str, float]) -> None:
        self.run.log({"epoch": epoch, **values})

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


LOGGERS: dict[str, tuple[Callable[[], Logger], str]] = {
    "csv": (CSVLogger, f"RUN/{LOG_CSV}: one row per epoch"),
    "tensorboard": (TensorBoardLogger, f"RUN/{TENSORBOARD_DIR}/: event files (pip install tensorboard)"),
    "wandb": (WandbLogger, "RUN/wandb/: a W&B run (pip install wandb; WANDB_MODE=offline without an account)"),
}


def loggers(names: Sequence[str]) -> list[Logger]:
    """The loggers named (``csv``, ``tensorboard``, ``wandb``; comma-separated names are split), created now so
    an unknown name or a missing package fails before any work."""
    wanted = list(dict.fromkeys(n.strip() for name in names for n in name.split(",") if n.strip()))
    unknown = [n for n in wanted if n not in LOGGERS]
    if unknown:
        raise ValueError(f"unknown logger {unknown[0]!r}; use {', '.join(LOGGERS)} (repeat --logger for several)")
    return [LOGGERS[n][0]() for n in wanted]
