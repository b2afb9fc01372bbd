"""6. Memory: peak memory of a CURE training step against a TRADES step.

Each candidate runs in a fresh subprocess (CURE, TRADES, CURE, TRADES, ...) that builds the model,
the method (CURE's revision model included), the optimizer and the batch, takes the baseline, then
runs two ``train_step`` calls (the first allocates gradients and momentum buffers, the second runs
with them in place). "Step peak" = peak memory during the steps minus the baseline: activations
and autograd graphs, gradients, optimizer state, CURE's RGP gradients and masks. On the CPU the
peak is the kernel's peak-RSS mark (reset to the baseline through ``/proc/self/clear_refs``; where
that is impossible, ``ru_maxrss`` since the start); on CUDA ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats``. The persistent state built before the steps (model, CURE's
revision copy) is reported separately, and so is the whole process's peak.

The number of PGD steps does not change the peak (each PGD step's graph is freed before the
next), so this benchmark uses few of them to stay fast.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

import torch

from benchmarks.common import (
    MB,
    Context,
    Result,
    current_rss,
    decide,
    peak_rss,
    peak_tensor_bytes,
    reset_peak_rss,
    run_worker,
    worker_main,
)
from benchmarks.method_cost import make_batch, make_model
from benchmarks.stats import mean_ratio

NAME = "memory"
TITLE = "memory: CURE step vs TRADES step peak"
METHODS = ("cure", "trades")
STEPS = 2


def _now(device: torch.device) -> int:
    """Bytes in use now: allocated CUDA memory, or this process's resident set."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return current_rss()


def warm_up_lazy_imports() -> None:
    """One optimizer step on a dummy tensor: the first optimizer use imports torch._dynamo (~150 MB of
    resident memory), which would otherwise be counted in whichever measurement comes first."""
    p = torch.zeros(4, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.sum().backward()
    opt.step()


def step_worker(args: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: memory of the state a method builds, and the peak of its training steps."""
    from layerlab.config import EPS, PGD_STEP
    from layerlab.methods import AttackSettings, StepContext, build_method

    device = torch.device(args["device"])
    warm_up_lazy_imports()
    x, y = make_batch(args["batch"], 0, device)
    start = _now(device)
    model = make_model(args["width"], 0, device)
    method = build_method(args["method"])
    method.setup(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    attack = AttackSettings(EPS, PGD_STEP, args["pgd_steps"], "linf")
    generator = torch.Generator(device).manual_seed(1)

    def steps() -> None:
        for i in range(STEPS):
            method.train_step(model, x, y, opt, StepContext(0, 1, i, 1000, attack, generator))

    base = _now(device)
    if args.get("measure") == "tensors":  # CPU cross-check: live tensor bytes from torch.profiler
        return {"method": args["method"], "step_peak_tensor_bytes": peak_tensor_bytes(steps)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        reset = True
    else:
        reset = reset_peak_rss()
    steps()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()
    return {"method": args["method"], "state_bytes": base - start, "step_peak_bytes": peak - base,
            "process_peak_bytes": peak, "peak_reset": reset}


def run(ctx: Context, log: Callable[[str], None] = print) -> Result:
    s = ctx.settings
    outs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    rounds = max(1, min(2, s.rounds))
    for r in range(rounds):
        for m in (METHODS if r % 2 == 0 else tuple(reversed(METHODS))):
            out = run_worker("benchmarks.memory", {"method": m, "width": s.mem_width, "batch": s.mem_batch,
                                                     "pgd_steps": s.mem_pgd_steps, "device": str(ctx.device),
                                                     "threads": ctx.threads})
            log(f"  {m}: step peak +{out['step_peak_bytes'] / MB:.1f} MiB, state {out['state_bytes'] / MB:.1f} MiB")
            outs[m].append(out)
    tensors = {}
    if ctx.device.type == "cpu":
        for m in METHODS:
            out = run_worker("benchmarks.memory", {"method": m, "width": s.mem_width, "batch": s.mem_batch,
                                                     "pgd_steps": s.mem_pgd_steps, "device": str(ctx.device),
                                                     "threads": ctx.threads, "measure": "tensors"})
            tensors[m] = out["step_peak_tensor_bytes"]
            log(f"  {m}: step peak of live tensors {tensors[m] / MB:.1f} MiB")
    med = {m: {k: statistics.median(o[k] for o in outs[m]) for k in ("state_bytes", "step_peak_bytes",
                                                                     "process_peak_bytes")} for m in METHODS}
    table = [{"candidate": m, "step_peak_mib": med[m]["step_peak_bytes"] / MB, "state_mib": med[m]["state_bytes"] / MB,
              "state_plus_step_mib": (med[m]["state_bytes"] + med[m]["step_peak_bytes"]) / MB,
              "process_peak_mib": med[m]["process_peak_bytes"] / MB, "runs": len(outs[m]),
              "peak_reset": all(o["peak_reset"] for o in outs[m]),
              **({"step_peak_live_tensors_mib": tensors[m] / MB} if tensors else {})} for m in METHODS]
    peaks = {m: [max(1, o["step_peak_bytes"]) for o in outs[m]] for m in METHODS}  # round r of each, paired
    target = decide("cure/trades step peak", peaks, mean_ratio("cure", "trades"), "<=", 1.5)
    ratio = target.value
    with_state = ((med["cure"]["state_bytes"] + med["cure"]["step_peak_bytes"])
                  / max(1, med["trades"]["state_bytes"] + med["trades"]["step_peak_bytes"]))
    ratios = {"cure/trades step peak": ratio, "cure/trades state + step peak": with_state}
    if tensors:
        ratios["cure/trades step peak [live tensors]"] = tensors["cure"] / max(1, tensors["trades"])
    how = ("torch.cuda.max_memory_allocated" if ctx.device.type == "cuda"
           else "peak RSS (VmHWM, reset at the baseline via /proc/self/clear_refs)")
    notes = [f"resnet18 width {s.mem_width}, batch {s.mem_batch}, PGD-{s.mem_pgd_steps}, {STEPS} steps, "
             f"device {ctx.device}; fresh subprocess per candidate, {rounds} interleaved round(s), medians; "
             f"memory measured as {how}",
             "state = model + method state built before the steps (CURE: its revision model copy)"]
    if tensors:
        notes.append("step_peak_live_tensors_mib: cross-check, peak of live tensor bytes during the steps from "
                     "torch.profiler's memory records (one more subprocess per method; no allocator caching)")
    return Result(NAME, TITLE, table=table, ratios=ratios, targets=[target],
                  notes=notes)


if __name__ == "__main__":
    worker_main(step_worker)
