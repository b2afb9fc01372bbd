"""Run the performance benchmarks of issue 6 and check their targets.

    python -m benchmarks.run                   # full run (~15 min on 2 idle cores)
    python -m benchmarks.run --quick           # smaller sizes, under 2 minutes (gallery_cost, compiled: longer)
    python -m benchmarks.run --only method_cost --only memory --device auto --threads 2

Prints each benchmark's absolute numbers, its side-by-side ratios and its targets, each target with
its 95 % bootstrap interval over the paired rounds and its verdict (met, missed, or undecided when the
interval straddles the limit; :mod:`benchmarks.stats`), writes a JSON result file under
``benchmarks/results/`` and exits 1 when a target is missed (2 on an error). Undecided targets do not
fail the run; they are listed in the summary.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from benchmarks.common import (PROFILES, Context, Result, available_cores, fmt, fmt_interval, machine_info, render,
                               set_threads)

BENCHMARKS: dict[str, str] = {
    "method_cost": "benchmarks.method_cost",
    "overhead": "benchmarks.overhead",
    "data_path": "benchmarks.data_path",
    "hardware": "benchmarks.hardware",
    "instruments": "benchmarks.instruments",
    "memory": "benchmarks.memory",
    "gallery_cost": "benchmarks.gallery_cost",
    "compiled": "benchmarks.compiled",
}
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_only(values: Sequence[str] | None) -> list[str]:
    """Benchmark names from repeated/comma-separated ``--only`` values (all when none), in run order."""
    if not values:
        return list(BENCHMARKS)
    wanted = [v.strip() for item in values for v in item.split(",") if v.strip()]
    unknown = [w for w in wanted if w not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    return [b for b in BENCHMARKS if b in wanted]


def run_benchmarks(names: Sequence[str], ctx: Context, verbose: bool = True) -> list[Result]:
    """Run ``names`` in order; a crash becomes an ``error`` result instead of stopping the others."""
    log = (lambda msg: print(msg, flush=True)) if verbose else (lambda msg: None)
    results = []
    for name in names:
        log(f"-- running {name} ({ctx.settings.profile} profile)")
        t0 = time.perf_counter()
        try:
            result = importlib.import_module(BENCHMARKS[name]).run(ctx, log)
        except Exception as err:  # noqa: BLE001 -- report it and go on with the other benchmarks
            result = Result(name, name, error=f"{type(err).__name__}: {err}")
            log(traceback.format_exc())
        result.seconds = time.perf_counter() - t0
        print(render(result), flush=True)
        results.append(result)
    return results


def exit_code(results: Sequence[Result]) -> int:
    """2 when a benchmark crashed, 1 when a target was missed, else 0 (skipped benchmarks and undecided
    targets pass: the summary lists the undecided ones)."""
    statuses = {r.status for r in results}
    return 2 if "error" in statuses else 1 if "missed" in statuses else 0


def report(results: Sequence[Result], ctx: Context, info: dict[str, Any], started: str) -> dict[str, Any]:
    """The JSON document written to ``benchmarks/results/``."""
    return {"started": started, "profile": ctx.settings.profile, "settings": ctx.settings.to_dict(),
            "machine": info, "exit_code": exit_code(results), "benchmarks": [r.to_json() for r in results]}


def default_output(profile: str, names: Sequence[str]) -> Path:
    """``results/<profile>.json``, or ``results/<profile>-<names>.json`` for a subset."""
    suffix = "" if list(names) == list(BENCHMARKS) else "-" + "-".join(names)
    return RESULTS_DIR / f"{profile}{suffix}.json"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (the 'quick' profile)")
    parser.add_argument("--profile", choices=sorted(PROFILES), help="full (default), quick, or tiny (tests)")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help=f"run only these benchmarks (repeat or comma-separate): {', '.join(BENCHMARKS)}")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=available_cores(), help="torch threads (default: all cores)")
    parser.add_argument("--out", type=Path, help="JSON result file (default: benchmarks/results/<profile>.json)")
    parser.add_argument("--no-write", action="store_true", help="do not write the JSON result file")
    parser.add_argument("--quiet", action="store_true", help="no per-call progress lines")
    args = parser.parse_args(argv)
    try:
        names = parse_only(args.only)
    except ValueError as err:
        parser.error(str(err))
    profile = args.profile or ("quick" if args.quick else "full")

    from layerlab.system import tune_cpu_allocator
    from layerlab.train import resolve_device

    set_threads(args.threads)
    allocator_tuned = tune_cpu_allocator()  # as the layerlab CLI trains (layerlab.system)
    device = resolve_device(args.device)
    ctx = Context(PROFILES[profile], device, args.threads)
    info = {**machine_info(device, args.threads), "malloc_tuned": allocator_tuned}
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    print(f"layerlab benchmarks, profile {profile}, {started}", flush=True)
    print("machine: " + json.dumps(info), flush=True)
    results = run_benchmarks(names, ctx, verbose=not args.quiet)
    code = exit_code(results)
    print("\nsummary:")
    for r in results:
        print(f"  {r.name:12s} {r.status}")
        for t in r.targets:
            if t.verdict != "met":
                print(f"    {t.verdict.upper()}: {t.name} {fmt(t.value)}{fmt_interval(t.low, t.high)} {t.op} "
                      f"{fmt(t.limit)}")
    if not args.no_write:
        out = args.out or default_output(profile, names)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report(results, ctx, info, started), indent=2, default=str) + "\n")
        print(f"wrote {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
