"""3. Data path: layerlab's in-memory augmented batches against torchvision's DataLoader + PIL transforms.

Same CIFAR-10 copy for both (``$LAYERLAB_DATA``): layerlab loads it once with
:func:`layerlab.data.load_splits` (its decode cache of the JPEG tree) and yields shuffled,
random-crop + flip float batches with :func:`layerlab.data.train_batches` on the device;
torchvision reads ``$LAYERLAB_DATA/cifar10/train`` as an ``ImageFolder`` of JPEGs with
``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()`` and ``ToTensor()`` in a
``DataLoader`` (``num_workers=2``, persistent workers, pinned memory on CUDA) and moves each batch
to the device. Each timed round is one pass of ``data_batches`` batches: layerlab from a fresh
``train_batches`` iterator, torchvision one whole epoch of a ``RandomSampler`` of that many images
(so no prefetched work spills into the other candidate's time; worker start-up happens once, in
the warm-up, which favours torchvision). The one-time load of the layerlab tensors is reported
separately.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from benchmarks.common import Context, Result, decide, interleave
from benchmarks.stats import mean_ratio
from layerlab.data import load_splits, resolve_data_dir, train_batches

NAME = "data_path"
TITLE = "data path: layerlab in-memory batches vs torchvision DataLoader + PIL"
WORKERS = 2


def jpeg_tree(root: Path) -> Path | None:
    """The CIFAR-10 JPEG training folder under the data directory, if there is one."""
    for candidate in (root / "cifar10" / "train", root / "train"):
        if candidate.is_dir():
            return candidate
    return None


def layerlab_pass(splits, batches: int, batch: int, device: torch.device) -> Callable[[], int]:
    """``batches`` augmented batches from a fresh ``train_batches`` iterator per call; returns the images seen."""
    generator = torch.Generator(device).manual_seed(0)

    def call() -> int:
        seen = 0
        for i, (x, y) in enumerate(train_batches(splits.train, batch, generator)):
            seen += len(y)
            if i + 1 == batches:
                break
        return seen

    return call


def torchvision_pass(tree: Path, batches: int, batch: int, device: torch.device,
                     workers: int = WORKERS) -> tuple[Callable[[], int], object]:
    """One epoch of ``batches * batch`` randomly sampled JPEGs through DataLoader + PIL transforms per call."""
    import torchvision.transforms as T
    from torch.utils.data import DataLoader, RandomSampler
    from torchvision.datasets import ImageFolder

    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])
    dataset = ImageFolder(str(tree), transform=transform)
    sampler = RandomSampler(dataset, replacement=False, num_samples=batches * batch,
                            generator=torch.Generator().manual_seed(0))
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=device.type == "cuda")

    def call() -> int:
        seen = 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            seen += len(y)
        return seen

    return call, loader


def run(ctx: Context, log: Callable[[str], None] = print) -> Result:
    s = ctx.settings
    root = resolve_data_dir(None)
    if root is None:
        return Result(NAME, TITLE, skipped="LAYERLAB_DATA is not set: point it at the directory holding "
                                           "cifar10/{train,test}/<class>/*.jpg to run this benchmark")
    tree = jpeg_tree(root)
    if tree is None:
        return Result(NAME, TITLE, skipped=f"no CIFAR-10 JPEG tree under {root} (expected {root}/cifar10/train)")
    t0 = time.perf_counter()
    splits = load_splits("cifar10", root, val_size=0, device=ctx.device)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tv_call, loader = torchvision_pass(tree, s.data_batches, s.data_batch, ctx.device)
    index_s = time.perf_counter() - t0
    candidates = {"layerlab": layerlab_pass(splits, s.data_batches, s.data_batch, ctx.device),
                  "torchvision": tv_call}
    try:
        samples = interleave(candidates, s.rounds, s.warmup, ctx.device, log)
    finally:
        del loader  # stops the persistent workers
    images = {c: samples.returns[c][0] for c in candidates}
    rate = {c: images[c] / samples.median(c) for c in candidates}
    table = [{"candidate": c, **samples.stats(c), "images": images[c], "images_per_s": rate[c]} for c in candidates]
    target = decide("layerlab/torchvision images per s", samples.seconds,
                    mean_ratio("torchvision", "layerlab", scale=images["layerlab"] / images["torchvision"]),
                    ">=", 2.0)
    return Result(
        NAME, TITLE, table=table, ratios={target.name: target.value},
        figures={"layerlab_load_s": load_s, "train_images": len(splits.train), "imagefolder_index_s": index_s,
                 "jpeg_tree": "$LAYERLAB_DATA/" + str(tree.relative_to(root))},
        targets=[target],
        notes=[f"{s.data_batches} batches of {s.data_batch} per round, device {ctx.device}, torchvision "
               f"num_workers={WORKERS} (persistent), {s.warmup} warm-up + {s.rounds} timed interleaved rounds, "
               f"medians",
               "layerlab_load_s: one-time load of the uint8 tensors from layerlab's decode cache (the first "
               "load ever decodes the JPEGs once, ~15 s)"])
