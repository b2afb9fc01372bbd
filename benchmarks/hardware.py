"""4. Hardware use: the AT step's achieved FLOP/s against a measured dense peak on the same machine.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one real
``Method.train_step`` of PGD-AT (the PGD steps' forward + input-gradient backward, the training
forward + backward; convolutions and matrix products only, as FlopCounterMode counts them; the
count is exact, not estimated). That counted step is also the warm-up.

The peak is the best rate of two dense float32 references, both measured here: ``torch.mm`` over
several square sizes (MKL's sgemm on x86 CPUs) and one large 3x3 convolution (oneDNN's kernels on
CPUs, cuDNN on GPUs). Both are reported; the second matters on CPUs where MKL does not run its
fastest code path (e.g. AMD, where oneDNN's AVX-512 convolutions beat MKL's sgemm by ~2x), so the
step is never compared with a peak below what the machine demonstrably reaches. Step timings and
peak timings are interleaved round by round so a load change hits both; the fraction uses the
best (least disturbed) step time against the best peak rate seen in the whole run, and the median
of the per-round fractions is reported beside it. The same step is also timed on a
``channels_last`` copy of the model (``TrainConfig.channels_last``), side by side.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Callable

import numpy as np
import torch

from benchmarks import stats
from benchmarks.common import Context, Result, count_flops, decide, interleave, sync
from benchmarks.method_cost import make_batch, make_model
from layerlab.config import EPS, PGD_STEP
from layerlab.methods import AttackSettings, StepContext, build_method

NAME = "hardware"
TITLE = "hardware use: AT step FLOP/s vs measured dense peak"
TARGET_CPU = 0.4


def matmul_rates(sizes: tuple[int, ...], device: torch.device, repeats: int = 2) -> dict[int, float]:
    """Best float32 ``torch.mm`` FLOP/s (2 n^3 per product) of each square size over ``repeats`` calls."""
    g = torch.Generator().manual_seed(0)
    rates = {}
    for n in sizes:
        a = torch.randn(n, n, generator=g).to(device)
        b = torch.randn(n, n, generator=g).to(device)
        best = float("inf")
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            best = min(best, time.perf_counter() - t0)
        rates[n] = 2 * n**3 / best
    return rates


def conv_rate(channels: int, size: int, batch: int, device: torch.device, repeats: int = 2) -> float:
    """Best float32 FLOP/s of a dense 3x3 convolution (``channels`` in and out, ``size`` x ``size``, padding 1)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g).to(device)
    w = torch.randn(channels, channels, 3, 3, generator=g).to(device)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        torch.nn.functional.conv2d(x, w, padding=1)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * batch * size * size * channels * channels * 9 / best


def peak_rates(s, device: torch.device) -> dict[str, float]:
    """One round of the dense references: ``mm <n>`` for every size and ``conv3x3``."""
    rates = {f"mm {n}": r for n, r in matmul_rates(s.mm_sizes, device).items()}
    rates["conv3x3"] = conv_rate(*s.peak_conv, device)
    return rates


def at_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackSettings) -> Callable[[], None]:
    """One PGD-AT ``train_step`` on ``model`` per call."""
    method = build_method("at")
    method.setup(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator(x.device).manual_seed(1)
    step = [0]

    def call() -> None:
        method.train_step(model, x, y, opt, StepContext(0, 1, step[0], 1000, attack, generator))
        step[0] += 1

    return call


def best_fraction(flops: int) -> stats.Statistic:
    """FLOPs / best step time / best dense peak rate (rounds ``at-step`` in seconds, ``peak`` in FLOP/s)."""
    return lambda s: flops / np.min(s["at-step"], axis=-1) / np.max(s["peak"], axis=-1)


def run(ctx: Context, log: Callable[[str], None] = print) -> Result:
    s = ctx.settings
    model = make_model(s.hw_width, 0, ctx.device)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x, y = make_batch(s.hw_batch, 0, ctx.device)
    attack = AttackSettings(EPS, PGD_STEP, s.hw_pgd_steps, "linf")
    step, step_cl = at_step(model, x, y, attack), at_step(model_cl, x, y, attack)
    t0 = time.perf_counter()
    flops, per_op = count_flops(step)  # also the warm-up of the contiguous model
    log(f"  counted {flops / 1e9:.1f} GFLOP in one AT step ({time.perf_counter() - t0:.1f} s, warm-up)")
    step_cl()  # warm-up of the channels_last model (oneDNN picks its kernels)
    peak_rates(s, ctx.device)  # warm-up of the BLAS / oneDNN kernels
    candidates = {"at-step": step, "at-step-channels_last": step_cl, "peak": lambda: peak_rates(s, ctx.device)}
    samples = interleave(candidates, s.hw_rounds, 0, ctx.device, log)

    rounds = samples.returns["peak"]
    peaks = [max(r.values()) for r in rounds]
    best_rates = {k: max(r[k] for r in rounds) for k in rounds[0]}
    peak_source = max(best_rates, key=best_rates.get)
    peak = best_rates[peak_source]
    mm_peak = max(v for k, v in best_rates.items() if k.startswith("mm"))
    table, fractions = [], {}
    for c in ("at-step", "at-step-channels_last"):
        achieved = flops / min(samples.seconds[c])
        per_round = [flops / t / p for t, p in zip(samples.seconds[c], peaks)]
        fractions[c] = achieved / peak
        table.append({"candidate": c, **samples.stats(c), "gflop": flops / 1e9,
                      "achieved_gflop_s": achieved / 1e9, "fraction_of_peak": fractions[c],
                      "median_round_fraction": statistics.median(per_round),
                      "fraction_of_mm_peak": achieved / mm_peak})
    targets = []
    if ctx.device.type == "cpu":  # per round: the step's seconds and the round's best dense rate, paired
        rounds = {"at-step": samples.seconds["at-step"], "peak": peaks}
        targets.append(decide("AT step FLOP/s / dense peak", rounds, best_fraction(flops), ">=", TARGET_CPU,
                              note="default (contiguous) memory format"))
    notes = [f"resnet18 width {s.hw_width}, batch {s.hw_batch}, PGD-{s.hw_pgd_steps}, device {ctx.device}, "
             f"{ctx.threads} threads; 1 counted warm-up step + {s.hw_rounds} timed interleaved rounds",
             "peak: best float32 rate across all rounds of torch.mm (sizes " + ", ".join(map(str, s.mm_sizes))
             + f") and a 3x3 convolution ({s.peak_conv[0]} channels, {s.peak_conv[1]}x{s.peak_conv[1]}, batch "
             f"{s.peak_conv[2]}); fraction = FLOPs / best step time / peak; fraction_of_mm_peak uses torch.mm alone",
             "FLOPs: convolutions and matrix products as counted by FlopCounterMode (BatchNorm, ReLU, "
             "elementwise and optimizer work are not FLOPs here but are in the step time)"]
    if ctx.device.type == "cuda":
        notes.append("no target on CUDA (the issue sets it for CPUs); convolutions may use TF32 while torch.mm "
                     "runs full float32 by default")
    return Result(NAME, TITLE, table=table, ratios={f"{c} fraction of peak": v for c, v in fractions.items()},
                  figures={"peak_gflop_s": peak / 1e9, "peak_source": peak_source,
                           "dense_gflop_s": {k: v / 1e9 for k, v in best_rates.items()},
                           "gflop_by_op": {k: v / 1e9 for k, v in per_op.items()}},
                  targets=targets, notes=notes)
