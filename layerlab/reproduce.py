"""Re-make every figure and table of the CURE and RWP papers through the library.

One function per figure group (``figure_freeze_study``, ``figure_cka``, ...). The numbered notebooks in
``notebooks/`` call exactly these functions, and ``layerlab reproduce`` calls all of them in order, so a
figure made in Jupyter and one made on the command line come from the same code.

Every function takes ``(profile, run_root, figures_dir, data_dir)``, trains the runs it needs into the *run
root* (or re-uses them: finished runs with the same config are never retrained, interrupted ones are
resumed), writes its figures and tables into ``figures_dir/NN_group/`` and returns ``{name: path}``.

Run root layout (flat and shared by every figure, so each model is trained once):

* ``ST/ AT/ TRADES/ MART/ AWP/ RWP/ CURE/``: one run per method (:func:`layerlab.study.run_method_comparison`,
  which also writes ``compare.csv``); CURE starts from ``ST/``. ``AT/``, ``AWP/`` and ``RWP/`` keep per-epoch
  checkpoints (``checkpoints/epoch-E.pt``) for the LSC removal-rate view.
* ``U-23/ U-23-noreinit/ ...``: the freeze study (:func:`layerlab.study.run_freeze_study`, ``study.csv``),
  which shares ``ST/`` (its starting point) and ``AT/`` (its SAT baseline) with the method comparison.
* ``CURE-p0/ CURE-gamma0/ CURE-p0-gamma0/``: CURE Table 7 (RGP off: ``p=0``; revision off: ``gamma=0``).
* ``RWP-cmin1/ RWP-k1/ ...``: RWP's c_min and K2 sweeps (the default values are ``RWP/`` itself).
* ``analysis/``: results that compare several runs (minimum perturbations, attributions).

Per-run analysis results live in the run directory (``eval.json``, ``cka.json``, ``corruptions.csv``,
``lsc.csv``, ``removal_rate.csv``) and are re-used when their settings match, so the explorer
(:mod:`layerlab.explore`) finds them there.

Sizes per profile are in :data:`SETTINGS`. ``smoke`` shrinks the smoke profile further (width 1/16, 600
digits images, 3 epochs, PGD-2 in training) and runs a subset of the freeze study's specs, two sweep values
and no AutoAttack (about 66 s per model even at this size), so that each notebook runs in about a minute on
two CPU cores; ``cpu`` and ``paper`` use their profiles unchanged and the papers' full sets of specs,
attacks and sweep values.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from layerlab import runs
from layerlab.config import ST_EPOCHS, TrainConfig, make_config
from layerlab.layerwise import paper_specs
from layerlab.records import export_records, is_record, materialize, restore_records

PathMap = dict[str, Path]
RUN_ROOT = "runs/reproduce"  # the notebooks' and `layerlab reproduce`'s default run root (git ignores runs/)
FIGURES_DIR = "runs/figures"

# The robust-overfitting comparison (CURE Fig. 5c, Table 3).
OVERFIT_METHODS = ("at", "trades", "awp", "rwp", "cure")
# Models whose robustness is compared beyond accuracy (corruptions, minimum perturbation, attributions).
ANALYSIS_METHODS = ("st", "at", "cure")
# CURE Table 7: run-name suffix -> (RGP on, revision on, CURE arguments). "" is the comparison's CURE/ run.
CURE_ABLATION = {
    "-p0-gamma0": (False, False, {"p": 0, "gamma": 0}),
    "-gamma0": (True, False, {"gamma": 0}),
    "-p0": (False, True, {"p": 0}),
    "": (True, True, {}),
}


@dataclass(frozen=True)
class FigureSettings:
    """How big each figure's runs and analyses are under one profile."""

    overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig changes on top of the profile
    st_epochs: int = 4
    specs: tuple[str, ...] = ()  # freeze study, re-initialized updated blocks (CURE Fig. 2b)
    noreinit_specs: tuple[str, ...] = ()  # freeze study, fine-tuned updated blocks (CURE Fig. 11)
    methods: tuple[str, ...] = ("at", "trades", "awp", "rwp", "cure")  # trade-off table (CURE Table 1)
    eval_n: int | None = 50  # test images of the attack suite (None = the whole test split)
    attacks: tuple[str, ...] = ("natural", "pgd20", "cw20")
    sweep_255: tuple[float, ...] = (1, 2, 4, 8)
    cka_n: int = 64
    cka_batch: int = 32
    corruption_n: int | None = 50
    corruption_severities: tuple[int, ...] = (1, 3, 5)
    minpert_n: int = 4
    minpert_iters: int = 6
    minpert_steps: int = 10
    fmn_steps: int = 20
    attr_n: int = 4
    ig_steps: int = 8
    layer_steps: int = 4
    lsc_n: int = 100
    lsc_points: int = 9
    lsc_directions: int = 2
    lsc_panels: int = 2  # checkpoints whose landscapes are drawn
    rwp_cmins: tuple[float, ...] = (1.0, 1.7)
    rwp_steps: tuple[int, ...] = (1, 10)


_FULL_ATTACKS = ("natural", "pgd20", "cw100", "aa")
_RWP_CMINS = (1.0, 1.4, 1.7, 2.0, 2.3)
_RWP_STEPS = (1, 3, 5, 10)

SETTINGS: dict[str, FigureSettings] = {
    # Seconds per run on 2 busy cores; figures show the mechanics, not the papers' numbers.
    "smoke": FigureSettings(
        overrides=dict(width=0.0625, train_size=600, batch_size=32, epochs=3, val_size=50, test_size=100,
                       eval_size=50, attack_steps=2, epoch_eval_steps=3, eval_steps=5),
        st_epochs=3, specs=("1", "23"), noreinit_specs=("23",)),
    # The cpu profile (CIFAR-10 subset, width 1/4): every spec, attack and sweep value; hours on a CPU. Training
    # runs under bf16 autocast in channels_last memory (2.9x the fp32 PGD-10 AT step on a 1-thread AMX Xeon);
    # PGD perturbations, the final evaluation and every attack of the evaluation suite stay in fp32.
    "cpu": FigureSettings(
        overrides=dict(amp=True, channels_last=True),
        st_epochs=ST_EPOCHS["cpu"], specs=tuple(paper_specs(4)), noreinit_specs=tuple(paper_specs(4)),
        methods=("at", "trades", "mart", "awp", "rwp", "cure"), eval_n=500, attacks=_FULL_ATTACKS,
        sweep_255=(0.25, 0.5, 1, 2, 3, 4, 5, 6, 7, 8), cka_n=500, cka_batch=100, corruption_n=500,
        corruption_severities=(1, 2, 3, 4, 5), minpert_n=8, minpert_iters=12, minpert_steps=50, fmn_steps=100,
        attr_n=6, ig_steps=32, layer_steps=16, lsc_n=1000, lsc_points=21, lsc_directions=3,
        lsc_panels=3, rwp_cmins=_RWP_CMINS, rwp_steps=_RWP_STEPS),
    # The papers' settings (full ResNet-18, 200 epochs, the whole test split); GPU days.
    "paper": FigureSettings(
        st_epochs=ST_EPOCHS["paper"], specs=tuple(paper_specs(4)), noreinit_specs=tuple(paper_specs(4)),
        methods=("at", "trades", "mart", "awp", "rwp", "cure"), eval_n=None, attacks=_FULL_ATTACKS,
        sweep_255=(0.25, 0.5, 1, 2, 3, 4, 5, 6, 7, 8), cka_n=1000, cka_batch=100, corruption_n=None,
        corruption_severities=(1, 2, 3, 4, 5), minpert_n=8, minpert_iters=12, minpert_steps=50, fmn_steps=100,
        attr_n=6, ig_steps=32, layer_steps=16, lsc_n=1000, lsc_points=21, lsc_directions=3,
        lsc_panels=4, rwp_cmins=_RWP_CMINS, rwp_steps=_RWP_STEPS),
}


def settings(profile: str) -> FigureSettings:
    """The figure settings of ``profile``; unknown names list the valid ones."""
    if profile not in SETTINGS:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(SETTINGS)}")
    return SETTINGS[profile]


def base_config(profile: str, data_dir: str | None = None) -> TrainConfig:
    """The training config every figure's runs share (the profile plus the figure overrides)."""
    return make_config(profile, **settings(profile).overrides, data_dir=data_dir)


@dataclass
class Context:
    """One figure call: profile, settings, resolved directories and the shared training config; it collects
    the runs the call uses, for the group's provenance (:meth:`record`)."""

    profile: str
    root: Path
    figures: Path
    data_dir: str | None
    progress: bool
    s: FigureSettings
    cfg: TrainConfig
    started: float = field(default_factory=time.time)
    used: dict[str, Path] = field(default_factory=dict)  # run name -> run directory

    def group(self, name: str) -> Path:
        """The figure group's output directory (created)."""
        path = self.figures / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def use(self, found: PathMap) -> PathMap:
        """Note runs this call reads (returns ``found`` unchanged)."""
        self.used.update({Path(p).name: Path(p) for p in found.values()})
        return found

    def record(self, out: Path, paths: PathMap, sources: Iterable[Path] = ()) -> PathMap:
        """Write ``out/manifest.json``: the command, profile, data, seeds, runs used, wall time, git commit and
        files of this call (earlier calls are kept in ``calls``), and copy the runs' result files and
        ``sources`` to ``out/data/``; returns ``paths`` unchanged."""
        from layerlab.gallery import write_manifest

        write_manifest(self, out, paths, tuple(sources))
        return paths


def context(profile: str, run_root: str | Path, figures_dir: str | Path, data_dir: str | None = None,
            progress: bool | None = None) -> Context:
    """Resolve a figure call's arguments (``progress`` defaults to on except at smoke scale)."""
    root = Path(run_root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    figures = Path(figures_dir).expanduser().resolve()
    figures.mkdir(parents=True, exist_ok=True)
    data = None if data_dir in (None, "") else str(data_dir)
    return Context(profile, root, figures, data, profile != "smoke" if progress is None else bool(progress),
                   settings(profile), base_config(profile, data))


# --------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------


def _splits(cfg: TrainConfig):
    """The data splits of ``cfg`` on its device (loaded once per batch of runs)."""
    from layerlab.data import load_splits
    from layerlab.train import resolve_device

    return load_splits(cfg.dataset, cfg.data_dir, download=cfg.download, train_size=cfg.train_size,
                       test_size=cfg.test_size, val_size=cfg.val_size, seed=cfg.seed,
                       device=resolve_device(cfg.device))


def run_name(method: str) -> str:
    """A method's run directory name in the run root (the library's shared naming: ``AT``, ``CURE``, ...)."""
    from layerlab.study import method_run_name

    return method_run_name(method)


def method_runs(ctx: Context, methods: Iterable[str]) -> PathMap:
    """One run per method in the run root (trained once, then re-used); CURE starts from ``ST/``. The
    profile's ``keep_every`` gives every run the per-epoch checkpoints LSC over training needs.

    Returns ``{method: run directory}``.
    """
    from layerlab.study import run_method_comparison

    methods = list(dict.fromkeys(methods))
    from layerlab.study import NEEDS_ST_INIT

    run_method_comparison(ctx.cfg, methods, ctx.root, progress=ctx.progress, st_epochs=ctx.s.st_epochs)
    if any(m in NEEDS_ST_INIT for m in methods):
        ctx.use({"st": ctx.root / run_name("st")})  # trained for them, read by them
    return ctx.use({m: ctx.root / run_name(m) for m in methods})


def st_checkpoint(ctx: Context) -> str:
    """The ST model every layer-wise and CURE run starts from (trained on first use)."""
    path = ctx.root / run_name("st") / "checkpoints" / "best.pt"
    if not (path.parent.parent / "summary.json").exists():
        method_runs(ctx, ["st"])
    return str(path)


def freeze_runs(ctx: Context, reinit: bool = True, specs: Sequence[str] | None = None) -> PathMap:
    """ST, SAT (the comparison's AT run) and the U-spec runs of the freeze study (``specs``, default the
    profile's); writes ``study.csv``.

    Returns ``{"ST": ..., "SAT": ..., "U-23": ..., ...}``.
    """
    from layerlab.study import run_freeze_study

    if specs is None:
        specs = ctx.s.specs if reinit else ctx.s.noreinit_specs
    method_runs(ctx, ["st", "at"])  # AT with its per-epoch checkpoints; the study then re-uses ST and AT
    rows = run_freeze_study(ctx.cfg, ",".join(specs), ctx.root, method="at", reinit=reinit, sat=True,
                            progress=ctx.progress, st_epochs=ctx.s.st_epochs)
    found = {r["run"]: Path(r["dir"]) for r in rows}
    st, at = found.pop(run_name("st")), found.pop(run_name("at"))
    return ctx.use({"ST": st, "SAT": at, **found})


def variant_runs(ctx: Context, method: str, variants: dict[str, dict[str, Any]], *,
                 init: str | None = None) -> PathMap:
    """Runs of ``method`` with other hyper-parameters (``{run name: method args}``) under the shared config."""
    from layerlab.study import run_or_reuse

    todo = {name: args for name, args in variants.items() if not (ctx.root / name / "summary.json").exists()}
    splits = _splits(ctx.cfg) if todo else None
    for name, args in variants.items():
        cfg = ctx.cfg.replace(method=method, method_args=dict(args), init=init)
        run_or_reuse(cfg, ctx.root / name, overwrite=False, progress=ctx.progress, splits=splits)
    return ctx.use({name: ctx.root / name for name in variants})


def summary(run_dir: Path) -> dict[str, Any]:
    """A finished run's summary.json."""
    return runs.read_json(Path(run_dir) / "summary.json")


# --------------------------------------------------------------------------------------
# analyses, re-used when their settings match
# --------------------------------------------------------------------------------------


def _have_attacks(report: dict[str, Any]) -> set[str]:
    have = set(report.get("results", {}))
    return have | ({"eps-sweep"} if "eps_sweep" in report else set())


def _sweep_ok(report: dict[str, Any], sweep_255: Sequence[float]) -> bool:
    points = report.get("eps_sweep", {}).get("points", [])
    return [round(p["eps_255"], 6) for p in points] == [round(float(e), 6) for e in sweep_255]


def evaluated(ctx: Context, run_dir: Path, attacks: Sequence[str]) -> dict[str, Any]:
    """``RUN/eval.json`` holding ``attacks`` on ``eval_n`` test images; only missing attacks are run."""
    from layerlab.evaluation import evaluate_run

    def usable(rep: dict[str, Any] | None) -> bool:
        return rep is not None and rep.get("checkpoint") == "best" and (ctx.s.eval_n is None
                                                                        or rep.get("n") == ctx.s.eval_n)

    def missing(rep: dict[str, Any] | None) -> list[str]:
        if not usable(rep):
            return list(attacks)
        return [a for a in attacks if a not in _have_attacks(rep)
                or (a == "eps-sweep" and not _sweep_ok(rep, ctx.s.sweep_255))]

    path = run_dir / "eval.json"
    kw = dict(n=ctx.s.eval_n, data_dir=ctx.data_dir, sweep_255=ctx.s.sweep_255, seed=0)
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


def cka_result(ctx: Context, run_dir: Path) -> Path:
    """``RUN/cka.json`` (natural vs adversarial, best checkpoint, ``cka_n`` test images), computed once."""
    from layerlab.analysis.cka import cka_run

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
    import pandas as pd

    from layerlab.analysis.corruptions import CORRUPTIONS, corruptions_for_run

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
            csv, _ = corruptions_for_run(run_dir, n=ctx.s.corruption_n,
                                         severities=list(ctx.s.corruption_severities), data_dir=ctx.data_dir)
    return csv


def _same_runs(json_path: Path, run_dirs: Sequence[Path], n: int) -> bool:
    """Whether a multi-run analysis file covers exactly ``run_dirs`` with ``n`` images."""
    if not json_path.exists():
        return False
    info = runs.read_json(json_path)
    return [m["run"] for m in info.get("models", [])] == [str(r) for r in run_dirs] and len(info["indices"]) == n


def lsc_result(ctx: Context, run_dir: Path) -> PathMap:
    """``RUN/lsc.csv`` and ``RUN/removal_rate.csv`` over evenly spaced per-epoch checkpoints, computed once."""
    from layerlab.analysis.lsc import epoch_checkpoints, mu_grid, recorded_epoch_checkpoints, run_lsc

    paths = {"lsc": run_dir / "lsc.csv", "removal_rate": run_dir / "removal_rate.csv"}
    per_epoch = recorded_epoch_checkpoints(run_dir) if is_record(run_dir) else epoch_checkpoints(run_dir)
    tokens = [str(p) for p in _spread(per_epoch, ctx.s.lsc_panels)] or ["best", "last"]
    with runs.analysis_lock(run_dir, "lsc"):
        if all(p.exists() for p in paths.values()):
            import pandas as pd

            old = pd.read_csv(paths["lsc"])
            if len(old) and old["checkpoint"].nunique() == len(tokens) and old["mu"].nunique() == ctx.s.lsc_points:
                return paths
        materialize(run_dir, progress=ctx.progress)
        with runs.costed(run_dir, "lsc"):
            return run_lsc(run_dir, tokens, n=ctx.s.lsc_n, mus=mu_grid(-1.0, 1.0, ctx.s.lsc_points),
                           directions=ctx.s.lsc_directions, attack_steps=ctx.cfg.attack_steps,
                           data_dir=ctx.data_dir, progress=ctx.progress, plot=False)


def _spread(items: Sequence[Any], k: int) -> list[Any]:
    """``k`` items evenly spread over ``items`` (first and last included)."""
    if len(items) <= k:
        return list(items)
    if k == 1:
        return [items[-1]]
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


# --------------------------------------------------------------------------------------
# figures that have no plot of their own in layerlab.plots
# --------------------------------------------------------------------------------------


def _write_csv(frame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, float_format="%.2f")
    return path


def plot_freeze_study(table, path: Path) -> Path:
    """CURE Fig. 2b / 11: natural and robust accuracy of ST, SAT and each U-spec model, one panel per init."""
    import numpy as np

    from layerlab.plots.style import new_figure, save

    panels = list(dict.fromkeys(table["panel"]))
    fig, axes = new_figure(ncols=len(panels), width=max(4.5, 0.7 * table.groupby("panel").size().max() + 2),
                           height=3.6)
    for ax, panel in zip(axes[0], panels):
        part = table[table["panel"] == panel]
        x = np.arange(len(part))
        ax.bar(x - 0.2, part["natural_acc"], width=0.4, label="natural")
        ax.bar(x + 0.2, part["robust_acc"], width=0.4, label="PGD")
        ax.set_xticks(x)
        ax.set_xticklabels(part["model"], rotation=45, ha="right")
        ax.set(ylim=(0, 100), ylabel="test accuracy (%)", title=panel)
    axes[0, 0].legend(fontsize="small")
    return save(fig, path)


def plot_cka_grid(json_paths: dict[str, Path], path: Path, title: str) -> Path:
    """CURE Fig. 3: one natural-vs-adversarial CKA heatmap per model, side by side."""
    import numpy as np
    import seaborn as sns

    from layerlab.plots.style import HEATMAP_CMAP, new_figure, save

    cols = min(4, len(json_paths))
    rows = math.ceil(len(json_paths) / cols)
    fig, axes = new_figure(ncols=cols, nrows=rows, width=3.6, height=3.4)
    for ax in axes.flat[len(json_paths):]:
        ax.axis("off")
    for ax, (label, jp) in zip(axes.flat, json_paths.items()):
        data = runs.read_json(jp)
        matrix = np.array([[np.nan if v is None else v for v in row] for row in data["matrix"]], dtype=float)
        sns.heatmap(matrix, ax=ax, vmin=0, vmax=1, cmap=HEATMAP_CMAP, square=True, cbar=False,
                    xticklabels=data["cols"], yticklabels=data["rows"], annot=len(matrix) <= 8, fmt=".1f",
                    annot_kws={"fontsize": 6})
        diag = np.nanmean(np.diag(matrix)) if matrix.shape[0] == matrix.shape[1] else np.nan
        ax.set_title(f"{label} (diag {diag:.2f})", fontsize=9)
        ax.set_xlabel("adversarial", fontsize=8)
        ax.set_ylabel("natural", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # rows of panels: keep each title clear of the tick labels above
    return save(fig, path)


def plot_tradeoff(table, path: Path) -> Path:
    """CURE Fig. 1 / 5a: natural vs robust accuracy per method, with NRR iso-lines."""
    import numpy as np

    from layerlab.plots.style import new_figure, save

    fig, axes = new_figure(width=5.0, height=4.2)
    ax = axes[0, 0]
    xs = np.linspace(1, 100, 200)
    for level in (20, 40, 60, 80):
        ys = level * xs / np.maximum(2 * xs - level, 1e-9)
        ok = (2 * xs > level) & (ys <= 100)
        ax.plot(xs[ok], ys[ok], color="0.8", linewidth=0.8, zorder=0)
        ax.annotate(f"NRR {level}", (xs[ok][-1], ys[ok][-1]), fontsize=7, color="0.5")
    for _, r in table.iterrows():
        ax.scatter(r["natural"], r["robust"], s=40, zorder=2)
        ax.annotate(r["method"], (r["natural"], r["robust"]), textcoords="offset points", xytext=(4, 3),
                    fontsize=8)
    rob_name = table["robust_attack"].iloc[0] if len(table) else "robust"
    ax.set(xlim=(0, 100), ylim=(0, 100), xlabel="natural accuracy (%)", ylabel=f"{rob_name} accuracy (%)",
           title="Natural-robust trade-off")
    return save(fig, path)


def plot_block_gradient_panels(stats: dict[str, Any], path: Path) -> Path:
    """CURE Fig. 6a: mean |gradient| per block over training, one panel per run."""
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    from layerlab.analysis.layer_stats import block_gradients
    from layerlab.plots.style import new_figure, save

    fig, axes = new_figure(ncols=len(stats), width=4.2, height=3.6)
    for i, (ax, (label, frame)) in enumerate(zip(axes[0], stats.items())):
        data = block_gradients(frame)
        sns.lineplot(data=data, x="epoch", y="grad_mean_abs", hue="block", marker="o", ax=ax)
        ax.set_yscale("log")
        ax.set(title=label, xlabel="epoch", ylabel="mean |gradient|" if i == 0 else "")  # one label per row
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="x-small")
    return save(fig, path)


def plot_removal_rates(csvs: dict[str, Path], path: Path) -> Path:
    """RWP Fig. 1b: share of training adversarial examples with loss below c_min over training, per run."""
    import pandas as pd
    from matplotlib.ticker import MaxNLocator

    from layerlab.plots.style import new_figure, save

    fig, axes = new_figure(width=5.0, height=3.6)
    ax = axes[0, 0]
    c_min = None
    for label, csv in csvs.items():
        df = pd.read_csv(csv).sort_values("epoch")
        c_min = df["c_min"].iloc[0]
        ax.plot(df["epoch"], 100 * df["removal_rate"], marker="o", label=label)
    ax.set(xlabel="epoch", ylabel=f"adversarial loss < {c_min:g} (%)", ylim=(0, 105),
           title="Small-loss adversarial examples")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small")
    return save(fig, path)


def plot_sweeps(table, refs: dict[str, dict[str, float]], path: Path) -> Path:
    """RWP Fig. 3: natural and robust accuracy against c_min and against K2, with AT / AWP as references."""
    from layerlab.plots.style import new_figure, save

    params = list(dict.fromkeys(table["param"]))
    fig, axes = new_figure(ncols=len(params), width=4.3, height=3.6)
    for ax, param in zip(axes[0], params):
        part = table[table["param"] == param].sort_values("value")
        ax.plot(part["value"], part["robust_acc"], marker="o", label="RWP robust")
        ax.plot(part["value"], part["natural_acc"], marker="s", linestyle="--", label="RWP natural")
        for (name, ref), style in zip(refs.items(), (":", "-.")):
            ax.axhline(ref["robust_acc"], color="0.4", linestyle=style, linewidth=1, label=f"{name} robust")
        ax.set(xlabel={"c_min": "c_min", "steps": "K2 (perturbation steps)"}.get(param, param),
               ylabel="test accuracy (%)", ylim=(0, 100), title=f"RWP: {param} sweep")
    axes[0, 0].legend(fontsize="x-small")
    return save(fig, path)


def plot_ablation(table, path: Path) -> Path:
    """CURE Table 7 as bars: natural, robust and NRR with RGP and revision on or off."""
    import numpy as np

    from layerlab.plots.style import new_figure, save

    fig, axes = new_figure(width=6.0, height=3.6)
    ax = axes[0, 0]
    x = np.arange(len(table))
    for i, (col, label) in enumerate((("natural_acc", "natural"), ("robust_acc", "PGD"), ("nrr", "NRR"))):
        ax.bar(x + (i - 1) * 0.27, table[col], width=0.27, label=label)
    ax.set_xticks(x)
    ax.set_xticklabels([f"RGP {'on' if a else 'off'}\nrevision {'on' if b else 'off'}"
                        for a, b in zip(table["rgp"], table["revision"])], fontsize=8)
    ax.set(ylim=(0, 100), ylabel="%", title="CURE ablation (Table 7)")
    ax.legend(fontsize="small")
    return save(fig, path)


# --------------------------------------------------------------------------------------
# the figure groups (one per notebook)
# --------------------------------------------------------------------------------------


def figure_freeze_study(profile: str = "smoke", run_root: str | Path = RUN_ROOT,
                        figures_dir: str | Path = FIGURES_DIR, data_dir: str | None = None, *,
                        progress: bool | None = None) -> PathMap:
    """Notebook 01, CURE Fig. 2b (re-initialized) and Fig. 11 (fine-tuned): ST, SAT and every U-spec."""
    import pandas as pd

    ctx = context(profile, run_root, figures_dir, data_dir, progress)
    out = ctx.group("01_freeze_study")
    rows = []
    for reinit, panel in ((True, "updated blocks re-initialized (Fig. 2b)"),
                          (False, "updated blocks fine-tuned (Fig. 11)")):
        for label, run in freeze_runs(ctx, reinit).items():
            s = summary(run)
            rows.append({"panel": panel, "model": label, "spec": s.get("update") or "",
                         "reinit": reinit if label not in ("ST", "SAT") else "",
                         "natural_acc": s["natural_acc"], "robust_acc": s["robust_acc"], "nrr": s["nrr"],
                         "best_epoch": s["best_epoch"], "dir": str(run)})
    table = pd.DataFrame(rows)
    return ctx.record(out, {"table": _write_csv(table, out / "cure_fig2b_fig11_freeze_study.csv"),
            "figure": plot_freeze_study(table, out / "cure_fig2b_fig11_freeze_study.png")})


def figure_cka(profile: str = "smoke", run_root: str | Path = RUN_ROOT, figures_dir: str | Path = FIGURES_DIR,
               data_dir: str | None = None, *, progress: bool | None = None) -> PathMap:
    """Notebook 02, CURE Fig. 3 (CKA natural vs adversarial for ST, AT and the U-spec models) and Fig. 12 (CURE)."""
    from layerlab.plots.cka import plot_cka

    ctx = context(profile, run_root, figures_dir, data_dir, progress)
    out = ctx.group("02_cka")
    for spec in ctx.s.specs:  # CKA of each U-spec model as soon as it is trained (it needs the weights)
        for run in freeze_runs(ctx, reinit=True, specs=[spec]).values():
            cka_result(ctx, run)
    models = freeze_runs(ctx, reinit=True)
    cure = method_runs(ctx, ["cure"])["cure"]
    jsons = {label: cka_result(ctx, run) for label, run in models.items()}
    cure_json = cka_result(ctx, cure)
    return ctx.record(out, {"fig3": plot_cka_grid(jsons, out / "cure_fig3_cka.png", "CKA natural vs adversarial (Fig. 3)"),
            "fig12": plot_cka(cure_json, out / "cure_fig12_cka_cure.png")})


def figure_overfitting(profile: str = "smoke", run_root: str | Path = RUN_ROOT,
                       figures_dir: str | Path = FIGURES_DIR, data_dir: str | None = None, *,
                       progress: bool | None = None) -> PathMap:
    """Notebook 03, robust overfitting: CURE Fig. 4 (U-spec test curves), Fig. 5c and Table 3 (best/last/delta)."""
    from layerlab.analysis.curves import write_curves
    from layerlab.plots.curves import plot_curves

    ctx = context(profile, run_root, figures_dir, data_dir, progress)
    out = ctx.group("03_overfitting")
    models = freeze_runs(ctx, reinit=True)
    uspec = write_curves([models["SAT"]] + [r for k, r in models.items() if k not in ("ST", "SAT")],
                         out / "fig4_data", plot=False)
    methods = method_runs(ctx, OVERFIT_METHODS)
    compare = write_curves(list(methods.values()), out / "fig5c_data", plot=False)
    table = out / "cure_table3_overfitting.csv"
    table.write_text(compare["overfitting"].read_text())
    return ctx.record(out, {"fig4": plot_curves(uspec["curves"], uspec["overfitting"], out / "cure_fig4_uspec_curves.png"),
            "fig5c": plot_curves(compare["curves"], compare["overfitting"], out / "cure_fig5c_curves.png"),
            "table3": table})


def tradeoff_table(ctx: Context, run_dirs: PathMap):
    """CURE Table 1: natural, PGD-20, CW-inf, AutoAttack and NRR (on the strongest attack run) per method."""
    import pandas as pd

    rows = []
    for name, run in run_dirs.items():
        rep = evaluated(ctx, run, ctx.s.attacks)
        res = rep["results"]
        acc = {a: res[a]["accuracy"] for a in ctx.s.attacks if a in res}
        cw = next((a for a in ctx.s.attacks if a.startswith("cw")), None)
        robust_attack = "aa" if "aa" in acc else "pgd20"
        rows.append({"method": run.name, "natural": acc["natural"], "pgd20": acc.get("pgd20"),
                     "cw_inf": acc.get(cw) if cw else None, "aa": acc.get("aa"),
                     "robust": acc[robust_attack], "robust_attack": {"aa": "AutoAttack"}.get(robust_attack, "PGD-20"),
                     "worst_linf": rep["worst_case"]["linf"]["accuracy"],
                     "nrr": 2 * acc["natural"] * acc[robust_attack] / max(1e-12, acc["natural"] + acc[robust_attack]),
                     "n": rep["n"]})
    return pd.DataFrame(rows)


def figure_tradeoff(profile: str = "smoke", run_root: str | Path = RUN_ROOT, figures_dir: str | Path = FIGURES_DIR,
                    data_dir: str | None = None, *, progress: bool | None = None) -> PathMap:
    """Notebook 04, CURE Fig. 1 / 5a and a Table-1-style table (natural, PGD-20, CW-inf, AA, NRR)."""
    ctx = context(profile, run_root, figures_dir, data_dir, progress)
    out = ctx.group("04_tradeoff")
    table = tradeoff_table(ctx, evaluate_as_trained(ctx, ctx.s.methods, ctx.s.attacks))
    return ctx.record(out, {"table1": _write_csv(table, out / "cure_table1_tradeoff.csv"),
            "fig1": plot_tradeoff(table, out / "cure_fig1_fig5a_tradeoff.png")})


def figure_attack_strength(profile: str = "smoke", run_root: str | Path = RUN_ROOT,
                           figures_dir: str | Path = FIGURES_DIR, data_dir: str | None = None, *,
                           progress: bool | None = None) -> PathMap:
    """Notebook 05, CURE Fig. 5b: PGD-20 accuracy against the attack's eps, one line per method."""
    from layerlab.plots.robustness import plot_eps_sweep

    ctx = context(profile, run_root, figures_dir, data_dir, progress)
    out = ctx.group("05_attack_strength")
    run_dirs = evaluate_as_trained(ctx, ctx.s.methods, ["natural", "eps-sweep"])
    return ctx.record(out, {"fig5b": plot_eps_sweep({r.name: r / "eval.json" for r in run_dirs.values()},
                                    out / "cure_fig5b_eps_sweep.png")})


def figure_gradients(profile: str = "smoke", run_root: str | Path = RUN_ROOT,
                     figures_dir: str | Path = FIGURES_DIR, data_dir: str | None = None, *,
                     progress: bool | None = None) -> PathMap:
    """Notebook 06, CURE Fig. 6a (gradient per block over training), 6b and 10 (weights updated per layer and
    phase), from each run's layer_stats.jsonl."""
    from layerlab.analysis.layer_stats import read_layer_stats
    from layerlab.plots.layer_stats import plot_updated_by_phase

    ctx = context(profile, run_root, figures_dir, data_dir, progress)
    out = ctx.group("06_gradients")
    run_dirs = method_runs(ctx, ["at", "trades", "cure"])
    stats = {name: read_layer_stats(run) for name, run in run_dirs.items()}
    paths = {"fig6a": plot_block_gradient_panels({run_dirs[k].name: stats[k] for k in ("at", "cure")},
                                                  out / "cure_fig6a_grads_per_block.png"),
             "fig6b": plot_updated_by_phase(stats["cure"], out / "cure_fig6b_updated_cure.png")}
    for name in ("at", "trades"):
        paths[f"fig10_{name}"] = plot_updated_by_phase(stats[name], out / f"cure_fig10_updated_{name}.png")
    return ctx.record(out, paths)


def figure_corruptions(profile: str = "smoke", run_root: str | Path = RUN_ROOT,
                       figures_dir: str | Path = FIGURES_DIR, data_dir: str | None = None, *,
                       progress: bool | None = None) -> PathMap:
    """Notebook 07, CURE Fig. 7 (mean accuracy per corruption group and severity) and Fig. 9 (every corruption)."""
    from layerlab.plots.robustness import plot_corruption_groups, plot_corruptions

    ctx = context(profile, run_root, figures_dir, data_dir, progress)
    out = ctx.group("07_corruptions")
    csvs = {}
    for method in ANALYSIS_METHODS:  # each analysed before the next trains (the analysis needs the weights)
        run = method_runs(ctx, [method])[method]
        csvs[run.name] = corruption_result(ctx, run)
    paths = {"fig7": plot_corruption_groups(csvs, out / "cure_fig7_corruption_groups.png")}
    for name, csv in csvs.items():
        paths[f"fig9_{name}"] = plot_corruptions(csv, out / f"cure_fig9_corruptions_{name}.png", title=name)
    return ctx.record(out, paths)


def figure_minpert_attributions(profile: str = "smoke", run_root: str | Path = RUN_ROOT,
                                figures_dir: str | Path = FIGURES_DIR, data_dir: str | None = None, *,
                                progress: bool | None = None) -> PathMap:
    """Notebook 08, CURE Fig. 8: minimum L-inf perturbations and captum attributions of ST, AT and CURE."""
    from layerlab.analysis.attributions import attributions_for_runs
    from layerlab.analysis.minimum import minpert_for_runs
    from layerlab.plots.robustness import plot_attributions, plot_block_attributions, plot_minpert

    ctx = context(profile, run_root, figures_dir, data_dir, progress)
    out = ctx.group("08_minpert_attributions")
    run_dirs = list(method_runs(ctx, ANALYSIS_METHODS).values())
    analysis = ctx.root / "analysis"
    with runs.analysis_lock(analysis, "minpert-attributions"):
        if not (_same_runs(analysis / "minpert.json", run_dirs, ctx.s.minpert_n)
                and _same_runs(analysis / "attributions.json", run_dirs, ctx.s.attr_n)):
            for run in run_dirs:  # both analyses load the models' weights
                materialize(run, progress=ctx.progress)
        if not _same_runs(analysis / "minpert.json", run_dirs, ctx.s.minpert_n):
            with runs.costed(analysis, "minpert"):
                minpert_for_runs(run_dirs, analysis, n=ctx.s.minpert_n, iters=ctx.s.minpert_iters,
                                 steps=ctx.s.minpert_steps, fmn_steps=ctx.s.fmn_steps, data_dir=ctx.data_dir)
        if not _same_runs(analysis / "attributions.json", run_dirs, ctx.s.attr_n):
            with runs.costed(analysis, "attributions"):
                attributions_for_runs(run_dirs, analysis, n=ctx.s.attr_n, ig_steps=ctx.s.ig_steps,
                                      layer_steps=ctx.s.layer_steps, data_dir=ctx.data_dir)
    sources = (analysis / "minpert.json", analysis / "attributions.json", analysis / runs.COSTS)
    return ctx.record(out, sources=sources, paths={
                      "fig8_minpert": plot_minpert(analysis / "minpert.json", out / "cure_fig8_minpert.png"),
            "fig8_attributions": plot_attributions(analysis / "attributions.json", out / "cure_fig8_attributions.png"),
            "fig8_blocks": plot_block_attributions(analysis / "attributions.json",
                                                   out / "cure_fig8_block_attributions.png")})


def figure_lsc(profile: str = "smoke", run_root: str | Path = RUN_ROOT, figures_dir: str | Path = FIGURES_DIR,
               data_dir: str | None = None, *, progress: bool | None = None) -> PathMap:
    """Notebook 09, RWP Fig. 2 (loss landscapes per LSC group across checkpoints) and Fig. 1b (removal rate)."""
    from layerlab.plots.lsc import plot_lsc

    ctx = context(profile, run_root, figures_dir, data_dir, progress)
    out = ctx.group("09_lsc")
    results = {}
    for method in ("at", "rwp"):  # each analysed before the next trains (LSC needs the per-epoch weights)
        run = method_runs(ctx, [method])[method]
        results[run.name] = lsc_result(ctx, run)
    paths = {f"fig2_{name}": plot_lsc(r["lsc"], out / f"rwp_fig2_lsc_{name}.png") for name, r in results.items()}
    paths["fig1b"] = plot_removal_rates({n: r["removal_rate"] for n, r in results.items()},
                                        out / "rwp_fig1b_removal_rate.png")
    return ctx.record(out, paths)


def _default_arg(method: str, name: str) -> Any:
    """A method factory's default hyper-parameter value."""
    from layerlab.methods import METHODS

    return inspect.signature(METHODS[method][0]).parameters[name].default


def figure_rwp_ablations(profile: str = "smoke", run_root: str | Path = RUN_ROOT,
                         figures_dir: str | Path = FIGURES_DIR, data_dir: str | None = None, *,
                         progress: bool | None = None) -> PathMap:
    """Notebook 10, RWP Fig. 1a/1c (AT vs AWP vs RWP curves) and Fig. 3 (c_min and K2 sweeps)."""
    import pandas as pd

    from layerlab.analysis.curves import write_curves
    from layerlab.plots.curves import plot_curves

    ctx = context(profile, run_root, figures_dir, data_dir, progress)
    out = ctx.group("10_rwp_ablations")
    base = method_runs(ctx, ["at", "awp", "rwp"])
    curves = write_curves(list(base.values()), out / "fig1_data", plot=False)
    sweeps = {"c_min": ctx.s.rwp_cmins, "steps": ctx.s.rwp_steps}
    short = {"c_min": "cmin", "steps": "k"}
    rows = []
    for param, values in sweeps.items():
        default = _default_arg("rwp", param)
        names = {v: f"{run_name('rwp')}-{short[param]}{v:g}" for v in values}
        found = variant_runs(ctx, "rwp", {names[v]: {param: v} for v in values if v != default})
        for v in values:
            run = base["rwp"] if v == default else found[names[v]]
            s = summary(run)
            rows.append({"param": param, "value": v, "run": run.name, "natural_acc": s["natural_acc"],
                         "robust_acc": s["robust_acc"], "nrr": s["nrr"]})
    table = pd.DataFrame(rows)
    refs = {name.upper(): summary(base[name]) for name in ("at", "awp")}
    return ctx.record(out, {"fig1a": plot_curves(curves["curves"], curves["overfitting"], out / "rwp_fig1a_curves.png"),
            "table": _write_csv(table, out / "rwp_fig3_sweeps.csv"),
            "fig3": plot_sweeps(table, refs, out / "rwp_fig3_sweeps.png")})


def figure_cure_ablation(profile: str = "smoke", run_root: str | Path = RUN_ROOT,
                         figures_dir: str | Path = FIGURES_DIR, data_dir: str | None = None, *,
                         progress: bool | None = None) -> PathMap:
    """Notebook 11, CURE Table 7: RGP on/off x revision on/off (``p=0`` turns RGP off, ``gamma=0`` revision)."""
    import pandas as pd

    ctx = context(profile, run_root, figures_dir, data_dir, progress)
    out = ctx.group("11_cure_ablation")
    full = method_runs(ctx, ["st", "cure"])["cure"]
    variants = {run_name("cure") + suffix: args for suffix, (_, _, args) in CURE_ABLATION.items() if suffix}
    found = {**variant_runs(ctx, "cure", variants, init=st_checkpoint(ctx)), full.name: full}
    rows = []
    for suffix, (rgp, revision, args) in CURE_ABLATION.items():
        s = summary(found[run_name("cure") + suffix])
        rows.append({"run": run_name("cure") + suffix, "rgp": rgp, "revision": revision, "args": str(args),
                     "natural_acc": s["natural_acc"], "robust_acc": s["robust_acc"], "nrr": s["nrr"]})
    table = pd.DataFrame(rows)
    return ctx.record(out, {"table7": _write_csv(table, out / "cure_table7_ablation.csv"),
            "figure": plot_ablation(table, out / "cure_table7_ablation.png")})


def figure_explorer(profile: str = "smoke", run_root: str | Path = RUN_ROOT,
                    figures_dir: str | Path = FIGURES_DIR, data_dir: str | None = None, *,
                    progress: bool | None = None) -> PathMap:
    """Notebook 12: make sure the explorer has runs to show (ST, AT, CURE, with the CKA and LSC results of the two
    it selects, so no panel of the snapshot is empty) and save a snapshot of its panels."""
    from layerlab.explore import Explorer

    ctx = context(profile, run_root, figures_dir, data_dir, progress)
    out = ctx.group("12_explorer")
    found = method_runs(ctx, ["st", "at", "cure"])
    for method in ("at", "cure"):
        cka_result(ctx, found[method])
        lsc_result(ctx, found[method])
    return ctx.record(out, Explorer(ctx.root, select=[found["at"].name, found["cure"].name]).save(out))


# name -> (notebook file, function). The order is the notebooks' order; later figures re-use earlier runs.
FIGURES: dict[str, tuple[str, Callable[..., PathMap]]] = {
    "freeze_study": ("01_freeze_study.ipynb", figure_freeze_study),
    "cka": ("02_representation_similarity.ipynb", figure_cka),
    "overfitting": ("03_robust_overfitting.ipynb", figure_overfitting),
    "tradeoff": ("04_tradeoff.ipynb", figure_tradeoff),
    "attack_strength": ("05_attack_strength.ipynb", figure_attack_strength),
    "gradients": ("06_gradient_analysis.ipynb", figure_gradients),
    "corruptions": ("07_natural_corruptions.ipynb", figure_corruptions),
    "minpert_attributions": ("08_minimum_perturbation_attributions.ipynb", figure_minpert_attributions),
    "lsc": ("09_lsc_landscapes.ipynb", figure_lsc),
    "rwp_ablations": ("10_rwp_ablations.ipynb", figure_rwp_ablations),
    "cure_ablation": ("11_cure_ablation.ipynb", figure_cure_ablation),
    "explorer": ("12_interactive_explorer.ipynb", figure_explorer),
}


def reproduce(profile: str = "smoke", run_root: str | Path = RUN_ROOT, figures_dir: str | Path = FIGURES_DIR,
              data_dir: str | None = None, *, only: Sequence[str] | None = None, progress: bool | None = None,
              records: str | Path | None = None, log: Callable[[str], None] | None = None) -> dict[str, PathMap]:
    """Every figure group (or ``only`` those named), in notebook order: what ``layerlab reproduce`` runs.

    ``records`` (a directory, e.g. ``results/runs-cpu``) carries a long gallery across machines: runs recorded
    there and missing from the run root are restored before anything trains, and every finished run's result
    files are exported there after each group (:mod:`layerlab.records`)."""
    names = list(FIGURES) if not only else list(only)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise ValueError(f"unknown figures {unknown}; choose from {', '.join(FIGURES)}")
    settings(profile)  # fail on a bad profile before any training
    if records is not None:
        restored = restore_records(records, Path(run_root))
        if log and restored:
            log(f"restored {len(restored)} runs from {records}: {', '.join(restored)}")
    done = {}
    for name in FIGURES:
        if name in names:
            if log:
                log(f"{name} ({FIGURES[name][0]}) ...")
            try:
                done[name] = FIGURES[name][1](profile, run_root, figures_dir, data_dir, progress=progress)
            finally:  # what finished is kept even when a later run fails
                if records is not None:
                    export_records(run_root, records)
    from layerlab.gallery import write_readme

    write_readme(figures_dir)
    return done


def show(paths: PathMap) -> None:
    """Display a figure group's PNGs and CSV tables in a notebook (prints the paths elsewhere)."""
    try:
        from IPython import get_ipython
        from IPython.display import Image, Markdown, display
    except ImportError:
        get_ipython = None  # noqa: N806
    if get_ipython is None or get_ipython() is None:
        for name, path in paths.items():
            print(f"{name}: {path}")
        return
    import pandas as pd

    for name, path in paths.items():
        display(Markdown(f"**{name}**: `{path}`"))
        if Path(path).suffix == ".png":
            display(Image(filename=str(path)))
        elif Path(path).suffix == ".csv":
            display(pd.read_csv(path).round(2))
