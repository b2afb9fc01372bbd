"""Per-layer gradient statistics and updated-entry fractions during training (CURE Fig. 6a, 6b, 10).

:class:`GradStats` is a trainer :class:`~layerlab.callbacks.Callback` (on by default through
``TrainConfig.grad_stats``) that records, per trainable parameter tensor and epoch:

* ``grad_mean_abs``: mean |gradient| the optimizer sees (after any component masked it),
  averaged over the epoch's steps;
* ``updated_fraction``: the fraction of entries whose value changed during the step, averaged
  over the epoch's steps;
* ``updated_once_fraction``: the fraction of entries whose value changed in at least one step of the epoch (a mask
  that keeps a fixed share of entries each step updates that share per step, but which entries it keeps shows
  here: the same ones every step, or eventually all of them).

Both are *measured*, not inferred from the gradient: the callback copies the trainable weights before
:meth:`Method.train_step` starts and compares them with the weights after it returns (after the optimizer step
and every component's ``after_step``). So a mask that restores entries after the step (CURE), a weight
perturbation that is added and removed (AWP/RWP), weight decay moving entries whose gradient is zero, and
updates below float resolution are all counted as they really happen.

Cost per step: one fused copy of the trainable weights, one fused in-place subtraction, two fused
norm reductions (L1 of the gradients, L0 of the weight change) and one in-place OR of the changed entries
per tensor, all on the device; the accumulators are device tensors, so the host synchronizes once per epoch
when the rows are written. Memory: one extra copy of the trainable weights and one boolean per entry.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from layerlab import runs
from layerlab.callbacks import Callback
from layerlab.models import block_of_param

STATS_FILE = "layer_stats.jsonl"
PHASES = ("initial", "middle", "final")


def _block(param_name: str) -> str:
    """The model part owning a parameter (``stem``/``blockK``/``head``), else its top-level module name."""
    try:
        return block_of_param(param_name)
    except ValueError:
        return param_name.split(".")[0]


def _module_kind(model: nn.Module, param_name: str) -> str:
    """Class name of the module owning a parameter (``Conv2d``, ``BatchNorm2d``, ``Linear``, ...)."""
    owner, _, _ = param_name.rpartition(".")
    try:
        return type(model.get_submodule(owner)).__name__ if owner else type(model).__name__
    except AttributeError:
        return "?"


class GradStats(Callback):
    """Accumulates per-parameter mean |grad| and updated fraction on the device; writes ``layer_stats.jsonl``."""

    def __init__(self, filename: str = STATS_FILE):
        self.filename = filename
        self.names: list[str] = []
        self.params: list[Tensor] = []
        self.before: list[Tensor] = []
        self.changed_once: list[Tensor] = []  # per tensor: entries changed in some step of this epoch
        self.rows_meta: list[dict[str, Any]] = []
        self.grad_sum: Tensor | None = None
        self.changed_sum: Tensor | None = None
        self.steps = 0
        self.epoch_rows: list[dict[str, Any]] = []

    def on_train_start(self, model, method, run_dir: Path, cfg, start_epoch: int) -> None:
        """Pick the trainable tensors, allocate device buffers, drop rows of epochs that will be redone."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.before = [torch.empty_like(p) for p in self.params]
        self.changed_once = [torch.zeros_like(p, dtype=torch.bool) for p in self.params]
        self.rows_meta = [{"param": n, "block": _block(n), "module": _module_kind(model, n),
                           "shape": list(p.shape), "numel": p.numel()} for n, p in named]
        self._reset()
        path = Path(run_dir) / self.filename
        if path.exists():
            kept = [r for r in runs.read_jsonl(path) if r["epoch"] <= start_epoch]
            path.write_text("".join(runs.dumps_line(r) for r in kept))

    def _reset(self) -> None:
        """Zero the epoch accumulators (float64 so counts stay exact over long epochs)."""
        device = self.params[0].device if self.params else torch.device("cpu")
        self.grad_sum = torch.zeros(len(self.params), dtype=torch.float64, device=device)
        self.changed_sum = torch.zeros(len(self.params), dtype=torch.float64, device=device)
        for mask in self.changed_once:
            mask.zero_()
        self.steps = 0

    @torch.no_grad()
    def before_step(self, model: nn.Module) -> None:
        """Copy the trainable weights (one fused device copy, no allocation)."""
        if self.params:
            torch._foreach_copy_(self.before, self.params)

    @torch.no_grad()
    def after_backward(self, model: nn.Module) -> None:
        """Add sum |grad| of every tensor (the gradient after any mask, as the optimizer sees it)."""
        present = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not present:
            return
        grads = [self.params[i].grad for i in present]
        sums = torch.stack(torch._foreach_norm(grads, 1)).to(torch.float64)
        if len(present) == len(self.params):
            self.grad_sum += sums
        else:
            self.grad_sum.index_add_(0, torch.tensor(present, device=sums.device), sums)

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        """Count entries whose value changed across the whole step (weights are final here)."""
        if not self.params:
            return
        torch._foreach_sub_(self.before, self.params)  # before - after, in place
        changed = torch.stack(torch._foreach_norm(self.before, 0)).to(torch.float64)
        self.changed_sum += changed
        for mask, diff in zip(self.changed_once, self.before):
            mask |= diff != 0
        self.steps += 1

    def epoch_stats(self, epoch: int) -> list[dict[str, Any]]:
        """The epoch's rows (one host sync) and reset of the accumulators."""
        grad = self.grad_sum.cpu().tolist()
        changed = self.changed_sum.cpu().tolist()
        once = (torch.stack([m.sum() for m in self.changed_once]).cpu().tolist() if self.changed_once else [])
        steps = self.steps
        rows = []
        for meta, g, c, o in zip(self.rows_meta, grad, changed, once):
            denom = max(1, steps) * meta["numel"]
            rows.append({"epoch": epoch, **meta, "steps": steps,
                         "grad_mean_abs": g / denom if steps else math.nan,
                         "updated_fraction": c / denom if steps else math.nan,
                         "updated_once_fraction": o / meta["numel"] if steps else math.nan})
        self._reset()
        return rows

    def on_epoch_end(self, epoch: int, model: nn.Module, run_dir: Path) -> None:
        """Append the epoch's rows to ``RUN/layer_stats.jsonl``."""
        self.epoch_rows = self.epoch_stats(epoch)
        with open(Path(run_dir) / self.filename, "a") as fh:
            fh.write("".join(runs.dumps_line(r) for r in self.epoch_rows))


BLOCK_STATS = ("grad_mean_abs", "updated_fraction", "updated_once_fraction")


def block_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per model part (``stem``, ``blockK``, ``head``), in model order, the :data:`BLOCK_STATS` of one epoch's
    :meth:`GradStats.epoch_stats` rows, each tensor weighted by its number of entries (so a block's value is the
    mean over all its entries, as for a single tensor)."""
    sums: dict[str, dict[str, float]] = {}
    for r in rows:
        acc = sums.setdefault(r["block"], dict.fromkeys(("numel",) + BLOCK_STATS, 0.0))
        acc["numel"] += r["numel"]
        for stat in BLOCK_STATS:
            acc[stat] += r[stat] * r["numel"]
    return {block: {stat: acc[stat] / acc["numel"] for stat in BLOCK_STATS} for block, acc in sums.items()}


def read_layer_stats(path: str | Path) -> Any:
    """``layer_stats.jsonl`` (a run directory or the file) as a pandas DataFrame."""
    path = Path(path)
    if path.is_dir():
        path = path / STATS_FILE
    rows = runs.read_jsonl(path)
    if not rows:
        raise FileNotFoundError(f"{path} is missing or empty: train with grad_stats=True (the default)")
    return pd.DataFrame(rows)


def block_gradients(stats) -> Any:
    """Mean |grad| per (epoch, block), weighting each tensor by its number of entries."""
    df = stats.assign(weighted=stats["grad_mean_abs"] * stats["numel"])
    out = df.groupby(["epoch", "block"], sort=False)[["weighted", "numel"]].sum().reset_index()
    out["grad_mean_abs"] = out["weighted"] / out["numel"]
    return out[["epoch", "block", "grad_mean_abs"]]


def phase_of_epochs(epochs: list[int]) -> dict[int, str]:
    """Split the distinct epochs, in order, into thirds: ``initial``, ``middle``, ``final``
    (two epochs: initial and final; one epoch: initial)."""
    ordered = sorted(set(epochs))
    n = len(ordered)
    if n >= 3:
        return {e: PHASES[(3 * i) // n] for i, e in enumerate(ordered)}
    return {e: PHASES[2 * i] for i, e in enumerate(ordered)}


UPDATED_VIEWS = {"per_step": ("updated_fraction", "weights updated per step (%)"),
                 "once_per_epoch": ("updated_once_fraction", "weights updated at least once per epoch (%)")}


def updated_by_phase(stats, weights_only: bool = True, view: str = "per_step") -> Any:
    """Mean updated fraction (percent, ``updated_percent``) per layer and training phase; layers = conv/linear
    weights by default. ``view`` (:data:`UPDATED_VIEWS`): ``per_step``, the share of entries a step changes, or
    ``once_per_epoch``, the share changed in at least one step of an epoch (mean over the phase's epochs)."""
    if view not in UPDATED_VIEWS:
        raise ValueError(f"unknown view {view!r}; choose one of {sorted(UPDATED_VIEWS)}")
    column = UPDATED_VIEWS[view][0]
    if column not in stats:
        raise ValueError(f"these layer stats have no {column!r}: they were recorded before it existed; "
                         f"retrain the run for the {view!r} view")
    df = stats
    if weights_only:
        df = df[df["shape"].map(len) > 1]
    phases = phase_of_epochs(df["epoch"].tolist())
    df = df.assign(phase=df["epoch"].map(phases))
    order = {p: i for i, p in enumerate(dict.fromkeys(df["param"]))}
    out = df.groupby(["param", "block", "phase"], sort=False)[column].mean().reset_index()
    out["updated_percent"] = 100 * out[column]
    out["layer"] = out["param"].map(order)
    return out.sort_values(["layer", "phase"]).reset_index(drop=True)
