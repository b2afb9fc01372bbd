"""Shared benchmark machinery: profiles, machine description, interleaved timing, targets, reports.

Every timed comparison runs its candidates side by side in one process, interleaved
(A, B, C, then C, B, A, ...) after warm-up rounds, and reports medians, so that a load change on a
shared machine hits all candidates alike. Memory comparisons run each candidate in a fresh
subprocess (:func:`run_worker`) so one candidate's allocations cannot hide another's peak.
Targets are decided from the paired rounds by :mod:`benchmarks.stats` (:func:`decide`).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from benchmarks import stats


@dataclass(frozen=True)
class Settings:
    """Sizes of every benchmark for one profile (``full``, ``quick`` or ``tiny``)."""

    profile: str
    rounds: int  # timed rounds of every interleaved comparison
    warmup: int  # untimed rounds before them
    # 1. method step cost: targets on the cost_* model (the paper's full-width ResNet-18 in `full`), and the
    # same comparison, reported without targets, on the width/batch miniature (also 2. framework overhead's)
    cost_width: float
    cost_batch: int
    width: float
    batch: int
    pgd_steps: int
    overhead_batches: int  # batches per epoch in the framework-overhead comparison
    # 3. data path
    data_batches: int
    data_batch: int
    # 4. hardware use
    hw_width: float
    hw_batch: int
    hw_pgd_steps: int
    hw_rounds: int  # the full-width steps are slow: fewer rounds here
    mm_sizes: tuple[int, ...]
    peak_conv: tuple[int, int, int]  # channels, image size, batch of the dense 3x3 convolution peak reference
    # 5. instruments
    cka_n: tuple[int, int]
    cka_width: float
    cka_batch: int
    lsc_n: int
    lsc_mus: int
    # 6. memory
    mem_width: float
    mem_batch: int
    mem_pgd_steps: int
    # 7. gallery cost: the gallery profile whose epoch is timed, its data sizes times this scale
    gallery_profile: str
    gallery_scale: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PROFILES: dict[str, Settings] = {
    # Method cost on the paper's full-width ResNet-18 and batch 128, also on the cpu profile's width-0.25
    # model at batch 128; PGD-10; full-width ResNet-18 at batch 128 for hardware use.
    "full": Settings("full", rounds=5, warmup=1, cost_width=1.0, cost_batch=128, width=0.25, batch=128, pgd_steps=10, overhead_batches=4,
                     data_batches=100, data_batch=128, hw_width=1.0, hw_batch=128, hw_pgd_steps=10, hw_rounds=3,
                     mm_sizes=(1024, 2048, 3072), peak_conv=(512, 32, 4), cka_n=(1000, 10000), cka_width=0.25,
                     cka_batch=100, lsc_n=512, lsc_mus=4, mem_width=0.25, mem_batch=128, mem_pgd_steps=2,
                     gallery_profile="cpu", gallery_scale=1.0),
    # Same comparisons, smaller: under 2 minutes on 2 idle cores.
    "quick": Settings("quick", rounds=3, warmup=1, cost_width=0.25, cost_batch=32, width=0.125, batch=32, pgd_steps=3, overhead_batches=3,
                      data_batches=20, data_batch=128, hw_width=1.0, hw_batch=16, hw_pgd_steps=2, hw_rounds=3,
                      mm_sizes=(1024, 2048), peak_conv=(256, 32, 4), cka_n=(200, 2000), cka_width=0.125,
                      cka_batch=100, lsc_n=128, lsc_mus=3, mem_width=0.125, mem_batch=64, mem_pgd_steps=1,
                      gallery_profile="cpu", gallery_scale=0.125),
    # For the test-suite: checks that the code runs and reports, in seconds; its figures mean nothing.
    "tiny": Settings("tiny", rounds=1, warmup=0, cost_width=0.0625, cost_batch=8, width=0.0625, batch=8, pgd_steps=1, overhead_batches=2,
                     data_batches=2, data_batch=16, hw_width=0.0625, hw_batch=4, hw_pgd_steps=1, hw_rounds=1,
                     mm_sizes=(64, 128), peak_conv=(16, 8, 2), cka_n=(16, 80), cka_width=0.0625, cka_batch=8,
                     lsc_n=16, lsc_mus=2, mem_width=0.0625, mem_batch=8, mem_pgd_steps=1,
                     gallery_profile="tiny", gallery_scale=0.1),
}


@dataclass
class Context:
    """What every benchmark gets: its sizes, the device and the thread count."""

    settings: Settings
    device: torch.device
    threads: int


# ---------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_cores() -> int:
    """Cores this process may run on (the affinity mask where supported)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    """The machine and software a result was measured on, with the load average at the start."""
    import torchvision

    info: dict[str, Any] = {
        "cpu": cpu_model(), "cores": available_cores(), "logical_cpus": os.cpu_count(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
        "threads": threads, "interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "mkldnn": torch.backends.mkldnn.is_available(),
        "mkl": torch.backends.mkl.is_available(), "device": str(device),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def set_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads (set explicitly, never left to the environment)."""
    torch.set_num_threads(max(1, int(threads)))


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_orders(names: list[str], rounds: int) -> list[list[str]]:
    """Candidate order of each round: forward on even rounds, reversed on odd ones (A,B,C,C,B,A,...)."""
    return [list(names) if r % 2 == 0 else list(reversed(names)) for r in range(rounds)]


@dataclass
class Samples:
    """Seconds of every timed call of every candidate, and what each call returned."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    returns: dict[str, list[Any]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def stats(self, name: str) -> dict[str, float]:
        """Median, min and max seconds and the number of samples of one candidate."""
        s = self.seconds[name]
        return {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s), "n": len(s)}


def interleave(candidates: dict[str, Callable[[], Any]], rounds: int, warmup: int, device: torch.device,
               log: Callable[[str], None] | None = None) -> Samples:
    """Call every candidate once per round in alternating order; time the timed rounds (after ``warmup``)."""
    names = list(candidates)
    out = Samples({n: [] for n in names}, {n: [] for n in names})
    for r, order in enumerate(round_orders(names, warmup + rounds)):
        timed = r >= warmup
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            ret = candidates[name]()
            sync(device)
            dt = time.perf_counter() - t0
            if timed:
                out.seconds[name].append(dt)
                out.returns[name].append(ret)
            if log:
                log(f"  {'round ' + str(r - warmup + 1) if timed else 'warm-up'}: {name} {dt:.3f} s")
    return out


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """Total FLOPs of one call of ``fn`` and the count per operator (``torch.utils.flop_counter``: convolutions
    and matrix products, counted exactly from their shapes)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    per_op = {str(op).split(".")[-1] if "." in str(op) else str(op): int(v)
              for op, v in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), per_op


# ---------------------------------------------------------------------------
# targets and results
# ---------------------------------------------------------------------------


@dataclass
class Target:
    """A criterion ``value <op> limit`` (``op`` is ``<=`` or ``>=``) with the value's bootstrap interval
    ``[low, high]`` over ``rounds`` paired rounds (no interval: a counted quantity, decided by its value);
    see :mod:`benchmarks.stats` for the verdict."""

    name: str
    value: float
    op: str
    limit: float
    note: str = ""
    low: float | None = None
    high: float | None = None
    rounds: int | None = None

    @property
    def verdict(self) -> str:
        """``met``, ``missed`` or ``undecided`` (the interval straddles the limit)."""
        return stats.verdict(self.value, self.op, self.limit, self.low, self.high, self.rounds)

    @property
    def met(self) -> bool:
        return self.verdict == "met"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "op": self.op, "limit": self.limit, "low": self.low,
                "high": self.high, "rounds": self.rounds, "verdict": self.verdict, "met": self.met,
                "note": self.note}


def decide(name: str, rounds: dict[str, list[float]], statistic: stats.Statistic, op: str, limit: float,
           note: str = "") -> Target:
    """The target ``statistic(rounds) <op> limit`` with its paired-bootstrap interval (none below two rounds)."""
    n = len(next(iter(rounds.values())))
    value = stats.point(rounds, statistic)
    low, high = stats.bootstrap_interval(rounds, statistic) if n >= stats.MIN_ROUNDS else (None, None)
    return Target(name, value, op, limit, note, low, high, n)


def interval(rounds: dict[str, list[float]], statistic: stats.Statistic) -> list[float] | None:
    """``[low, high]`` of a reported (target-less) statistic, or None below two rounds."""
    if len(next(iter(rounds.values()))) < stats.MIN_ROUNDS:
        return None
    return list(stats.bootstrap_interval(rounds, statistic))


@dataclass
class Result:
    """One benchmark's report: absolute figures, ratios, targets, notes on what is measured."""

    name: str
    title: str
    table: list[dict[str, Any]] = field(default_factory=list)  # one row per candidate (absolute numbers)
    more_tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # title -> rows
    ratios: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, list[float] | None] = field(default_factory=dict)  # ratio name -> bootstrap [low, high]
    figures: dict[str, Any] = field(default_factory=dict)  # other absolute numbers
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def status(self) -> str:
        """``error``, ``skipped``, ``missed`` (a target missed), ``undecided`` (none missed, one undecided) or
        ``ok``."""
        if self.error:
            return "error"
        if self.skipped:
            return "skipped"
        verdicts = {t.verdict for t in self.targets}
        return "missed" if "missed" in verdicts else "undecided" if "undecided" in verdicts else "ok"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "status": self.status, "table": self.table,
                "more_tables": self.more_tables,
                "ratios": self.ratios, "intervals": self.intervals, "figures": self.figures,
                "targets": [t.to_json() for t in self.targets],
                "notes": self.notes, "skipped": self.skipped, "error": self.error,
                "seconds": round(self.seconds, 2)}


def fmt(value: Any) -> str:
    """A number in a short, readable form; other values as text."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        a = abs(value)
        if a == 0 or 1e-3 <= a < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


def fmt_interval(low: float | list[float] | None, high: float | None = None) -> str:
    """`` [low, high]`` (95 % bootstrap interval), or nothing when there is none."""
    if isinstance(low, list):
        low, high = low
    return "" if low is None or high is None else f" [{fmt(low)}, {fmt(high)}]"


def verdict_text(t: Target) -> str:
    """``MET``, ``MISSED`` or ``UNDECIDED`` with the reason an undecided target is undecided."""
    if t.verdict != "undecided":
        return t.verdict.upper()
    return "UNDECIDED " + ("(the interval straddles the limit)" if t.low is not None
                           else f"({t.rounds} round: no interval)")


def render_table(rows: list[dict[str, Any]]) -> list[str]:
    """Rows of dicts as aligned text lines (columns in first-seen order)."""
    if not rows:
        return []
    cols: list[str] = []
    for row in rows:
        cols += [c for c in row if c not in cols]
    cells = [[fmt(row.get(c, "")) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    line = lambda items: "  ".join(s.ljust(w) for s, w in zip(items, widths)).rstrip()
    return [line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells]


def render(result: Result) -> str:
    """The human-readable report of one benchmark."""
    out = [f"== {result.name}: {result.title} [{result.status}, {result.seconds:.0f} s]"]
    if result.skipped:
        out.append(f"   skipped: {result.skipped}")
    if result.error:
        out.append(f"   error: {result.error}")
    out += ["   " + line for line in render_table(result.table)]
    for title, rows in result.more_tables.items():
        out += [f"   {title}:"] + ["   " + line for line in render_table(rows)]
    for key, value in result.ratios.items():
        out.append(f"   ratio {key}: {fmt(value)}" + fmt_interval(result.intervals.get(key)))
    for key, value in result.figures.items():
        out.append(f"   {key}: {json.dumps(value, default=str) if isinstance(value, (dict, list)) else fmt(value)}")
    for t in result.targets:
        out.append(f"   target {t.name}: {fmt(t.value)}{fmt_interval(t.low, t.high)} {t.op} {fmt(t.limit)} -> "
                   f"{verdict_text(t)}" + (f" ({t.note})" if t.note else ""))
    out += [f"   note: {n}" for n in result.notes]
    return "\n".join(out)


# ---------------------------------------------------------------------------
# memory and subprocess workers
# ---------------------------------------------------------------------------


def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0: ``5 > /proc/self/clear_refs``).

    Returns False where that is impossible; the peak then counts from the process start.
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident set size since the start or the last :func:`reset_peak_rss`, in bytes
    (``VmHWM`` of /proc/self/status, else ``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_tensor_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes of CPU tensors allocated by ``fn()`` and alive at once, from ``torch.profiler``'s memory
    records (each event's own allocations minus frees, in time order): independent of the allocator's caching."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted(((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                      if e.self_cpu_memory_usage), key=lambda r: r[0])
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak


def run_worker(module: str, args: dict[str, Any], timeout: float = 900,
               env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m module --worker JSON`` in a fresh process (extra environment ``env``) and return the
    JSON of its last stdout line."""
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(args)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=root, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {module} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def worker_main(work: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Entry point of a ``--worker JSON`` subprocess: set threads, run ``work``, print its JSON result."""
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        raise SystemExit(f"usage: python -m {sys.modules['__main__'].__spec__.name} --worker JSON "
                         f"(started by benchmarks.run)")
    args = json.loads(sys.argv[2])
    set_threads(args["threads"])
    print(json.dumps(work(args)))


MB = 1024 * 1024
