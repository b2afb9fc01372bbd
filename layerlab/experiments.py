"""Named experiments: the seeded sets of runs that decide a paper claim, trained into one run root.

An experiment is a list of :class:`RunSpec` (a run name and the config changes that make it, on top of the
gallery's profile). ``python -m layerlab.experiments run NAME --runs ROOT`` trains every run of NAME that is
not finished yet; several such processes can share a root (each takes the next run nobody is training, the
run lock keeps two off the same run, interrupted runs are resumed), so both cores of a machine stay busy
with one thread each. A run that starts from another (``init``) waits until that one is finished; a
dependency that is only a record (no checkpoints) is retrained first (:func:`layerlab.records.materialize`).

Run names carry the training seed as ``-sN``; a name without it is seed 0, so the gallery's single-seed runs
(``AT``, ``CURE``, ...) are the seed-0 members of these sets.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from layerlab import records, runs
from layerlab.config import ST_EPOCHS, TrainConfig, make_config
from layerlab.methods.cure import CODE_ARGS
from layerlab.train import train

SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class RunSpec:
    """One run of an experiment: ``changes`` to the base config; ``init`` names the run it starts from."""

    name: str
    changes: dict[str, Any] = field(default_factory=dict)
    init: str | None = None

    def config(self, base: TrainConfig, root: Path) -> TrainConfig:
        changes = dict(self.changes)
        if self.init is not None:
            changes["init"] = str(root / self.init / "checkpoints" / "best.pt")
        return base.replace(**changes)


@dataclass(frozen=True)
class Experiment:
    """A named set of runs under one profile, and what it decides."""

    name: str
    question: str
    profile: str
    specs: tuple[RunSpec, ...]


def seeded(name: str, seeds: Iterable[int] = SEEDS, init: str | None = None, **changes: Any) -> list[RunSpec]:
    """``name`` trained with each seed (``NAME`` for seed 0, ``NAME-sN`` otherwise)."""
    return [RunSpec(name if s == 0 else f"{name}-s{s}", {**changes, "seed": s}, init) for s in seeds]


def seed_of(run_name: str) -> int:
    """The training seed a run name carries (``-sN``; none = 0)."""
    head, _, tail = run_name.rpartition("-s")
    return int(tail) if head and tail.isdigit() else 0


def group_of(run_name: str) -> str:
    """A run name without its seed suffix."""
    head, _, tail = run_name.rpartition("-s")
    return head if head and tail.isdigit() else run_name


_ST = RunSpec("ST", {"method": "st", "epochs": ST_EPOCHS["cpu"]})


def _cure_decision() -> tuple[RunSpec, ...]:
    """CURE as the paper's text vs the released code, against baselines from the same ST model (issue-level
    question: why the miniature's CURE stays near ST)."""
    order = [
        seeded("CURE-code", method="cure", method_args=dict(CODE_ARGS), init="ST"),
        seeded("CURE-d0.98-rconst", method="cure", method_args={"d": 0.98, "r_decay": "none"}, init="ST"),
        seeded("TRADES-b5-fromST", method="trades", method_args={"beta": 5.0}, init="ST"),
        seeded("CURE", method="cure", init="ST"),
        seeded("TRADES-b6-fromST", method="trades", method_args={"beta": 6.0}, init="ST"),
        seeded("AT", method="at"),
        seeded("TRADES", method="trades"),
    ]
    # seed 0 of every variant first, then seed 1, then seed 2: a partial experiment still compares all
    by_seed = [spec for s in SEEDS for group in order for spec in group if spec.changes["seed"] == s]
    return (_ST, *by_seed)


def _overfit_pilot() -> tuple[RunSpec, ...]:
    """Training-set size, epochs and width at which AT robust-overfits on a CPU (step decay at 50% / 75%)."""
    def at(n: int, epochs: int, width: float) -> RunSpec:
        return RunSpec(f"AT-n{n}-e{epochs}-w{width}", {"method": "at", "train_size": n, "epochs": epochs,
                                                       "width": width, "keep_every": max(1, epochs // 10)})
    return (at(2000, 60, 0.25), at(1000, 60, 0.25), at(1000, 60, 0.5), at(500, 100, 0.5))


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e for e in (
        Experiment("cure-decision", "Does CURE, run as its released code runs it, beat TRADES from the same "
                   "ST model and from scratch? (3 seeds, last checkpoint)", "cpu", _cure_decision()),
        Experiment("overfit-pilot", "Which CPU-sized setting makes PGD-10 AT robust-overfit (best - last "
                   "PGD-20 >= 3 points, training robust accuracy >= 15 points above test)?", "cpu",
                   _overfit_pilot()),
    )
}


def experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)}")
    return EXPERIMENTS[name]


def base_config(profile: str) -> TrainConfig:
    """The config of ``profile`` (the same under every command, so experiment and gallery runs share a root)."""
    return make_config(profile)


def finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").exists()


def run_experiment(name: str, root: str | Path, *, progress: bool = False, only: Iterable[str] | None = None,
                   log: Callable[[str], None] = print, poll_seconds: float = 30.0) -> list[str]:
    """Train every unfinished run of experiment ``name`` under ``root`` (``only``: these run names); returns
    the runs this process trained. Safe to run in several processes at once on one root."""
    exp = experiment(name)
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    base = base_config(exp.profile)
    wanted = set(only) if only else None
    specs = [s for s in exp.specs if wanted is None or s.name in wanted]
    if wanted and (unknown := wanted - {s.name for s in exp.specs}):
        raise ValueError(f"experiment {name!r} has no runs {sorted(unknown)}; it has {[s.name for s in exp.specs]}")
    trained: list[str] = []
    while True:
        pending = [s for s in specs if not finished(root / s.name)]
        if not pending:
            return trained
        ready = [s for s in pending if not runs.is_locked(root / s.name)
                 and (s.init is None or finished(root / s.init) and not runs.is_locked(root / s.init))]
        if not ready:
            time.sleep(poll_seconds)  # another process is training what the rest depends on
            continue
        spec = ready[0]
        run_dir = root / spec.name
        try:
            if spec.init is not None:
                records.materialize(root / spec.init, progress=progress, log=log)  # a record: retrain it
            resume = (run_dir / "checkpoints" / "last.pt").exists()
            log(f"[{name}] {'resuming' if resume else 'training'} {spec.name}")
            train(spec.config(base, root), run_dir, resume=resume, progress=progress)
        except runs.RunDirBusyError:
            continue  # another process took it between the check and the lock
        trained.append(spec.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m layerlab.experiments", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the experiment's unfinished runs into --runs")
    run.add_argument("name", choices=sorted(EXPERIMENTS))
    run.add_argument("--runs", required=True, help="run root (outside the repository)")
    run.add_argument("--only", default=None, help="comma-separated run names")
    run.add_argument("--progress", action="store_true")
    sub.add_parser("list", help="the experiments and their runs")
    args = parser.parse_args(argv)
    if args.command == "list":
        for exp in EXPERIMENTS.values():
            print(f"{exp.name} ({exp.profile}): {exp.question}\n  " + " ".join(s.name for s in exp.specs))
        return 0
    from layerlab.system import tune_cpu_allocator

    tune_cpu_allocator()
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    run_experiment(args.name, args.runs, progress=args.progress, only=only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
