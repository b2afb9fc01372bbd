"""The analyses the figures draw, each computed once and re-used while its settings match.

Per-run results live in the run directory (``eval.json``, ``cka.json``, ``corruptions.csv``, ``lsc.csv``,
``removal_rate.csv``), so the explorer (:mod:`layerlab.explore`) finds them there; results that compare
several runs live in ``RUN_ROOT/analysis/``. An analysis that needs a restored run's weights retrains the run
first (:func:`layerlab.records.materialize`), and its cost is logged (:func:`layerlab.runs.costed`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from layerlab import runs
from layerlab.analysis.attributions import attributions_runs
from layerlab.analysis.cka import cka_run
from layerlab.analysis.corruptions import CORRUPTIONS, corruptions_run
from layerlab.analysis.lsc import epoch_checkpoints, mu_grid, recorded_epoch_checkpoints, lsc_run
from layerlab.analysis.minimum import minpert_runs
from layerlab.evaluation import evaluate_run
from layerlab.gallery.runs import method_runs
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
    """``RUN/eval.json`` holding ``attacks`` on ``eval_n`` test images; only missing attacks are run."""
    def usable(rep: dict[str, Any] | None) -> bool:
        return rep is not None and rep.get("checkpoint") == "best" and (ctx.s.eval_n is None
                                                                        or rep.get("n") == ctx.s.eval_n)

    def missing(rep: dict[str, Any] | None) -> list[str]:
        if not usable(rep):
            return list(attacks)
        return [a for a in attacks if a not in _have_attacks(rep)
                or (a == "eps-sweep" and not _sweep_ok(rep, ctx.s.sweep_255))]

    path = run_dir / "eval.json"
    kw = dict(n=ctx.s.eval_n, data_dir=ctx.data_dir, sweep_255=ctx.s.sweep_255, seed=0, progress=ctx.progress)
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


def tradeoff_table(ctx: Context, run_dirs: PathMap) -> pd.DataFrame:
    """CURE Table 1: natural, PGD-20, CW-inf, AutoAttack and NRR (on the strongest attack run) per method."""
    rows = []
    for run in run_dirs.values():
        rep = evaluated(ctx, run, ctx.s.attacks)
        res = rep["results"]
        acc = {a: res[a]["accuracy"] for a in ctx.s.attacks if a in res}
        cw = next((a for a in ctx.s.attacks if a.startswith("cw")), None)
        robust_attack = "aa" if "aa" in acc else "pgd20"
        rows.append({"method": run.name, "natural": acc["natural"], "pgd20": acc.get("pgd20"),
                     "cw_inf": acc.get(cw) if cw else None, "aa": acc.get("aa"),
                     "robust": acc[robust_attack], "robust_attack": {"aa": "AutoAttack"}.get(robust_attack, "PGD-20"),
                     "worst_linf": rep["worst_case"]["linf"]["accuracy"],
                     "nrr": nrr(acc["natural"], acc[robust_attack]), "n": rep["n"]})
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
