"""The trainer's callback protocol: hooks an instrument implements to observe training.

:func:`layerlab.train.train` calls them; instruments (:class:`layerlab.analysis.layer_stats.GradStats`, the
explorer's progress bar, the loggers of :mod:`layerlab.loggers`) subclass :class:`Callback` without importing the
trainer. Per epoch the trainer calls :meth:`Callback.on_epoch_end` of every callback first, then
:meth:`Callback.on_epoch_metrics` of every callback, so the numbers an instrument computes at the end of an epoch
(the per-block statistics of ``GradStats``) reach every callback in the same epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from layerlab.config import TrainConfig
    from layerlab.methods import Method


class Callback:
    """Observes training; every hook is optional. Used by the analysis instruments."""

    def on_train_start(self, model: nn.Module, method: Method, run_dir: Path, cfg: TrainConfig,
                       start_epoch: int) -> None:
        """Called once before the first epoch this process trains."""

    def before_step(self, model: nn.Module) -> None:
        """Called each step before the method's training step starts."""

    def after_backward(self, model: nn.Module) -> None:
        """Called each step after gradients (and any mask) exist, before the optimizer step."""

    def after_step(self, model: nn.Module) -> None:
        """Called each step after the method's training step returned (weights final, components restored)."""

    def on_epoch_end(self, epoch: int, model: nn.Module, run_dir: Path) -> None:
        """Called after an epoch's metrics are written (``epoch`` counts from 1)."""

    def on_epoch_metrics(self, epoch: int, metrics: dict[str, Any], blocks: dict[str, dict[str, float]]) -> None:
        """Called after every callback's :meth:`on_epoch_end` with the epoch's numbers: ``metrics`` is its
        ``metrics.jsonl`` row (``lr``, ``train_loss``, ``train_acc``, ``natural_acc``, ``robust_acc``, ``val_*``,
        ``seconds``, ...; ``robust_acc`` is None without per-epoch PGD) and ``blocks`` maps each trainable model
        part (``stem``, ``block1``, ..., ``head``) to its ``grad_mean_abs`` (mean |gradient| the optimizer saw,
        after any mask), ``updated_fraction`` (fraction of its entries a step changed, averaged over the epoch's
        steps) and ``updated_once_fraction`` (fraction changed at least once in the epoch), weighted by entries
        (:func:`layerlab.analysis.layer_stats.block_summary`); frozen parts
        are absent, and ``blocks`` is empty when the run records no gradient statistics (``grad_stats=False``)."""

    def on_train_end(self, run_dir: Path, summary: dict[str, Any]) -> None:
        """Called once when this process's training ends without error: ``summary`` is the run's
        ``summary.json`` (final and best test accuracy), or ``{"stopped_after": E, ...}`` when ``stop_after``
        ended the call before the last epoch."""
