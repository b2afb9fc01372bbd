"""Named experiments: the seeded sets of runs that decide a paper claim, trained into one run root.

An experiment is a list of :class:`RunSpec` (a run name and the config changes that make it, on top of the
gallery's profile). ``python -m layerlab.experiments run NAME --runs ROOT`` trains every run of NAME that is
not finished yet; several such processes can share a root (each takes the next run nobody is training, the
run lock keeps two off the same run, interrupted runs are resumed), so both cores of a machine stay busy
with one thread each. A run that starts from another (``init``) waits until that one is finished; a
dependency that is only a record (no checkpoints) is retrained first (:func:`layerlab.records.materialize`).

Run names carry the training seed as ``-sN``; a name without it is seed 0, so the gallery's single-seed runs
(``AT``, ``CURE-code``, ...) are the seed-0 members of these sets.
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from layerlab import records, runs
from layerlab.config import ST_EPOCHS, TrainConfig, make_config
from layerlab.evaluation import eval_file, evaluate_run
from layerlab.methods import METHODS, build_method
from layerlab.methods.cure import CODE_ARGS, TABLE7_ABLATION
from layerlab.methods.perturbation import C_MIN, RWP_CMIN_SWEEP, RWP_K2_SWEEP
from layerlab.plots.experiments import plot_curves_and_removal, plot_epoch_curves, plot_group_bars, plot_sweep
from layerlab.train import nrr, train

SEEDS = (0, 1, 2)
# Every finished run of an experiment is evaluated on the first EVAL_N test images. The robust number a claim
# reads is the point-wise worst case over these attacks; full AutoAttack (``aa``) is added for the last checkpoint
# of AA_SEEDS, which measures how far that worst case is from AutoAttack's.
EVAL_N = 1000
EVAL_ATTACKS = ("natural", "pgd20", "cw100", "aa-apgd")
AA_SEEDS = (0,)


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
    checkpoints: tuple[str, ...] = ("last",)  # the checkpoints evaluated under EVAL_ATTACKS (none: not evaluated)

    def attacks(self, run_name: str, checkpoint: str) -> tuple[str, ...]:
        """The attacks a run's ``checkpoint`` is evaluated under."""
        return EVAL_ATTACKS + (("aa",) if seed_of(run_name) in AA_SEEDS and checkpoint == "last" else ())


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


def seed_major(groups: Iterable[list[RunSpec]]) -> list[RunSpec]:
    """Seed 0 of every group first, then seed 1, then seed 2: a partial experiment still compares all groups."""
    groups = list(groups)
    return [spec for s in SEEDS for group in groups for spec in group if spec.changes["seed"] == s]


# Runs that several experiments share (one name, one config: a finished run serves them all).
def _at() -> list[RunSpec]:
    return seeded("AT", method="at")


def _trades() -> list[RunSpec]:
    return seeded("TRADES", method="trades")


def _cure(name: str = "CURE", **method_args: Any) -> list[RunSpec]:
    """CURE from the ST model; without ``method_args`` the paper-text defaults (``CURE``)."""
    return seeded(name, method="cure", init="ST", **({"method_args": method_args} if method_args else {}))


def _trades_from_st(beta: float) -> list[RunSpec]:
    return seeded(f"TRADES-b{beta:g}-fromST", method="trades", method_args={"beta": beta}, init="ST")


def _cure_decision() -> tuple[RunSpec, ...]:
    """CURE as the paper's text vs the released code, against baselines from the same ST model (issue-level
    question: why the miniature's CURE stays near ST)."""
    order = [_cure("CURE-code", **CODE_ARGS), _cure("CURE-d0.98-rconst", d=0.98, r_decay="none"), _trades_from_st(5.0),
             _cure(), _trades_from_st(6.0), _at(), _trades()]
    return (_ST, *seed_major(order))


def _pilot(n: int, epochs: int, width: float, v: int | None = None) -> RunSpec:
    """One overfitting-pilot setting: PGD-10 AT on ``n`` training images for ``epochs`` at ``width`` (step decay
    at 50% / 75%), ``AT-nN-eE-wW[-vV]``. ``v``: validation and per-epoch test subset size, when smaller than the
    profile's 500 (the per-epoch evaluation costs as much as a 1,000-image training epoch)."""
    small = {"val_size": v, "eval_size": v} if v else {}
    return RunSpec(f"AT-n{n}-e{epochs}-w{width}" + (f"-v{v}" if v else ""),
                   {"method": "at", "train_size": n, "epochs": epochs, "width": width,
                    "keep_every": max(1, epochs // 10), **small, "seed": 0})


# The CPU regime in which AT robust-overfits, as the pilot found it: width 0.25 is capacity-bound (training
# adversarial accuracy stays ~31% even at lr 0.001); width 0.5 starts to overfit on 1,000 images in 60 epochs and
# overfits clearly on 500 images in 100 epochs. Its AT run is the pilot's run of that setting.
OVERFIT_AT = _pilot(500, 100, 0.5, v=200)
OVERFIT_TAG = OVERFIT_AT.name.removeprefix("AT-")
OVERFIT = {k: v for k, v in OVERFIT_AT.changes.items() if k not in ("method", "seed")}


def _overfit_pilot() -> tuple[RunSpec, ...]:
    """Training-set size, epochs and width at which AT robust-overfits on a CPU (see :data:`OVERFIT`); decided on
    training's own PGD-20 evaluation of the test split at the best and the last checkpoint."""
    return (_pilot(2000, 60, 0.25), _pilot(1000, 60, 0.25), _pilot(1000, 60, 0.5), OVERFIT_AT)


def overfit_name(name: str) -> str:
    """A run group's name in the overfitting regime (``AT`` -> ``AT-n500-e100-w0.5-v200``)."""
    return f"{name}-{OVERFIT_TAG}"


_OVERFIT_ST = RunSpec(overfit_name("ST"), {"method": "st", **OVERFIT, "eval_every": 10})


def _overfit(name: str, method: str, *, init: str | None = None, **changes: Any) -> list[RunSpec]:
    """``name`` trained in the overfitting regime with each seed; ``init="ST"``: from the regime's ST model."""
    return seeded(overfit_name(name), method=method, init=_OVERFIT_ST.name if init == "ST" else init,
                  **OVERFIT, **changes)


def _overfit_methods() -> list[list[RunSpec]]:
    return [_overfit("AT", "at"), _overfit("RWP", "rwp"), _overfit("AWP", "awp"),
            _overfit("CURE-code", "cure", init="ST", method_args=dict(CODE_ARGS)), _overfit("TRADES", "trades")]


def _robust_overfitting() -> tuple[RunSpec, ...]:
    """CURE Fig. 5c / Table 3 and RWP Fig. 1b / 3c / Table 1 in the overfitting regime: AT, RWP, AWP, CURE (as the
    released code runs it, from the regime's ST model) and TRADES, best and last checkpoints."""
    return (_OVERFIT_ST, *seed_major(_overfit_methods()))


def _rwp_sweeps() -> tuple[RunSpec, ...]:
    """RWP Fig. 3a / 3b in the overfitting regime: RWP's c_min and K2, one at a time around the defaults."""
    defaults = inspect.signature(METHODS["rwp"][0]).parameters
    order = [_overfit("RWP", "rwp")]
    order += [_overfit(f"RWP-cmin{c:g}", "rwp", method_args={"c_min": c})
              for c in RWP_CMIN_SWEEP if c != defaults["c_min"].default]
    order += [_overfit(f"RWP-k{k}", "rwp", method_args={"steps": k})
              for k in RWP_K2_SWEEP if k != defaults["steps"].default]
    return tuple(seed_major(order))


FREEZE_SPECS = ("1", "4", "23", "123")
CODE_FREEZE = {"train_stem": True, "frozen_bn": "adapt"}  # how the released code's freeze study runs


def _freeze_variants() -> tuple[RunSpec, ...]:
    """The freeze study as the paper's text reads (stem with block1, frozen statistics fixed) and as the released
    code runs it (stem always trained, frozen statistics adapting), against SAT (= AT)."""
    order = [_at()]
    for spec in FREEZE_SPECS:
        order.append(seeded(f"U-{spec}", method="at", update=spec, init="ST"))
        order.append(seeded(f"U-{spec}-code", method="at", update=spec, init="ST", **CODE_FREEZE))
    return (_ST, *seed_major(order))


# RWP Fig. 1a: AWP's weight-perturbation size as multiples of AWP_GAMMA0 (0 = AT; 2 x = AWP's default 0.01, the
# gallery's ``AWP`` run). Fig. 1c: AWP generated from the examples of one LSC loss range each.
AWP_GAMMA0 = 5e-3
AWP_DEFAULT_GAMMA = inspect.signature(METHODS["awp"][0]).parameters["gamma"].default
AWP_GAMMA_MULTIPLES = (0.5, 1, 2, 4, 8)
AWP_LOSS_RANGES = ((0.0, 0.5), (0.5, 1.0), (1.0, 1.5), (1.5, math.inf))


def _awp(gamma: float | None = None) -> list[RunSpec]:
    """AT-AWP: the default (``AWP``) or another ``gamma`` (``AWP-gG``)."""
    if gamma is None or gamma == AWP_DEFAULT_GAMMA:
        return seeded("AWP", method="awp")
    return seeded(f"AWP-g{gamma:g}", method="awp", method_args={"gamma": gamma})


def _awp_gamma() -> tuple[RunSpec, ...]:
    """RWP Fig. 1a: AWP's best robust accuracy against its weight-perturbation size, 0 (AT) to 8 x AWP_GAMMA0."""
    return tuple(seed_major([_at(), *(_awp(round(m * AWP_GAMMA0, 10)) for m in AWP_GAMMA_MULTIPLES)]))


def _awp_loss_ranges() -> tuple[RunSpec, ...]:
    """RWP Fig. 1c in the overfitting regime: AWP (gamma 0.01) generated only from the examples whose adversarial
    loss lies in one range, against AT and AWP on every example."""
    ranges = []
    for lo, hi in AWP_LOSS_RANGES:
        args = {"loss_lo": lo, **({} if math.isinf(hi) else {"loss_hi": hi})}
        ranges.append(_overfit(f"AWP-loss{lo:g}-{hi:g}", "awp", method_args=args))
    return tuple(seed_major([_overfit("AT", "at"), _overfit("AWP", "awp"), *ranges]))


def _lsc_removal() -> tuple[RunSpec, ...]:
    """RWP appendix in the overfitting regime: AT without the examples below the LSC value (per-epoch removal
    rate), against AT and RWP."""
    return tuple(seed_major([_overfit("AT", "at"), _overfit("AT-remove", "at-remove", method_args={"c_min": C_MIN}),
                             _overfit("RWP", "rwp")]))


def _cure_eff() -> tuple[RunSpec, ...]:
    """CURE Table 4: CURE^Eff (natural warm-up, then CURE, no ST model) beside CURE from the ST model, as the
    paper's text and as the released code runs it."""
    order = [seeded("CURE-eff", method="cure-eff"),
             seeded("CURE-eff-code", method="cure-eff", method_args=dict(CODE_ARGS)),
             _cure(), _cure("CURE-code", **CODE_ARGS)]
    return (_ST, *seed_major(order))


def _baselines_from_st() -> tuple[RunSpec, ...]:
    """CURE Table 5: AT, TRADES and MART started from the same ST model as CURE, beside the same from scratch."""
    order = [seeded("AT-fromST", method="at", init="ST"), seeded("MART-fromST", method="mart", init="ST"),
             _trades_from_st(6.0), _cure(), _at(), _trades(), seeded("MART", method="mart")]
    return (_ST, *seed_major(order))


def _cure_ablation() -> tuple[RunSpec, ...]:
    """CURE Table 7 around CURE as the released code runs it (the gallery's CURE): RGP off (``p=0``), revision off
    (``gamma=0``), both off, all from the ST model."""
    order = [_cure(f"CURE-code{suffix}", **CODE_ARGS, **args) for suffix, (_, _, args) in TABLE7_ABLATION.items()]
    return (_ST, *seed_major(order[::-1]))


# CURE Table 10: one factor at a time around the paper-text CURE (gamma 1, p 30, rgp_alpha 0.1), over the values the
# paper's Table 9 uses for its other architectures and data sets (p 20 / 50, rgp_alpha 0.2 / 0.3, gamma 0.5), and
# gamma 2 above the default.
CURE_GRID: dict[str, tuple[float, ...]] = {"gamma": (0.5, 2.0), "p": (20.0, 50.0), "rgp_alpha": (0.2, 0.3)}


def _cure_grid() -> tuple[RunSpec, ...]:
    """CURE Table 10: gamma, p and rgp_alpha varied one at a time around the paper-text defaults (``CURE``)."""
    order = [_cure()] + [_cure(f"CURE-{key.replace('rgp_', '')}{value:g}", **{key: value})
                         for key, values in CURE_GRID.items() for value in values]
    return (_ST, *seed_major(order))


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e for e in (
        Experiment("cure-decision", "Does CURE, run as its released code runs it, beat TRADES from the same "
                   "ST model and from scratch? (3 seeds, last checkpoint)", "cpu", _cure_decision()),
        Experiment("freeze-variants", "Which freeze-study variant (paper text or released code) gives the "
                   "paper's ordering U-23 >= SAT on natural and robust accuracy? (3 seeds)", "cpu",
                   _freeze_variants()),
        Experiment("overfit-pilot", "Which CPU-sized setting makes PGD-10 AT robust-overfit (best - last "
                   "PGD-20 >= 3 points, training robust accuracy >= 15 points above test)?", "cpu",
                   _overfit_pilot(), checkpoints=()),
        Experiment("robust-overfitting", "CURE Fig. 5c / Table 3, RWP Fig. 1b / 3c / Table 1: in the regime where "
                   "AT robust-overfits, do AWP, RWP and CURE close AT's best - last gap, and does RWP beat AWP? "
                   "(3 seeds, best and last)", "cpu", _robust_overfitting(), checkpoints=("best", "last")),
        Experiment("rwp-sweeps", "RWP Fig. 3a / 3b: in the overfitting regime, does RWP's robustness peak inside "
                   "the c_min and K2 ranges? (3 seeds, best and last)", "cpu", _rwp_sweeps(),
                   checkpoints=("best", "last")),
        Experiment("awp-gamma", "RWP Fig. 1a: does AWP's best robust accuracy first rise and then fall as its "
                   "weight-perturbation size grows from 0 (AT) to 8 x 5e-3? (3 seeds)", "cpu", _awp_gamma(),
                   checkpoints=("best", "last")),
        Experiment("awp-loss-ranges", "RWP Fig. 1c: is AWP generated from the small-loss examples alone what "
                   "prevents robust overfitting, and AWP from the large-loss ones unnecessary? (3 seeds)", "cpu",
                   _awp_loss_ranges(), checkpoints=("best", "last")),
        Experiment("lsc-removal", "RWP appendix: does removing the examples below the LSC value from AT, instead of "
                   "perturbing the weights on them (RWP), help? Removal rate per epoch (3 seeds)", "cpu",
                   _lsc_removal(), checkpoints=("best", "last")),
        Experiment("cure-eff", "CURE Table 4: does CURE^Eff (natural warm-up inside the budget, no ST model) match "
                   "CURE from the ST model? (3 seeds)", "cpu", _cure_eff()),
        Experiment("baselines-from-st", "CURE Table 5: do AT, TRADES and MART started from the ST model reach "
                   "CURE's trade-off? (3 seeds)", "cpu", _baselines_from_st()),
        Experiment("cure-ablation", "CURE Table 7: do RGP and the revision model each raise the NRR of CURE as "
                   "the released code runs it? (3 seeds, last checkpoint)", "cpu", _cure_ablation()),
        Experiment("cure-grid", "CURE Table 10: how do gamma, p and rgp_alpha, one at a time around the defaults, "
                   "move CURE's natural and robust accuracy? (3 seeds)", "cpu", _cure_grid()),
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


def missing_attacks(run_dir: Path, attacks: Iterable[str], checkpoint: str) -> list[str]:
    """The ``attacks`` that ``run_dir``'s evaluation of ``checkpoint`` on EVAL_N test images does not hold yet."""
    path = run_dir / eval_file(checkpoint)
    done = runs.read_json(path) if path.exists() else {}
    have = set(done.get("results", {})) if done.get("n") == EVAL_N else set()
    return [a for a in attacks if a not in have]


class RefusedError(ValueError):
    """An experiment command refused before any work (one line says what to fix)."""


class StaleRunError(RefusedError):
    """A finished run started from a run that has been trained again since, with another outcome."""


def chosen(exp: Experiment, only: Iterable[str] | None) -> list[RunSpec]:
    """The runs of ``exp`` named in ``only`` (all when None), in the experiment's order; unknown names are refused."""
    if only is None:
        return list(exp.specs)
    wanted = set(only)
    if unknown := wanted - {s.name for s in exp.specs}:
        raise RefusedError(f"experiment {exp.name!r} has no runs {sorted(unknown)}; it has "
                           f"{[s.name for s in exp.specs]}")
    return [s for s in exp.specs if s.name in wanted]


def check_inits(exp: Experiment, root: Path, specs: Iterable[RunSpec]) -> None:
    """Refuse (before any work) finished runs of ``specs`` that started from an earlier training of their
    ``init`` run than the one now in ``root`` (see :func:`layerlab.runs.init_changed`)."""
    stale = [s.name for s in specs if s.init is not None and finished(root / s.name)
             and runs.init_changed(root / s.name, root / s.init / "checkpoints" / "best.pt")]
    if stale:
        raise StaleRunError(f"{exp.name}: {', '.join(stale)} in {root} started from an earlier training of the run "
                            f"they start from; move them out of the run root to train them again")


def evaluate_experiment(name: str, root: str | Path, *, only: Iterable[str] | None = None, progress: bool = False,
                        log: Callable[[str], None] = print) -> list[str]:
    """Evaluate every finished run of ``name`` (``only``: these) under its attacks, adding only missing ones;
    a record without checkpoints is retrained first. Safe in several processes at once; returns what this one
    evaluated (``RUN:CHECKPOINT``)."""
    exp = experiment(name)
    root = Path(root).expanduser().resolve()
    specs = chosen(exp, only)
    check_inits(exp, root, specs)
    wanted = {s.name for s in specs}
    done: list[str] = []
    # every run's worst case first, then the (slower) full AutoAttack checks
    passes = [(spec, ckpt, EVAL_ATTACKS) for spec in exp.specs for ckpt in exp.checkpoints]
    passes += [(spec, ckpt, exp.attacks(spec.name, ckpt)) for spec in exp.specs for ckpt in exp.checkpoints]
    for spec, checkpoint, attacks in passes:
        run_dir = root / spec.name
        if spec.name not in wanted or not finished(run_dir):
            continue
        if not missing_attacks(run_dir, attacks, checkpoint) or runs.is_locked(run_dir):
            continue
        try:
            records.materialize(run_dir, progress=progress, log=log)
            with runs.run_lock(run_dir):
                todo = missing_attacks(run_dir, attacks, checkpoint)
                if todo:
                    log(f"[{name}] evaluating {spec.name} ({checkpoint}): {', '.join(todo)} on {EVAL_N} images")
                    evaluate_run(run_dir, todo, checkpoint=checkpoint, n=EVAL_N, seed=0, progress=progress)
                    done.append(f"{spec.name}:{checkpoint}")
        except runs.RunDirBusyError:
            continue  # another process holds it
    return done


def run_experiment(name: str, root: str | Path, *, progress: bool = False, only: Iterable[str] | None = None,
                   log: Callable[[str], None] = print, poll_seconds: float = 30.0) -> list[str]:
    """Train every unfinished run of experiment ``name`` under ``root`` (``only``: these run names); returns
    the runs this process trained. Safe to run in several processes at once on one root."""
    exp = experiment(name)
    root = Path(root).expanduser().resolve()
    base = base_config(exp.profile)
    specs = chosen(exp, only)
    check_inits(exp, root, specs)
    root.mkdir(parents=True, exist_ok=True)
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
            # stopped before its first epoch ended: nothing to resume and nothing of value to keep
            restart = not resume and run_dir.exists() and not runs.read_jsonl(run_dir / "metrics.jsonl")
            log(f"[{name}] {'resuming' if resume else 'training'} {spec.name}")
            train(spec.config(base, root), run_dir, resume=resume, overwrite=restart, progress=progress)
        except runs.RunDirBusyError:
            continue  # another process took it between the check and the lock
        trained.append(spec.name)


def run_row(run_dir: Path) -> dict[str, Any]:
    """One finished run's numbers (from ``summary.json`` and ``metrics.jsonl``; a record is enough): last and
    best-on-validation natural / PGD accuracy on the test split, the robust best - last gap, and the last
    epoch's training accuracy on its adversarial examples."""
    summary = runs.read_json(run_dir / "summary.json")
    metrics = runs.read_jsonl(run_dir / "metrics.jsonl")
    best = summary.get("best", {})
    evals = {ckpt: eval_row(run_dir, ckpt) for ckpt in ("last", "best")}
    return {"run": run_dir.name, "group": group_of(run_dir.name), "seed": summary.get("seed", seed_of(run_dir.name)),
            "n_test": summary.get("n_test"), "last_natural": summary["natural_acc"], "last_robust": summary["robust_acc"],
            "best_epoch": summary.get("best_epoch"), "best_natural": best.get("natural_acc"),
            "best_robust": best.get("robust_acc"),
            "best_minus_last_robust": (None if best.get("robust_acc") is None
                                       else round(best["robust_acc"] - summary["robust_acc"], 2)),
            "train_adv_acc_last": metrics[-1].get("train_acc") if metrics else None,
            **{f"{ckpt}_{key}": value for ckpt, ev in evals.items() for key, value in ev.items()},
            "best_minus_last_worst": (None if None in (evals["best"]["worst"], evals["last"]["worst"])
                                      else round(evals["best"]["worst"] - evals["last"]["worst"], 2)),
            "hours": round(summary.get("seconds", 0.0) / 3600, 3)}


def eval_row(run_dir: Path, checkpoint: str) -> dict[str, Any]:
    """A checkpoint's evaluation on EVAL_N images: the worst case over EVAL_ATTACKS (None until all of them
    ran) and full AutoAttack where it ran."""
    path = run_dir / eval_file(checkpoint)
    report = runs.read_json(path) if path.exists() else {}
    results = report.get("results", {}) if report.get("n") == EVAL_N else {}
    worst = None
    if all(a in results for a in EVAL_ATTACKS):  # the point-wise worst case over exactly these attacks
        hits = [results[a]["correct"] for a in EVAL_ATTACKS]
        worst = round(100.0 * sum(all(h[i] == "1" for h in hits) for i in range(EVAL_N)) / EVAL_N, 2)
    return {"worst": worst, "aa": results.get("aa", {}).get("accuracy")}


def run_status(exp: Experiment, spec: RunSpec, root: Path) -> dict[str, Any]:
    """Where one run of ``exp`` stands under ``root``: ``state`` (absent, training, interrupted, record, finished),
    epochs done of the config's, training hours so far, and per evaluated checkpoint the attacks still missing
    and the hours its worst-case evaluation took (0 until it is complete)."""
    run_dir = root / spec.name
    epochs = spec.config(base_config(exp.profile), root).epochs
    metrics = runs.read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    if finished(run_dir):
        state = ("record" if records.is_record(run_dir) else "evaluating" if runs.is_locked(run_dir)
                 else "finished")
        hours = runs.read_json(run_dir / "summary.json").get("seconds", 0.0) / 3600
    else:
        state = "training" if runs.is_locked(run_dir) else "interrupted" if run_dir.exists() else "absent"
        hours = sum(r.get("seconds", 0.0) + r.get("eval_seconds", 0.0) for r in metrics) / 3600
    row: dict[str, Any] = {"run": spec.name, "state": state, "epoch": len(metrics), "epochs": epochs,
                           "hours": hours}
    for checkpoint in exp.checkpoints:
        path = run_dir / eval_file(checkpoint)
        report = runs.read_json(path) if path.exists() else {}
        results = report.get("results", {}) if report.get("n") == EVAL_N else {}
        row[f"{checkpoint}_missing"] = missing_attacks(run_dir, exp.attacks(spec.name, checkpoint), checkpoint)
        # the worst case's cost (EVAL_ATTACKS), once all of them ran: the unit of the estimate of what is left
        row[f"{checkpoint}_eval_hours"] = (sum(results[a].get("seconds", 0.0) for a in EVAL_ATTACKS) / 3600
                                           if all(a in results for a in EVAL_ATTACKS) else 0.0)
    return row


def status_lines(name: str | Experiment, root: str | Path) -> list[str]:
    """A readable account of experiment ``name`` (or an :class:`Experiment`) under ``root``: each run's state
    and what is left, then the core-hours left, estimated from this experiment's finished runs and evaluations."""
    import statistics

    exp, root = (name if isinstance(name, Experiment) else experiment(name)), Path(root)
    rows = [run_status(exp, spec, root) for spec in exp.specs]
    done_hours = [r["hours"] for r in rows if r["state"] in ("finished", "evaluating", "record")]
    per_run = statistics.median(done_hours) if done_hours else None
    lines = [f"{exp.name}: {exp.question}"]
    train_left = eval_left = 0.0
    evals_left = 0
    for r in rows:
        left = [f"{c}: {', '.join(r[f'{c}_missing'])}" for c in exp.checkpoints if r[f"{c}_missing"]]
        lines.append(f"  {r['run']:<40} {r['state']:<11} epoch {r['epoch']:>3}/{r['epochs']:<3} "
                     f"{r['hours']:5.2f} h" + (f"  to evaluate ({'; '.join(left)})" if left else ""))
        if r["state"] in ("absent", "training", "interrupted") and per_run is not None:
            train_left += per_run * (1 - r["epoch"] / r["epochs"])
        evals_left += sum(bool(r[f"{c}_missing"]) for c in exp.checkpoints)
    eval_hours = [r[f"{c}_eval_hours"] for r in rows for c in exp.checkpoints if r[f"{c}_eval_hours"] > 0]
    if eval_hours:
        eval_left = statistics.median(eval_hours) * evals_left
    trained = sum(r["state"] in ("finished", "evaluating", "record") for r in rows)
    estimate = ("unknown (no run finished yet)" if per_run is None
                else f"~{train_left:.1f} training + " + (f"~{eval_left:.1f}" if eval_hours else "unknown")
                + " evaluation")
    lines.append(f"  {trained}/{len(rows)} trained, {evals_left} checkpoint evaluations left; core-hours left: "
                 f"{estimate} (medians of this experiment's finished runs and worst-case evaluations; full "
                 "AutoAttack costs more)")
    return lines


SUMMARY_COLUMNS = ("last_natural", "last_robust", "last_worst", "last_aa", "best_natural", "best_robust",
                   "best_worst", "best_minus_last_robust", "best_minus_last_worst", "train_adv_acc_last")
# NRR metrics computed per run from two of its columns: (natural, robust)
NRR_METRICS = {"last_nrr": ("last_natural", "last_robust"), "best_nrr": ("best_natural", "best_robust"),
               "last_worst_nrr": ("last_natural", "last_worst"), "best_worst_nrr": ("best_natural", "best_worst")}
# the per-epoch columns of ``metrics.jsonl`` the experiments' figures read, beside each row's run, group and seed
CURVE_COLUMNS = ("epoch", "robust_acc", "train_acc", "removal_rate")


def metric_value(row: dict[str, Any], metric: str) -> float | None:
    """A run row's value of ``metric`` (None when it has none); NRR metrics (:data:`NRR_METRICS`) are computed
    from the row's accuracies. Rows read back from CSV files hold empty strings for missing values."""
    if metric in NRR_METRICS:
        nat, rob = (row.get(c) for c in NRR_METRICS[metric])
        return None if nat in (None, "") or rob in (None, "") else nrr(float(nat), float(rob))
    value = row.get(metric)
    return None if value in (None, "") else float(value)


def summarize(name: str, root: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-run rows and per-group rows (mean, sample std and n over seeds of :data:`SUMMARY_COLUMNS` and the NRR
    metrics) of experiment ``name``'s finished runs."""
    import statistics

    root = Path(root)
    rows = [run_row(root / s.name) for s in experiment(name).specs if finished(root / s.name)]
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    table = []
    for group, members in groups.items():
        out: dict[str, Any] = {"group": group, "n_seeds": len(members), "seeds": " ".join(str(m["seed"]) for m in members)}
        for col in (*SUMMARY_COLUMNS, *NRR_METRICS):
            values = [v for m in members if (v := metric_value(m, col)) is not None]
            out[f"{col}_mean"] = round(statistics.fmean(values), 2) if values else None
            out[f"{col}_std"] = round(statistics.stdev(values), 2) if len(values) > 1 else None
        out["hours"] = round(sum(m["hours"] for m in members), 2)
        table.append(out)
    return rows, table


def curves(name: str, root: str | Path) -> pd.DataFrame:
    """Every finished run's per-epoch rows of experiment ``name`` (:data:`CURVE_COLUMNS` of its
    ``metrics.jsonl``), with its run, group and seed."""
    root = Path(root)
    rows = [{"run": spec.name, "group": group_of(spec.name), "seed": seed_of(spec.name), **row}
            for spec in experiment(name).specs if finished(root / spec.name)
            for row in runs.read_jsonl(root / spec.name / "metrics.jsonl")]
    return pd.DataFrame(rows, columns=["run", "group", "seed", *CURVE_COLUMNS])


def store_paths(name: str, store: str | Path) -> tuple[Path, Path, Path]:
    """Experiment ``name``'s files in the results store ``store``: per-run rows, per-group rows, per-epoch rows."""
    store = Path(store)
    return store / f"{name}-runs.csv", store / f"{name}.csv", store / f"{name}-curves.csv"


def write_summary_csv(name: str, root: str | Path, out_dir: str | Path) -> list[Path]:
    """Experiment ``name``'s results store in ``OUT`` (:func:`store_paths`): ``NAME-runs.csv`` and ``NAME.csv``
    (see :func:`summarize`) and ``NAME-curves.csv`` (see :func:`curves`), all its figures draw."""
    import csv

    rows, table = summarize(name, root)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    runs_csv, table_csv, curves_csv = store_paths(name, out_dir)
    for path, data in ((runs_csv, rows), (table_csv, table)):
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(data[0]) if data else ["run"])
            writer.writeheader()
            writer.writerows(data)
    curves(name, root).to_csv(curves_csv, index=False)
    return [runs_csv, table_csv, curves_csv]


def group_hparams(name: str) -> dict[str, dict[str, Any]]:
    """The method hyper-parameters of every group of experiment ``name`` (``Method.hparams`` of its seed-0 run)."""
    return {group_of(s.name): build_method(s.changes["method"], s.changes.get("method_args", {})).hparams()
            for s in experiment(name).specs if s.changes.get("seed", 0) == 0}


ROBUST = ("best_robust", "last_robust", "best_worst", "last_worst")
TRADEOFF = ("last_natural", "last_robust", "last_worst")


def _awp_gamma_figure(table: pd.DataFrame, _: pd.DataFrame, out: Path) -> list[Path]:
    gammas = {g: hp.get("awp.gamma", 0.0) for g, hp in group_hparams("awp-gamma").items()}
    table = table.assign(gamma_multiple=[gammas[g] / AWP_GAMMA0 for g in table["group"]])
    return [plot_sweep(table, "gamma_multiple", ROBUST, out / "rwp_fig1a_awp_gamma.png",
                       xlabel=f"AWP weight-perturbation size gamma / {AWP_GAMMA0:g} (0 = AT)",
                       title="RWP Fig. 1a: AWP's robustness against its perturbation size")]


def _bars(file: str, metrics: tuple[str, ...], title: str) -> Callable[[pd.DataFrame, pd.DataFrame, Path], list[Path]]:
    return lambda table, _, out: [plot_group_bars(table, metrics, out / file, title=title)]


def _cure_decision_figure(table: pd.DataFrame, _: pd.DataFrame, out: Path) -> list[Path]:
    """Natural, PGD-20 and worst-case accuracy and the worst-case NRR the claims compare, last checkpoint."""
    return [plot_group_bars(table, (*TRADEOFF, "last_worst_nrr"), out / "cure_decision_last.png",
                            title=experiment("cure-decision").question, ylabel="test accuracy, NRR (%)")]


def _freeze_variants_figure(table: pd.DataFrame, _: pd.DataFrame, out: Path) -> list[Path]:
    """Every U-spec as the paper's text reads it and, hatched, as the released code runs it (``U-SPEC-code``)."""
    code = list(dict.fromkeys(group_of(s.name) for s in experiment("freeze-variants").specs
                              if s.changes.items() >= CODE_FREEZE.items()))
    return [plot_group_bars(table, TRADEOFF, out / "freeze_variants_last.png",
                            title=experiment("freeze-variants").question, hatched=code,
                            hatch_label="released code: stem trained, frozen statistics adapting")]


def _removal_figure(table: pd.DataFrame, curves_: pd.DataFrame, out: Path) -> list[Path]:
    return [plot_curves_and_removal(curves_, out / "rwp_appendix_removal_curves.png",
                                    title=f"Test robustness per epoch (removal below c_min = {C_MIN:g})"),
            plot_group_bars(table, ROBUST, out / "rwp_appendix_removal_best_last.png",
                            title="AT without the examples below c_min: best and last")]


def _overfitting_figures(table: pd.DataFrame, curves_: pd.DataFrame, out: Path) -> list[Path]:
    """CURE Fig. 5c / RWP Fig. 3c (test robustness per epoch, beside the training accuracy on the adversarial
    examples: the generalization gap) and CURE Table 3 / RWP Table 1 (best and last checkpoints)."""
    return [plot_epoch_curves(curves_, {"robust_acc": "test PGD-10 accuracy (%)",
                                        "train_acc": "training accuracy on its adversarial examples (%)"},
                              out / "cure_fig5c_rwp_fig3c_overfitting_curves.png",
                              title="Robust overfitting: test robustness per epoch"),
            plot_group_bars(table, ROBUST, out / "cure_table3_rwp_table1_best_last.png",
                            title="Best-on-validation and last checkpoints (1,000 test images)")]


def _rwp_sweep_figures(table: pd.DataFrame, _: pd.DataFrame, out: Path) -> list[Path]:
    """RWP Fig. 3a / 3b: best and last robustness against c_min and against K2 (the default run in both)."""
    hparams = group_hparams("rwp-sweeps")
    default = group_of(_rwp_sweeps()[0].name)
    paths = []
    for key, prefix, name, label, fig in (("rwp.c_min", "RWP-cmin", "c_min", "c_min", "3a"),
                                          ("rwp.steps", "RWP-k", "K2", "K2 (weight-perturbation steps)", "3b")):
        part = table[[g == default or g.startswith(prefix) for g in table["group"]]]
        part = part.assign(value=[hparams[g][key] for g in part["group"]])
        paths.append(plot_sweep(part, "value", ROBUST, out / f"rwp_fig{fig}_{name.lower()}.png", xlabel=label,
                                title=f"RWP Fig. {fig}: robustness against {name}"))
    return paths


# experiment -> what its figures are drawn with: (summary table, per-epoch curves, output folder) -> files
FIGURES: dict[str, Callable[[pd.DataFrame, pd.DataFrame, Path], list[Path]]] = {
    "cure-decision": _cure_decision_figure,
    "freeze-variants": _freeze_variants_figure,
    "robust-overfitting": _overfitting_figures,
    "rwp-sweeps": _rwp_sweep_figures,
    "awp-gamma": _awp_gamma_figure,
    "awp-loss-ranges": _bars("rwp_fig1c_awp_loss_ranges.png", ROBUST,
                             "RWP Fig. 1c: AWP generated from one loss range"),
    "lsc-removal": _removal_figure,
    "cure-eff": _bars("cure_table4_cure_eff.png", TRADEOFF, "CURE Table 4: CURE^Eff and CURE"),
    "baselines-from-st": _bars("cure_table5_from_st.png", TRADEOFF, "CURE Table 5: baselines from the ST model"),
    "cure-grid": _bars("cure_table10_grid.png", TRADEOFF, "CURE Table 10: gamma, p, rgp_alpha one at a time"),
}


def write_figures(name: str, store: str | Path, out_dir: str | Path) -> list[Path]:
    """Experiment ``name``'s figures (PNG files in ``OUT/NAME/``), drawn from its results store ``store`` alone:
    ``NAME.csv`` and ``NAME-curves.csv``, as :func:`write_summary_csv` writes them."""
    if name not in FIGURES:
        raise RefusedError(f"experiment {name!r} draws no figures; these do: {sorted(FIGURES)}")
    _, table_csv, curves_csv = store_paths(name, store)
    summarize_first = f"(python -m layerlab.experiments summarize {name} --runs RUN_ROOT --out {store})"
    for path in (table_csv, curves_csv):
        if not path.exists():
            raise RefusedError(f"{path} does not exist; write it first {summarize_first}")
    table = pd.read_csv(table_csv)
    if "group" not in table or table.empty:
        raise RefusedError(f"{table_csv} has no finished run; summarize {name} after one finished {summarize_first}")
    return FIGURES[name](table, pd.read_csv(curves_csv), Path(out_dir) / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m layerlab.experiments", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the experiment's unfinished runs into --runs")
    run.add_argument("name", choices=sorted(EXPERIMENTS))
    run.add_argument("--runs", required=True, help="run root (outside the repository)")
    run.add_argument("--only", default=None, help="comma-separated run names")
    run.add_argument("--progress", action="store_true")
    run.add_argument("--no-eval", action="store_true", help="train only (by default the finished runs are then "
                     f"evaluated: {', '.join(EVAL_ATTACKS)} on {EVAL_N} test images, + full AutoAttack for seeds "
                     f"{', '.join(map(str, AA_SEEDS))})")
    ev = sub.add_parser("evaluate", help="evaluate the experiment's finished runs (only missing attacks)")
    ev.add_argument("name", choices=sorted(EXPERIMENTS))
    ev.add_argument("--runs", required=True, help="run root")
    ev.add_argument("--only", default=None, help="comma-separated run names")
    ev.add_argument("--progress", action="store_true")
    ev.set_defaults(no_eval=False)
    sub.add_parser("list", help="the experiments and their runs")
    stat = sub.add_parser("status", help="each run's state, what is left to train and evaluate, core-hours left")
    stat.add_argument("names", nargs="*", metavar="NAME", help=f"experiments (default: all of {sorted(EXPERIMENTS)})")
    stat.add_argument("--runs", required=True, help="run root")
    summ = sub.add_parser("summarize", help="per-run and per-group (mean, std over seeds) CSVs of the finished runs")
    summ.add_argument("name", choices=sorted(EXPERIMENTS))
    summ.add_argument("--runs", required=True, help="run root")
    summ.add_argument("--out", required=True, help="the results store: NAME-runs.csv, NAME.csv, NAME-curves.csv")
    figs = sub.add_parser("figures", help="the experiment's figures from its results store (error bars over seeds)")
    figs.add_argument("name", choices=sorted(FIGURES))
    figs.add_argument("--store", required=True, help="the results store summarize wrote (e.g. results/experiments)")
    figs.add_argument("--out", required=True, help="PNGs go to OUT/NAME/ (e.g. figures/experiments)")
    args = parser.parse_args(argv)
    if args.command == "figures":
        try:
            paths = write_figures(args.name, args.store, args.out)
        except RefusedError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        for path in paths:
            print(path)
        return 0
    if args.command == "summarize":
        for path in write_summary_csv(args.name, args.runs, args.out):
            print(path)
        return 0
    if args.command == "status":
        if not Path(args.runs).is_dir():
            print(f"error: run root {args.runs} does not exist; pass the --runs directory the experiments train into",
                  file=sys.stderr)
            return 2
        if unknown := [n for n in args.names if n not in EXPERIMENTS]:
            print(f"error: unknown experiment {unknown[0]!r}; choose from {sorted(EXPERIMENTS)}", file=sys.stderr)
            return 2
        for name in args.names or EXPERIMENTS:
            print("\n".join(status_lines(name, args.runs)))
        return 0
    if args.command == "list":
        for exp in EXPERIMENTS.values():
            print(f"{exp.name} ({exp.profile}): {exp.question}\n  " + " ".join(s.name for s in exp.specs))
        return 0
    from layerlab.system import tune_cpu_allocator

    tune_cpu_allocator()
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    try:
        if args.command == "run":
            run_experiment(args.name, args.runs, progress=args.progress, only=only)
        if args.command == "evaluate" or not args.no_eval:
            evaluate_experiment(args.name, args.runs, progress=args.progress, only=only)
    except RefusedError as err:  # a bad argument or a stale run: one line, nothing done
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
