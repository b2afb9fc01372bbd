"""The figure groups: each draws one notebook's figures and tables of the CURE and RWP papers.

A figure function takes a call's :class:`~layerlab.gallery.settings.Context`, trains or re-uses the runs it
needs (:mod:`layerlab.gallery.runs`), computes or re-uses their analyses (:mod:`layerlab.gallery.results`),
writes its figures (:mod:`layerlab.plots`) and tables into the group's folder and returns ``{name: path}``.
:data:`DRAW` holds one per :data:`~layerlab.gallery.settings.GROUPS` key; :func:`layerlab.gallery.manifest.make`
calls them and records what they used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

from layerlab import runs

from layerlab.analysis.curves import write_curves
from layerlab.analysis.layer_stats import read_layer_stats
from layerlab.evaluation import eval_file
from layerlab.gallery.results import (
    cka_result,
    corruption_result,
    evaluate_as_trained,
    lsc_result,
    minpert_attribution_results,
    overfitting_seed_table,
    seed_runs,
    seed_table,
    shown_checkpoint,
    tradeoff_table,
)
from layerlab.gallery.runs import cure_runs, freeze_runs, method_runs, rwp_sweep_runs, summary
from layerlab.gallery.settings import (
    ANALYSIS_METHODS,
    CURE_ABLATION,
    CURE_RUN,
    GROUPS,
    OVERFIT_METHODS,
    Context,
    PathMap,
)
from layerlab.plots.accuracy import plot_ablation, plot_freeze_study, plot_sweeps, plot_tradeoff
from layerlab.plots.cka import plot_cka, plot_cka_grid
from layerlab.plots.curves import plot_curves
from layerlab.plots.layer_stats import plot_block_gradient_panels, plot_updated_by_phase
from layerlab.plots.lsc import plot_lsc, plot_removal_rates
from layerlab.plots.robustness import (
    plot_attributions,
    plot_block_attributions,
    plot_corruption_groups,
    plot_corruptions,
    plot_eps_sweep,
    plot_minpert,
)

DRAW: dict[str, Callable[[Context], PathMap]] = {}


def draws(key: str) -> Callable[[Callable[[Context], PathMap]], Callable[[Context], PathMap]]:
    """Register the figure function of group ``key`` (which must be a :data:`GROUPS` key)."""
    def register(fn: Callable[[Context], PathMap]) -> Callable[[Context], PathMap]:
        if key not in GROUPS:
            raise KeyError(f"{key!r} is not a figure group")
        DRAW[key] = fn
        return fn
    return register


def _write_csv(frame: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, float_format="%.2f")
    return path


@draws("freeze_study")
def freeze_study(ctx: Context) -> PathMap:
    """CURE Fig. 2b (re-initialized) and Fig. 11 (fine-tuned): ST, SAT and every U-spec, over every seed of each
    run (best-on-validation and last checkpoint)."""
    out = ctx.group_dir(GROUPS["freeze_study"])
    parts = []
    for reinit, panel in ((True, "updated blocks re-initialized (Fig. 2b)"),
                          (False, "updated blocks fine-tuned (Fig. 11)")):
        found = freeze_runs(ctx, reinit)
        specs = {label: summary(run).get("update") or "" for label, run in found.items()}
        part = seed_table(found).rename(columns={"method": "model"})
        part.insert(0, "panel", panel)
        part.insert(2, "spec", part["model"].map(specs))
        part.insert(3, "reinit", [reinit if m not in ("ST", "SAT") else "" for m in part["model"]])
        parts.append(part)
    table = pd.concat(parts, ignore_index=True)
    return {"table": _write_csv(table, out / "cure_fig2b_fig11_freeze_study.csv"),
            "figure": plot_freeze_study(table, out / "cure_fig2b_fig11_freeze_study.png")}


@draws("cka")
def cka(ctx: Context) -> PathMap:
    """CURE Fig. 3 (CKA natural vs adversarial for ST, AT and the U-spec models) and Fig. 12 (CURE)."""
    out = ctx.group_dir(GROUPS["cka"])
    for spec in ctx.s.specs:  # CKA of each U-spec model as soon as it is trained (it needs the weights)
        for run in freeze_runs(ctx, reinit=True, specs=[spec]).values():
            cka_result(ctx, run)
    models = freeze_runs(ctx, reinit=True)
    cure = method_runs(ctx, ["cure"])["cure"]
    jsons = {label: cka_result(ctx, run) for label, run in models.items()}
    cure_json = cka_result(ctx, cure)
    return {"fig3": plot_cka_grid(jsons, out / "cure_fig3_cka.png", "CKA natural vs adversarial (Fig. 3)"),
            "fig12": plot_cka(cure_json, out / "cure_fig12_cka_cure.png", label=cure.name)}


@draws("overfitting")
def overfitting(ctx: Context) -> PathMap:
    """Robust overfitting: CURE Fig. 4 (U-spec test curves, the profile's freeze-study runs), Fig. 5c and Table 3
    (best/last/delta, in the profile's overfitting regime where it has one)."""
    out = ctx.group_dir(GROUPS["overfitting"])
    models = freeze_runs(ctx, reinit=True)
    uspec_runs = [models["SAT"]] + [r for k, r in models.items() if k not in ("ST", "SAT")]
    uspec = write_curves(with_seeds(uspec_runs), out / "fig4_data", plot=False)
    fig4 = "CURE Fig. 4: SAT (AT) and the U-spec models (updated blocks re-initialized)"
    if ctx.s.regime:
        fig4 += "\nthe profile's freeze-study runs, not the overfitting regime's (it has no U-spec runs)"
    methods = method_runs(ctx.overfitting(), OVERFIT_METHODS)
    compare = write_curves(with_seeds(methods.values()), out / "fig5c_data", plot=False)
    table = _write_csv(overfitting_seed_table({r.name: r for r in methods.values()}),
                       out / "cure_table3_overfitting.csv")
    return {"fig4": plot_curves(uspec["curves"], uspec["overfitting"], out / "cure_fig4_uspec_curves.png",
                                title=fig4,
                                groups=seed_groups(uspec_runs)),
            "fig5c": plot_curves(compare["curves"], compare["overfitting"], out / "cure_fig5c_curves.png",
                                 title=f"CURE Fig. 5c: {', '.join(r.name for r in methods.values())}",
                                 groups=seed_groups(methods.values())),
            "table3": table}


def with_seeds(run_dirs) -> list[Path]:
    """Every run of ``run_dirs`` followed by its finished seed siblings (:func:`seed_runs`)."""
    return [member for run in run_dirs for member in seed_runs(run)]


def seed_groups(run_dirs) -> dict[str, str]:
    """Seed run name -> the run it is a seed of, for every run of ``run_dirs``."""
    return {member.name: Path(run).name for run in run_dirs for member in seed_runs(run)}


@draws("tradeoff")
def tradeoff(ctx: Context) -> PathMap:
    """CURE Fig. 1 / 5a (natural against C&W, and against AutoAttack or the worst case) and a Table-1-style table
    (natural, PGD-20, CW-inf, AA, the headline robust accuracy, NRR), over seeds, at both checkpoints."""
    out = ctx.group_dir(GROUPS["tradeoff"])
    table = tradeoff_table(ctx, evaluate_as_trained(ctx, ctx.s.methods, ctx.s.attacks))
    return {"table1": _write_csv(table, out / "cure_table1_tradeoff.csv"),
            "fig1": plot_tradeoff(table, out / "cure_fig1_fig5a_tradeoff.png",
                                  checkpoint=shown_checkpoint(table, "cw_inf"))}


@draws("attack_strength")
def attack_strength(ctx: Context) -> PathMap:
    """CURE Fig. 5b: PGD-20 accuracy against the attack's eps, one line per method."""
    out = ctx.group_dir(GROUPS["attack_strength"])
    run_dirs = evaluate_as_trained(ctx, ctx.s.methods, ["natural", "eps-sweep"])
    return {"fig5b": plot_eps_sweep({r.name: r / eval_file(ctx.s.eval_checkpoint) for r in run_dirs.values()},
                                    out / "cure_fig5b_eps_sweep.png")}


def _mask_note(run_dir: Path) -> str | None:
    """What a CURE run's "updated" share means under the released code's mask rule (else None)."""
    hparams = runs.read_json(run_dir / "config.json").get("method_hparams", {})
    if hparams.get("rgp.rule") != "code":
        return None
    return ("released code's mask: the blocks' conv1 gradients below the p-th percentile are zeroed, but momentum "
            "and weight decay still move those weights, so a step changes nearly all of them")


@draws("gradients")
def gradients(ctx: Context) -> PathMap:
    """CURE Fig. 6a (gradient per block over training) and 6b (CURE's weights updated per layer and phase: per
    step, and at least once per epoch), from each run's layer_stats.jsonl; the same view of AT and TRADES is an
    extension (the paper shows it for CURE only)."""
    out = ctx.group_dir(GROUPS["gradients"])
    run_dirs = method_runs(ctx, ["at", "trades", "cure"])
    stats = {name: read_layer_stats(run) for name, run in run_dirs.items()}
    paths = {"fig6a": plot_block_gradient_panels({run_dirs[k].name: stats[k] for k in ("at", "cure")},
                                                  out / "cure_fig6a_grads_per_block.png"),
             "fig6b": plot_updated_by_phase(stats["cure"], out / "cure_fig6b_updated_cure.png",
                                            label=run_dirs["cure"].name, note=_mask_note(run_dirs["cure"]))}
    for name in ("at", "trades"):
        label = f"{run_dirs[name].name} (extension, not a paper figure)"
        paths[f"ext_updated_{name}"] = plot_updated_by_phase(stats[name], out / f"ext_updated_{name}.png", label)
    return paths


@draws("corruptions")
def corruptions(ctx: Context) -> PathMap:
    """CURE Fig. 7 (mean accuracy per corruption group and severity) and Fig. 9 (every corruption)."""
    out = ctx.group_dir(GROUPS["corruptions"])
    csvs = {}
    for method in ANALYSIS_METHODS:  # each analysed before the next trains (the analysis needs the weights)
        run = method_runs(ctx, [method])[method]
        csvs[run.name] = corruption_result(ctx, run)
    paths = {"fig7": plot_corruption_groups(csvs, out / "cure_fig7_corruption_groups.png")}
    for name, csv in csvs.items():
        paths[f"fig9_{name}"] = plot_corruptions(csv, out / f"cure_fig9_corruptions_{name}.png", title=name)
    return paths


@draws("minpert_attributions")
def minpert_attributions(ctx: Context) -> PathMap:
    """CURE Fig. 8: minimum L-inf perturbations of ST, AT and CURE; and, as an extension the paper does not have,
    their captum attributions (input saliency and integrated gradients, layer attributions per block)."""
    out = ctx.group_dir(GROUPS["minpert_attributions"])
    models = method_runs(ctx, ANALYSIS_METHODS)
    found = minpert_attribution_results(ctx, list(models.values()))
    names = ", ".join(r.name for r in models.values())
    return {"fig8_minpert": plot_minpert(found["minpert"], out / "cure_fig8_minpert.png"),
            "ext_attributions": plot_attributions(found["attributions"], out / "ext_attributions.png",
                                                  title=f"Attributions of {names} (extension, not in the paper)"),
            "ext_blocks": plot_block_attributions(found["attributions"], out / "ext_block_attributions.png",
                                                  note="\nextension, not in the paper")}


@draws("lsc")
def lsc(ctx: Context) -> PathMap:
    """RWP Fig. 2 (loss landscapes per LSC group across checkpoints) and, as an extension, the share of training
    adversarial examples below c_min over training (neither RWP Fig. 1b nor its appendix Fig. 4); AT and RWP in the
    profile's overfitting regime where it has one."""
    out = ctx.group_dir(GROUPS["lsc"])
    results = {}
    for method in ("at", "rwp"):  # each analysed before the next trains (LSC needs the per-epoch weights)
        run = method_runs(ctx.overfitting(), [method])[method]
        results[run.name] = lsc_result(ctx, run)
    paths = {f"fig2_{name}": plot_lsc(r["lsc"], out / f"rwp_fig2_lsc_{name}.png", label=name)
             for name, r in results.items()}
    paths["ext_small_loss"] = plot_removal_rates({n: r["removal_rate"] for n, r in results.items()},
                                                 out / "ext_small_loss_share.png")
    return paths


@draws("rwp_ablations")
def rwp_ablations(ctx: Context) -> PathMap:
    """RWP Fig. 3c (AT vs AWP vs RWP test curves) and Fig. 3a/3b (c_min and K2 sweeps over seeds, with AT and
    AWP as references), in the profile's overfitting regime where it has one."""
    out = ctx.group_dir(GROUPS["rwp_ablations"])
    ctx = ctx.overfitting()
    base = method_runs(ctx, ["at", "awp", "rwp"])
    curves = write_curves(with_seeds(base.values()), out / "fig3c_data", plot=False)
    points = rwp_sweep_runs(ctx, base["rwp"])
    refs = [base[name] for name in ("at", "awp")]
    # one table, so the sweeps and their references share one robust measure
    every = seed_table({run.name: run for run in [r for _, _, r in points] + refs})
    table = pd.concat([every[every["method"] == run.name].assign(param=param, value=v)
                       for param, v, run in points], ignore_index=True).rename(columns={"method": "run"})
    table = table[["param", "value", *[c for c in table if c not in ("param", "value")]]]
    refs = every[every["method"].isin([r.name for r in refs])]
    return {"fig3c": plot_curves(curves["curves"], curves["overfitting"], out / "rwp_fig3c_curves.png",
                                 title="RWP Fig. 3c: AT, AWP and RWP", groups=seed_groups(base.values())),
            "table": _write_csv(table, out / "rwp_fig3_sweeps.csv"),
            "fig3": plot_sweeps(table, refs, out / "rwp_fig3_sweeps.png")}


@draws("cure_ablation")
def cure_ablation(ctx: Context) -> PathMap:
    """CURE Table 7: RGP on/off x revision on/off (``p=0`` turns RGP off, ``gamma=0`` revision) around the
    gallery's CURE (as the released code runs it), all from the same ST model."""
    out = ctx.group_dir(GROUPS["cure_ablation"])
    found = cure_runs(ctx, CURE_ABLATION)
    table = seed_table(found).rename(columns={"method": "run"})
    switches = {CURE_RUN + suffix: (rgp, revision, str(args))
                for suffix, (rgp, revision, args) in CURE_ABLATION.items()}
    for i, col in enumerate(("rgp", "revision", "args")):
        table.insert(1 + i, col, [switches[r][i] for r in table["run"]])
    return {"table7": _write_csv(table, out / "cure_table7_ablation.csv"),
            "figure": plot_ablation(table, out / "cure_table7_ablation.png")}


@draws("explorer")
def explorer(ctx: Context) -> PathMap:
    """Make sure the explorer has runs to show (ST, AT, CURE, with the CKA and LSC results of the two it selects,
    so no panel of the snapshot is empty) and save a snapshot of its panels."""
    from layerlab.explore import Explorer  # ipywidgets: an optional dependency (layerlab[notebooks])

    out = ctx.group_dir(GROUPS["explorer"])
    found = method_runs(ctx, ["st", "at", "cure"])
    for method in ("at", "cure"):
        cka_result(ctx, found[method])
        lsc_result(ctx, found[method])
    # only the runs it shows: a snapshot of the whole root would read runs still training
    return Explorer(ctx.root, select=[found["at"].name, found["cure"].name],
                    runs=[run.name for run in found.values()]).save(out)
