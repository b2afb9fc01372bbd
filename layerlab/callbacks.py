"""The trainer's callback protocol: hooks an instrument implements to observe training.

:func:`layerlab.train.train` calls them; instruments (:class:`layerlab.analysis.layer_stats.GradStats`, the
explorer's progress bar) subclass :class:`Callback` without importing the trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

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
