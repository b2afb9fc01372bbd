"""5. Instruments: CKA memory against the number of examples, and the LSC landscape's cost.

CKA: :func:`layerlab.analysis.cka.cka_matrix` over every residual block (stem, each residual
unit, head; natural inputs, ``same-inputs`` mode) of a ResNet-18, once over n examples and once
over 10 n, each in a fresh subprocess holding the same 10 n-image data set. Its peak memory above
the baseline taken once the model and the data exist should not grow with n: the estimator keeps
one batch of features and a layers x layers accumulator. Three measures, each its own subprocess:

* ``tensors``: the peak of live tensor bytes (CPU: ``torch.profiler``'s memory records; CUDA:
  ``torch.cuda.max_memory_allocated``), independent of how the allocator caches freed memory;
* ``rss``: the process's peak resident set (the kernel's mark, reset at the baseline through
  ``/proc/self/clear_refs``), after a two-batch warm-up call that does the libraries' lazy set-up;
* ``rss-fixed-mmap``: the same with ``MALLOC_MMAP_THRESHOLD_`` pinned. glibc otherwise raises its
  mmap threshold after large frees and keeps later freed blocks on the heap, so the plain resident
  set creeps up by a bounded amount (the threshold caps at 32 MiB) that is not the instrument's.

LSC: :func:`layerlab.analysis.lsc.landscape` (one direction, a grid of mu points) with the
examples split into 7 non-empty groups, against the same call with 1 group and against one
plain evaluation pass over the examples. All groups share each mu point's single pass, so the
cost per (group, mu point) is the cost per mu point divided by the number of groups.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

from benchmarks.common import (
    MB,
    Context,
    Result,
    Target,
    current_rss,
    interleave,
    peak_rss,
    peak_tensor_bytes,
    reset_peak_rss,
    run_worker,
    worker_main,
)
from benchmarks.method_cost import make_batch, make_model

NAME = "instruments"
TITLE = "instruments: CKA memory vs examples, LSC landscape cost"
CKA_LAYERS = "residual-blocks"


MEASURES: dict[str, dict[str, str]] = {
    # peak bytes of live tensors (torch.profiler on the CPU, max_memory_allocated on CUDA): allocator-independent
    "tensors": {},
    # the process's peak resident memory, default allocator settings
    "rss": {},
    # the same with glibc's dynamic mmap threshold pinned: freed large blocks go back to the system at once
    "rss-fixed-mmap": {"MALLOC_MMAP_THRESHOLD_": "131072"},
}


def cka_worker(args: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: CKA over ``n`` of ``pool`` examples; its peak memory above the baseline taken once
    the model and the data exist (``measure``: live tensors, or the resident set)."""
    from layerlab.analysis.cka import cka_matrix
    from layerlab.data import ImageSet

    device = torch.device(args["device"])
    model = make_model(args["width"], 0, device).eval()
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (args["pool"], 3, 32, 32), generator=g, dtype=torch.uint8),
                    torch.randint(0, 10, (args["pool"],), generator=g)).to(device)
    kwargs = {"mode": "same-inputs", "adversarial": False, "batch_size": args["batch"], "layers": CKA_LAYERS,
              "progress": False}
    cuda = device.type == "cuda"
    result: list[Any] = []

    def call() -> None:
        result.append(cka_matrix(model, None, data, n=args["n"], **kwargs))

    t0 = time.perf_counter()
    reset = True
    if args["measure"] == "tensors" and not cuda:
        base, peak = 0, peak_tensor_bytes(call)
    else:
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            base = current_rss()
            reset = reset_peak_rss()
            cka_matrix(model, None, data, n=min(args["pool"], 2 * args["batch"]), **kwargs)  # lazy inits
        t0 = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) if cuda else peak_rss()
    seconds = time.perf_counter() - t0
    return {"n": result[0].n, "layers": len(result[0].rows), "seconds": seconds, "delta_bytes": peak - base,
            "peak_reset": reset, "finite": bool(all(math.isfinite(v) for v in result[0].matrix.ravel()))}


def cka_memory(ctx: Context, log: Callable[[str], None]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per n and measure: the worker's peak above baseline and its time; per measure the ratio large/small n."""
    s = ctx.settings
    rows: list[dict[str, Any]] = []
    ratios: dict[str, float] = {}
    for measure, env in MEASURES.items():
        if measure == "rss-fixed-mmap" and ctx.device.type == "cuda":
            continue
        if measure == "tensors" and ctx.device.type == "cuda":
            label = "cuda max_memory_allocated"
        else:
            label = measure
        peaks = []
        for n in s.cka_n:
            out = run_worker("benchmarks.instruments", {"n": n, "pool": s.cka_n[1], "width": s.cka_width,
                                                          "batch": s.cka_batch, "device": str(ctx.device),
                                                          "threads": ctx.threads, "measure": measure}, env=env)
            log(f"  CKA n={n} [{label}]: peak +{out['delta_bytes'] / MB:.1f} MiB, {out['seconds']:.1f} s")
            peaks.append(out["delta_bytes"])
            rows.append({"candidate": f"cka n={n}", "memory": label, "n": out["n"], "layers": out["layers"],
                         "seconds": out["seconds"], "s_per_1000_examples": 1000 * out["seconds"] / n,
                         "peak_mib": out["delta_bytes"] / MB, "peak_reset": out["peak_reset"],
                         "finite": out["finite"]})
        ratios[f"cka peak memory n={s.cka_n[1]}/n={s.cka_n[0]} [{label}]"] = peaks[1] / max(peaks[0], 1)
    return rows, ratios


def lsc_cost(ctx: Context, log: Callable[[str], None]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Time landscape() with 7 groups, with 1 group, and one evaluation pass, interleaved."""
    from layerlab.analysis.lsc import DEFAULT_EDGES, LSCGroup, landscape, mu_grid, per_example_loss

    s = ctx.settings
    model = make_model(s.cka_width, 0, ctx.device).eval()
    x, y = make_batch(s.lsc_n, 1, ctx.device)
    g = torch.Generator(ctx.device).manual_seed(3)
    x_adv = (x + (torch.rand(x.shape, generator=g, device=ctx.device) * 2 - 1) * 8 / 255).clamp(0, 1)
    parts = torch.randperm(s.lsc_n, generator=torch.Generator().manual_seed(0)).tensor_split(len(DEFAULT_EDGES) - 1)
    seven = [LSCGroup(k, DEFAULT_EDGES[k], DEFAULT_EDGES[k + 1], p.sort().values) for k, p in enumerate(parts)]
    one = [LSCGroup(0, 0.0, math.inf, torch.arange(s.lsc_n))]
    mus = mu_grid(-1.0, 1.0, s.lsc_mus)
    candidates = {
        "lsc 7 groups": lambda: landscape(model, x_adv, y, seven, mus, directions=1, seed=0),
        "lsc 1 group": lambda: landscape(model, x_adv, y, one, mus, directions=1, seed=0),
        "eval pass": lambda: per_example_loss(model, x_adv, y),
    }
    samples = interleave(candidates, s.rounds, s.warmup, ctx.device, log)
    med = {c: samples.median(c) for c in candidates}
    rows = [{"candidate": c, **samples.stats(c)} for c in candidates]
    figures = {"lsc_s_per_mu_point": med["lsc 7 groups"] / len(mus),
               "lsc_s_per_group_and_mu_point": med["lsc 7 groups"] / len(mus) / len(seven),
               "lsc_ms_per_example_and_mu_point": 1000 * med["lsc 7 groups"] / len(mus) / s.lsc_n,
               "lsc_examples": s.lsc_n, "lsc_mu_points": len(mus), "lsc_groups": len(seven), "lsc_directions": 1}
    ratios = {"lsc 7 groups / 1 group": med["lsc 7 groups"] / med["lsc 1 group"],
              "lsc per mu point / eval pass": med["lsc 7 groups"] / len(mus) / med["eval pass"]}
    return rows, {"figures": figures, "ratios": ratios}


def run(ctx: Context, log: Callable[[str], None] = print) -> Result:
    s = ctx.settings
    cka_rows, cka_ratios = cka_memory(ctx, log)
    lsc_rows, lsc = lsc_cost(ctx, log)
    targets = [Target(name, value, "<=", 1.1, note="~1: memory must not grow with the number of examples; "
                                                   "one peak per n, decided by its value")
               for name, value in cka_ratios.items() if not name.endswith("[rss]")]
    notes = [f"CKA: resnet18 width {s.cka_width}, layers '{CKA_LAYERS}' ({cka_rows[0]['layers']} layers, no pooling), "
             f"batch {s.cka_batch}, natural inputs, n={s.cka_n[0]} vs n={s.cka_n[1]}, a fresh subprocess per n and "
             f"memory measure, data set of {s.cka_n[1]} images resident in every one",
             "memory = peak above the baseline taken once model and data exist; 'tensors' = live tensor bytes from "
             "torch.profiler's memory records (CPU; includes its overhead in 'seconds') or max_memory_allocated "
             "(CUDA); 'rss' = peak resident set (kernel mark reset at the baseline, after a two-batch warm-up "
             "call); 'rss-fixed-mmap' = the same with MALLOC_MMAP_THRESHOLD_=131072",
             "no target on plain 'rss': glibc raises its mmap threshold after large frees and then keeps freed "
             "blocks on the heap, so the resident set creeps up by a bounded amount (the threshold caps at 32 MiB)",
             f"LSC: resnet18 width {s.cka_width}, {s.lsc_n} examples, {s.lsc_mus} mu points, 1 direction, "
             f"{s.warmup} warm-up + {s.rounds} timed interleaved rounds; 'eval pass' = one per_example_loss pass"]
    return Result(NAME, TITLE, table=cka_rows, more_tables={"LSC landscape": lsc_rows},
                  ratios={**cka_ratios, **lsc["ratios"]}, figures=lsc["figures"], targets=targets, notes=notes)


if __name__ == "__main__":
    worker_main(cka_worker)
