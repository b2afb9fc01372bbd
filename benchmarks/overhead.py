"""2. Framework overhead: layerlab's PGD-AT epoch against a bare PyTorch PGD-AT loop on the same tensors.

Both epochs train the same architecture from the same initialization with the same SGD settings
on the same in-memory uint8 images: shuffle, random crop + flip (both call
``layerlab.data.augment``'s crop/flip code, so augmentation costs the same), PGD-10 from a uniform
start in eval mode, one CE step in train mode.

layerlab side: :func:`layerlab.train.train_epoch` as :func:`layerlab.train.train` runs it, i.e. the
method framework (objective, components, step context), a tqdm progress bar (written to /dev/null),
the per-step metrics (loss and accuracy, a host sync per step, the NaN check) and the default
gradient-statistics callback (:class:`layerlab.analysis.layer_stats.GradStats`, on with
``grad_stats=True``) including its end-of-epoch write. Not included on either side: the per-epoch
evaluation and checkpoints (the same work for any training loop).

bare side: a hand-written loop with no metrics, no callbacks and no progress bar.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import Context, Result, decide, interleave
from benchmarks.method_cost import CIFAR_MEAN, CIFAR_STD
from benchmarks.stats import mean_ratio
from layerlab.config import TrainConfig
from layerlab.data import ImageSet, Splits, augment
from layerlab.callbacks import Callback
from layerlab.train import build_run_model, setup, train_epoch

NAME = "overhead"
TITLE = "framework overhead: layerlab AT epoch vs bare PyTorch loop"


def synthetic_splits(n: int, device: torch.device, seed: int = 0) -> Splits:
    """``n`` random uint8 training images (and a token test split) as layerlab splits on ``device``."""
    g = torch.Generator().manual_seed(seed)
    train = ImageSet(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                     torch.randint(0, 10, (n,), generator=g))
    test = ImageSet(train.images[:8].clone(), train.labels[:8].clone())
    return Splits("synthetic", train.to(device), None, test.to(device), 10, [str(i) for i in range(10)],
                  CIFAR_MEAN, CIFAR_STD)


def bench_config(width: float, batch: int, pgd_steps: int, device: torch.device) -> TrainConfig:
    """The AT run both loops train (lr 0.01: random labels must not diverge during the benchmark)."""
    return TrainConfig(method="at", model="resnet18", width=width, dataset="synthetic", batch_size=batch,
                       attack_steps=pgd_steps, epochs=1000, lr=0.01, device=str(device), seed=0, grad_stats=True)


def default_callbacks(cfg: TrainConfig) -> list[Callback]:
    """The callbacks :func:`layerlab.train.train` adds by default."""
    if not cfg.grad_stats:
        return []
    from layerlab.analysis.layer_stats import GradStats

    return [GradStats()]


def layerlab_epoch(cfg: TrainConfig, splits: Splits, run_dir: Path) -> Callable[[], dict]:
    """One layerlab training epoch per call (progress bar on, to /dev/null; default callbacks)."""
    s = setup(cfg, splits)
    callbacks = default_callbacks(cfg)
    for cb in callbacks:
        cb.on_train_start(s.model, s.method, run_dir, cfg, 0)
    epoch = [0]

    def call() -> dict:
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            stats = train_epoch(s, epoch[0], callbacks, progress=True)
        epoch[0] += 1
        for cb in callbacks:
            cb.on_epoch_end(epoch[0], s.model, run_dir)
        return stats

    return call


def bare_epoch(cfg: TrainConfig, splits: Splits) -> Callable[[], None]:
    """One epoch of a plain PyTorch PGD-AT loop per call (same model init, optimizer, PGD, augmentation)."""
    model = build_run_model(cfg, splits).to(torch.device(cfg.device))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    images, labels = splits.train.images, splits.train.labels
    device, eps, alpha = images.device, cfg.eps, cfg.alpha
    epoch = [0]

    def call() -> None:
        g = torch.Generator(device).manual_seed(10_000 + epoch[0])
        epoch[0] += 1
        perm = torch.randperm(len(labels), generator=g, device=device)
        for start in range(0, len(labels), cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            x, y = augment(images[idx], g), labels[idx]
            model.eval()
            delta = (torch.rand(x.shape, generator=g, device=device) * 2 - 1) * eps
            delta = (x + delta).clamp(0, 1) - x
            for _ in range(cfg.attack_steps):
                delta.requires_grad_(True)
                loss = F.cross_entropy(model(x + delta), y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, delta)
                delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
                delta = (x + delta).clamp(0, 1) - x
            model.train()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x + delta), y).backward()
            opt.step()

    return call


def run(ctx: Context, log: Callable[[str], None] = print) -> Result:
    s = ctx.settings
    n = s.overhead_batches * s.batch
    splits = synthetic_splits(n, ctx.device)
    cfg = bench_config(s.width, s.batch, s.pgd_steps, ctx.device)
    with tempfile.TemporaryDirectory(prefix="layerlab-bench-") as tmp:
        candidates = {"layerlab": layerlab_epoch(cfg, splits, Path(tmp)), "bare": bare_epoch(cfg, splits)}
        samples = interleave(candidates, s.rounds, s.warmup, ctx.device, log)
    table = [{"candidate": c, **samples.stats(c), "images_per_s": n / samples.median(c)} for c in candidates]
    target = decide("layerlab/bare images per s", samples.seconds, mean_ratio("bare", "layerlab"), ">=", 0.95)
    return Result(
        NAME, TITLE, table=table, ratios={target.name: target.value}, targets=[target],
        notes=[f"resnet18 width {s.width}, batch {s.batch}, PGD-{s.pgd_steps}, epochs of {n} synthetic in-memory "
               f"images ({s.overhead_batches} batches), device {ctx.device}, {s.warmup} warm-up + {s.rounds} timed "
               f"interleaved epochs each, medians",
               "both: shuffle + crop/flip (same code) + PGD + SGD step; layerlab adds its method framework, tqdm "
               "bar (to /dev/null), per-step loss/accuracy + NaN check, GradStats callback + its epoch write; "
               "neither: evaluation, checkpoints"])
