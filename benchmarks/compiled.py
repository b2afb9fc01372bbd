"""8. Compiled vs eager: a cpu-profile AT epoch (training steps and the per-epoch evaluation) with
``TrainConfig.compile`` (``torch.compile``, inductor) against the eager path, on the same config.

Both candidates are :func:`layerlab.train.setup` of the cpu profile's config (bf16 autocast, channels_last,
PGD in training and in the per-epoch evaluation) at the settings' width, batch and PGD steps, differing only
in ``compile``; each call is one :func:`~layerlab.train.train_epoch` over the same synthetic in-memory images
plus one :func:`~layerlab.train.evaluate_epoch` on a test and a validation split of 1/16 of them each (the cpu
profile's 8,000 training images against 500 + 500 evaluated). The compiled candidate's first call compiles
its graphs: it is timed on its own (compile time, less the eager first call) and left out of the paired rounds,
which then run interleaved. Dynamo's counters tell whether anything compiled again during the timed rounds
(a recompilation there would be paid in every run).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from benchmarks.common import Context, Result, Target, decide, interleave, interval, sync
from benchmarks.method_cost import CIFAR_MEAN, CIFAR_STD
from benchmarks.stats import mean_ratio
from layerlab.config import make_config
from layerlab.data import ImageSet, Splits
from layerlab.train import evaluate_epoch, setup, train_epoch

NAME = "compiled"
TITLE = "compiled (torch.compile) vs eager: cpu-profile AT epoch with its per-epoch evaluation"
TARGET = 1.5  # compiled / eager images per second
EVAL_FRACTION = 16  # training images per evaluated test (and per validation) image


def synthetic_splits(n: int, n_eval: int, device: torch.device, seed: int = 0) -> Splits:
    """``n`` random uint8 training images and ``n_eval`` each of test and validation images on ``device``."""
    g = torch.Generator().manual_seed(seed)

    def images(k: int) -> ImageSet:
        return ImageSet(torch.randint(0, 256, (k, 3, 32, 32), generator=g, dtype=torch.uint8),
                        torch.randint(0, 10, (k,), generator=g)).to(device)

    return Splits("synthetic", images(n), images(n_eval), images(n_eval), 10, [str(i) for i in range(10)],
                  CIFAR_MEAN, CIFAR_STD)


def epoch_call(compiled: bool, ctx: Context, splits: Splits) -> Callable[[], dict[str, float]]:
    """One training epoch and its per-epoch evaluation per call (lr 0.01: random labels must not diverge)."""
    s = ctx.settings
    cfg = make_config("cpu", method="at", width=s.width, batch_size=s.batch, attack_steps=s.pgd_steps,
                      epoch_eval_steps=s.pgd_steps, eval_size=len(splits.test), eval_batch_size=2 * s.batch,
                      lr=0.01, epochs=1000, device=str(ctx.device), compile=compiled, grad_stats=False)
    state = setup(cfg, splits)
    epoch = [0]

    def call() -> dict[str, float]:
        row = {**train_epoch(state, epoch[0], progress=False), **evaluate_epoch(state, epoch[0])}
        epoch[0] += 1
        return row

    return call


def dynamo_counts() -> dict[str, int]:
    """Dynamo's running totals: frames compiled, graphs made, graph breaks, recompilations."""
    from torch._dynamo.utils import counters

    return {"frames": sum(counters["frames"].values()), "unique_graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()), "recompiles": sum(counters["recompiles"].values())}


def run(ctx: Context, log: Callable[[str], None] = print) -> Result:
    s = ctx.settings
    n = s.overhead_batches * s.batch
    n_eval = max(8, n // EVAL_FRACTION)
    splits = synthetic_splits(n, n_eval, ctx.device)
    candidates = {"eager": epoch_call(False, ctx, splits), "compiled": epoch_call(True, ctx, splits)}
    first: dict[str, float] = {}
    for name, call in candidates.items():  # the compiled candidate compiles here
        sync(ctx.device)
        t0 = time.perf_counter()
        call()
        sync(ctx.device)
        first[name] = time.perf_counter() - t0
        log(f"  first call: {name} {first[name]:.1f} s")
    before = dynamo_counts()
    samples = interleave(candidates, s.rounds, max(0, s.warmup - 1), ctx.device, log)
    after = dynamo_counts()
    images = n + 2 * n_eval  # trained, and evaluated on both splits
    table = [{"candidate": c, **samples.stats(c), "first_call_s": first[c], "train_images_per_s": n / samples.median(c),
              "images_per_s": images / samples.median(c)} for c in candidates]
    target = decide("compiled/eager images per s", samples.seconds, mean_ratio("eager", "compiled"), ">=", TARGET)
    recompiled = {k: after[k] - before[k] for k in after}
    steady = Target("frames compiled during the timed rounds", recompiled["frames"], "<=", 0,
                    note="counted (dynamo): a steady state compiles nothing more")
    figures: dict[str, Any] = {
        "compile_s (first call, less eager's)": first["compiled"] - first["eager"],
        "dynamo after the first calls": before,
        "dynamo during the timed rounds": recompiled,
        "last round's metrics": {c: samples.returns[c][-1] for c in candidates},
    }
    return Result(NAME, TITLE, table=table, ratios={target.name: target.value},
                  intervals={target.name: interval(samples.seconds, mean_ratio("eager", "compiled"))},
                  figures=figures, targets=[target, steady],
                  notes=[f"cpu profile's AT config (bf16 autocast, channels_last) at resnet18 width {s.width}, batch "
                         f"{s.batch}, PGD-{s.pgd_steps} in training and evaluation; an epoch = {n} synthetic images "
                         f"({s.overhead_batches} batches) + evaluation of {n_eval} test and {n_eval} validation "
                         f"images; device {ctx.device}, {ctx.threads} thread(s)",
                         f"first call of each candidate timed alone (compiles the compiled one), then "
                         f"{max(0, s.warmup - 1)} warm-up + {s.rounds} timed interleaved rounds; ratio: mean of the "
                         f"per-round eager/compiled time ratios with its 95 % paired-bootstrap interval",
                         "the two candidates train separate model copies from one initialization; their metrics "
                         "drift apart only by floating-point differences (tests/test_compile.py checks the "
                         "equality on a tiny model)"])
