"""The analyses the figures draw, each computed once and re-used while its settings match.

Results that a paper claim rests on are read over every training seed of a run (``NAME``, ``NAME-s1``, ...,
:func:`seed_runs`) and reported as mean and sample standard deviation (:func:`seed_table`), at the best-on-validation
and the last checkpoint.

Per-run results live in the run directory (``eval.json``, ``cka.json``, ``corruptions.csv``, ``lsc.csv``,
``removal_rate.csv``), so the explorer (:mod:`layerlab.explore`) finds them there; results that compare
several runs live in ``RUN_ROOT/analysis/``. An analysis that needs a restored run's weights retrains the run
first (:func:`layerlab.records.materialize`), and its cost is logged (:func:`layerlab.runs.costed`).
"""

from __future__ import annotations

import glob
import statistics
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from layerlab import runs
from layerlab.analysis.attributions import attributions_runs
from layerlab.analysis.cka import cka_run
from layerlab.analysis.corruptions import CORRUPTIONS, corruptions_run
from layerlab.analysis.lsc import epoch_checkpoints, mu_grid, recorded_epoch_checkpoints, lsc_run
from layerlab.analysis.minimum import minpert_runs
from layerlab.claims import Estimate
from layerlab.evaluation import eval_file, evaluate_run
from layerlab.experiments import group_of, seed_of
from layerlab.gallery.runs import method_runs, summary
from layerlab.gallery.settings import Context, PathMap
from layerlab.records import is_record, materialize
from layerlab.train import nrr


def _have_attacks(report: dict[str, Any]) -> set[str]:
    have = set(report.get("results", {}))
    return have | ({"eps-sweep"} if "eps_sweep" in report else set())


def _sweep_ok(report: dict[str, Any], sweep_255: Sequence[float]) -> bool:
    points = report.get("eps_sweep", {}).get("points", [])
    return [round(p["eps_255"], 6) for p in points] == [round(float(e), 6) for e in sweep_255]


def evaluated(ctx: Context, run_dir: Path, attacks: Sequence[str]) -> dict[str, Any]:
    """The evaluation of the profile's ``eval_checkpoint`` (``RUN/eval.json`` for best, ``RUN/eval-last.json``)
    holding ``attacks`` on ``eval_n`` test images; only missing attacks are run."""
    checkpoint = ctx.s.eval_checkpoint

    def usable(rep: dict[str, Any] | None) -> bool:
        return rep is not None and rep.get("checkpoint") == checkpoint and (ctx.s.eval_n is None
                                                                            or rep.get("n") == ctx.s.eval_n)

    def missing(rep: dict[str, Any] | None) -> list[str]:
        if not usable(rep):
            return list(attacks)
        return [a for a in attacks if a not in _have_attacks(rep)
                or (a == "eps-sweep" and not _sweep_ok(rep, ctx.s.sweep_255))]

    path = run_dir / eval_file(checkpoint)
    kw = dict(checkpoint=checkpoint, n=ctx.s.eval_n, data_dir=ctx.data_dir, sweep_255=ctx.s.sweep_255, seed=0,
              progress=ctx.progress)
    with runs.analysis_lock(run_dir, "eval"):
        report = runs.read_json(path) if path.exists() else None
        todo = missing(report)
        if todo:
            materialize(run_dir, progress=ctx.progress)
            with runs.costed(run_dir, "eval"):
                report = evaluate_run(run_dir, todo, **kw)
                if missing(report):  # an older report with another n was replaced: run the whole list
                    report = evaluate_run(run_dir, list(attacks), **kw)
    return report


def evaluate_as_trained(ctx: Context, methods: Sequence[str], attacks: Sequence[str]) -> PathMap:
    """Each method's run, with ``attacks`` run on it before the next method trains: an evaluation needs the run's
    weights, and a long gallery's weights need not outlive the session that trained them (records keep results)."""
    for method in methods:
        evaluated(ctx, method_runs(ctx, [method])[method], attacks)
    return method_runs(ctx, methods)


CHECKPOINTS = ("best", "last")  # best on validation, last epoch
# The headline robust accuracy of a table: the strongest measure every seed of every row has.
ROBUST_ORDER = ("worst", "aa", "pgd20")
ROBUST_NAMES = {"worst": "worst case", "aa": "AutoAttack", "pgd20": "PGD-20"}
ACCURACIES = ("natural", "pgd20", "cw_inf", "aa")


def seed_runs(run_dir: Path) -> list[Path]:
    """A run and its finished seed siblings in the same run root (``NAME``, ``NAME-s1``, ``NAME-s2``, ...),
    in seed order."""
    run_dir = Path(run_dir)
    siblings = [p for p in run_dir.parent.glob(f"{glob.escape(run_dir.name)}-s*")
                if group_of(p.name) == run_dir.name and (p / "summary.json").exists()]
    return [run_dir] + sorted(siblings, key=lambda p: seed_of(p.name))


def checkpoint_accuracies(run_dir: Path, checkpoint: str, evaluated: bool = True) -> dict[str, Any]:
    """Natural, PGD-20, CW-inf, AutoAttack and worst-case accuracy of one checkpoint, how many test images and
    where from (``source``): the checkpoint's evaluation file where it has one (``eval.json``, ``eval-last.json``)
    and ``evaluated``, else the trainer's natural and PGD-20 accuracy on its test split (``summary.json``);
    missing numbers are None."""
    path = Path(run_dir) / eval_file(checkpoint)
    report = runs.read_json(path) if evaluated and path.exists() else {}
    res = report.get("results", {})
    if "natural" in res:
        worst = report.get("worst_case", {}).get("linf")
        cw = next((res[a]["accuracy"] for a in sorted(res) if a.startswith("cw")), None)
        return {"natural": res["natural"]["accuracy"], "pgd20": res.get("pgd20", {}).get("accuracy"), "cw_inf": cw,
                "aa": res.get("aa", {}).get("accuracy"), "n": report.get("n"), "source": path.name,
                # a worst case over one attack is that attack: only several make it the headline
                "worst": worst["accuracy"] if worst and len(set(worst["attacks"]) - {"natural"}) > 1 else None}
    s = summary(run_dir)
    part = s if checkpoint == "last" else s.get("best", {})
    return {"natural": part.get("natural_acc"), "pgd20": part.get("robust_acc"), "cw_inf": None, "aa": None,
            "worst": None, "n": part.get("n_test", s.get("n_test")), "source": "summary.json"}


def alike_accuracies(seeds: Sequence[Path], checkpoint: str) -> list[dict[str, Any]]:
    """One checkpoint's accuracies (:func:`checkpoint_accuracies`) of several seeds of a run, measured alike: from
    their evaluation files if every seed has one on as many images, else all from the trainer's test split."""
    found = [checkpoint_accuracies(m, checkpoint) for m in seeds]
    if len({(a["source"], a["n"]) for a in found}) > 1:
        found = [checkpoint_accuracies(m, checkpoint, evaluated=False) for m in seeds]
    return found


def paired_accuracies(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The best-on-validation and last checkpoint's accuracies (:func:`checkpoint_accuracies`) on the same test
    images, so their difference is the checkpoints': both from evaluation files on as many images, else both from
    the trainer's test split."""
    found = {c: checkpoint_accuracies(run_dir, c) for c in CHECKPOINTS}
    if len({a["n"] for a in found.values()}) > 1 or len({a["source"] == "summary.json" for a in found.values()}) > 1:
        found = {c: checkpoint_accuracies(run_dir, c, evaluated=False) for c in CHECKPOINTS}
    return found


def _estimate(values: Sequence[float]) -> Estimate:
    return Estimate(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))


def _images(accuracies: Sequence[dict[str, Any]]) -> str:
    """The test-image counts behind some accuracies (``1000``, or ``500/1000`` when they differ)."""
    return "/".join(str(n) for n in sorted({a["n"] for a in accuracies}, key=lambda n: (n is None, n or 0)))


def _put(row: dict[str, Any], name: str, values: Sequence[float | None]) -> None:
    """``name`` (mean) and ``name_std`` (sample std; NaN for one seed) over the seeds; NaN unless every seed has
    the number."""
    row[name] = row[f"{name}_std"] = float("nan")
    if values and all(v is not None for v in values):
        est = _estimate([float(v) for v in values])
        row[name] = est.mean
        if est.n > 1:
            row[f"{name}_std"] = est.std


def seed_table(run_dirs: dict[str, Path], checkpoints: Sequence[str] = CHECKPOINTS) -> pd.DataFrame:
    """One row per label and checkpoint: mean and sample std (``COL_std``) over the label's seeds
    (:func:`seed_runs`) of natural, PGD-20, CW-inf and AutoAttack accuracy (NaN unless every seed has it), of the
    headline robust accuracy ``robust`` and of NRR and SUM (natural + robust, CURE Table 8) on it; with the seeds and the test images per seed.

    A row's seeds are measured alike (:func:`alike_accuracies`); ``robust`` is one measure for the whole table at a
    checkpoint, so its rows compare: the worst case over the evaluated attacks if every seed of every label has it,
    else AutoAttack, else PGD-20 (``robust_attack``)."""
    members = {label: seed_runs(run_dir) for label, run_dir in run_dirs.items()}
    acc = {(label, c): alike_accuracies(runs_, c) for label, runs_ in members.items() for c in checkpoints}
    keys = {c: next((k for k in ROBUST_ORDER if all(a[k] is not None for label in members for a in acc[label, c])),
                    None) for c in checkpoints}
    rows = []
    for (label, checkpoint), seeds in acc.items():
        key = keys[checkpoint]
        row: dict[str, Any] = {"method": label, "checkpoint": checkpoint}
        for col in ACCURACIES:
            _put(row, col, [a[col] for a in seeds])
        _put(row, "robust", [a[key] for a in seeds] if key else [])
        _put(row, "nrr", [nrr(a["natural"], a[key]) for a in seeds] if key else [])
        _put(row, "sum", [a["natural"] + a[key] for a in seeds] if key else [])  # CURE Table 8, beside NRR
        row.update({"robust_attack": ROBUST_NAMES.get(key, ""), "n_seeds": len(seeds),
                    "seeds": " ".join(str(seed_of(m.name)) for m in members[label]),
                    "n_images": _images(seeds)})
        rows.append(row)
    return pd.DataFrame(rows)


def tradeoff_table(ctx: Context, run_dirs: PathMap) -> pd.DataFrame:
    """CURE Table 1 over seeds (:func:`seed_table`): natural, PGD-20, CW-inf, AutoAttack, the headline robust
    accuracy and NRR per method and checkpoint; the gallery's own runs are evaluated first (the profile's
    ``eval_checkpoint``)."""
    for run in run_dirs.values():
        evaluated(ctx, run, ctx.s.attacks)
    return seed_table({run.name: run for run in run_dirs.values()})


def shown_checkpoint(table: pd.DataFrame, column: str) -> str:
    """The checkpoint a figure shows: ``last`` when every row of it has ``column``, else ``best``."""
    last = table[table["checkpoint"] == "last"]
    return "last" if len(last) and last[column].notna().all() else "best"


def overfitting_seed_table(run_dirs: dict[str, Path]) -> pd.DataFrame:
    """CURE Table 3 over seeds: best-on-validation and last natural and robust accuracy and last - best
    (``delta_*``, per seed on the same test images (:func:`paired_accuracies`), then mean and std), one row per
    run; the robust measure is one for the whole table (as in :func:`seed_table`, over both checkpoints)."""
    members = {label: seed_runs(run_dir) for label, run_dir in run_dirs.items()}
    paired = {label: [paired_accuracies(m) for m in runs_] for label, runs_ in members.items()}
    acc = {label: {c: [p[c] for p in pairs] for c in CHECKPOINTS} for label, pairs in paired.items()}
    key = next((k for k in ROBUST_ORDER if all(a[k] is not None for by_ckpt in acc.values()
                                               for seeds in by_ckpt.values() for a in seeds)), "pgd20")
    rows = []
    for label, by_ckpt in acc.items():
        row: dict[str, Any] = {"run": label}
        for short, col in (("nat", "natural"), ("rob", key)):
            best, last = by_ckpt["best"], by_ckpt["last"]
            _put(row, f"best_{short}", [a[col] for a in best])
            _put(row, f"last_{short}", [a[col] for a in last])
            _put(row, f"delta_{short}", [None if None in (b[col], e[col]) else e[col] - b[col]
                                         for b, e in zip(best, last)])
        row.update({"robust_attack": ROBUST_NAMES[key], "selected_on": "val", "n_seeds": len(members[label]),
                    "seeds": " ".join(str(seed_of(m.name)) for m in members[label]),
                    "n_images": _images([a for seeds in by_ckpt.values() for a in seeds])})
        rows.append(row)
    return pd.DataFrame(rows)


def cka_result(ctx: Context, run_dir: Path) -> Path:
    """``RUN/cka.json`` (natural vs adversarial, best checkpoint, ``cka_n`` test images), computed once."""
    path = run_dir / "cka.json"
    want = ctx.s.cka_n if ctx.cfg.test_size is None else min(ctx.s.cka_n, ctx.cfg.test_size)
    with runs.analysis_lock(run_dir, "cka"):
        if path.exists():
            old = runs.read_json(path)
            if old.get("mode") == "nat-vs-adv" and old.get("n") == want and old.get("checkpoint") == "best":
                return path
        materialize(run_dir, progress=ctx.progress)
        with runs.costed(run_dir, "cka"):
            _, path = cka_run(run_dir, n=ctx.s.cka_n, batch_size=ctx.s.cka_batch, data_dir=ctx.data_dir,
                              progress=ctx.progress)
    return path


def corruption_result(ctx: Context, run_dir: Path) -> Path:
    """``RUN/corruptions.csv`` (all 15 corruptions at the profile's severities), computed once."""
    path = run_dir / "corruptions.csv"
    with runs.analysis_lock(run_dir, "corruptions"):
        if path.exists():
            old = pd.read_csv(path)
            have = set(zip(old["type"], old["severity"]))
            want = {(t, s) for t in CORRUPTIONS for s in ctx.s.corruption_severities}
            n_ok = ctx.s.corruption_n is None or int(old["n"].iloc[0]) == min(ctx.s.corruption_n,
                                                                              ctx.cfg.test_size or ctx.s.corruption_n)
            if want <= have and n_ok:
                return path
        materialize(run_dir, progress=ctx.progress)
        with runs.costed(run_dir, "corruptions"):
            csv, _ = corruptions_run(run_dir, n=ctx.s.corruption_n,
                                         severities=list(ctx.s.corruption_severities), data_dir=ctx.data_dir,
                                         progress=ctx.progress)
    return csv


def _same_runs(json_path: Path, run_dirs: Sequence[Path], n: int) -> bool:
    """Whether a multi-run analysis file covers exactly ``run_dirs`` with ``n`` images."""
    if not json_path.exists():
        return False
    info = runs.read_json(json_path)
    return [m["run"] for m in info.get("models", [])] == [str(r) for r in run_dirs] and len(info["indices"]) == n


def minpert_attribution_results(ctx: Context, run_dirs: Sequence[Path]) -> PathMap:
    """``RUN_ROOT/analysis/{minpert,attributions}.json`` of ``run_dirs`` (the same images for every model),
    computed once; their files become sources of the call's manifest."""
    analysis = ctx.root / "analysis"
    paths = {"minpert": analysis / "minpert.json", "attributions": analysis / "attributions.json"}
    with runs.analysis_lock(analysis, "minpert-attributions"):
        minpert_ok = _same_runs(paths["minpert"], run_dirs, ctx.s.minpert_n)
        attributions_ok = _same_runs(paths["attributions"], run_dirs, ctx.s.attr_n)
        if not (minpert_ok and attributions_ok):
            for run in run_dirs:  # both analyses load the models' weights
                materialize(run, progress=ctx.progress)
        if not minpert_ok:
            with runs.costed(analysis, "minpert"):
                minpert_runs(run_dirs, analysis, n=ctx.s.minpert_n, iters=ctx.s.minpert_iters,
                                 steps=ctx.s.minpert_steps, fmn_steps=ctx.s.fmn_steps, data_dir=ctx.data_dir,
                                 progress=ctx.progress)
        if not attributions_ok:
            with runs.costed(analysis, "attributions"):
                attributions_runs(run_dirs, analysis, n=ctx.s.attr_n, ig_steps=ctx.s.ig_steps,
                                      layer_steps=ctx.s.layer_steps, data_dir=ctx.data_dir)
    ctx.sources += [paths["minpert"], paths["attributions"], analysis / runs.COSTS]
    return paths


def lsc_result(ctx: Context, run_dir: Path) -> PathMap:
    """``RUN/lsc.csv`` and ``RUN/removal_rate.csv`` over evenly spaced per-epoch checkpoints, computed once."""
    paths = {"lsc": run_dir / "lsc.csv", "removal_rate": run_dir / "removal_rate.csv"}
    per_epoch = recorded_epoch_checkpoints(run_dir) if is_record(run_dir) else epoch_checkpoints(run_dir)
    tokens = [str(p) for p in spread(per_epoch, ctx.s.lsc_panels)] or ["best", "last"]
    with runs.analysis_lock(run_dir, "lsc"):
        if all(p.exists() for p in paths.values()):
            old = pd.read_csv(paths["lsc"])
            if len(old) and old["checkpoint"].nunique() == len(tokens) and old["mu"].nunique() == ctx.s.lsc_points:
                return paths
        materialize(run_dir, progress=ctx.progress)
        with runs.costed(run_dir, "lsc"):
            return lsc_run(run_dir, tokens, n=ctx.s.lsc_n, mus=mu_grid(-1.0, 1.0, ctx.s.lsc_points),
                           directions=ctx.s.lsc_directions, attack_steps=ctx.cfg.attack_steps,
                           data_dir=ctx.data_dir, progress=ctx.progress, plot=False)


def spread(items: Sequence[Any], k: int) -> list[Any]:
    """``k`` items evenly spread over ``items`` (first and last included)."""
    if len(items) <= k:
        return list(items)
    if k == 1:
        return [items[-1]]
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]
