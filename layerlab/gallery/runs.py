"""The runs the figures read, in one flat run root shared by every figure (each model is trained once).

* ``ST/ AT/ TRADES/ MART/ AWP/ RWP/``: one run per method with its defaults
  (:func:`layerlab.study.run_method_comparison`, which also writes ``compare.csv``). Every run keeps the profile's
  per-epoch checkpoints (``checkpoints/epoch-E.pt``) for the LSC removal-rate view.
* ``CURE-code/``: the gallery's CURE, as the released code runs it, from ``ST/`` (:func:`cure_runs`); with
  ``CURE-code-p0/ CURE-code-gamma0/ CURE-code-p0-gamma0/`` for CURE Table 7 (RGP off: ``p=0``; revision off:
  ``gamma=0``).
* ``U-23/ U-23-noreinit/ ...``: the freeze study (:func:`layerlab.study.run_freeze_study`, ``study.csv``),
  which shares ``ST/`` (its starting point) and ``AT/`` (its SAT baseline) with the method comparison.
* ``RWP-cmin1/ RWP-k1/ ...``: RWP's c_min and K2 sweeps (the default values are ``RWP/`` itself).
* ``AT-n500-e100-w0.5-v200/ ...``: under a profile with an overfitting regime (:attr:`FigureSettings.regime`),
  the robust-overfitting groups' runs are the experiments' runs of that regime, trained as
  :mod:`layerlab.experiments` trains them (:func:`experiment_runs`), so gallery and experiments share runs and seeds.
* ``analysis/``: results that compare several runs (minimum perturbations, attributions).

Finished runs with the same config are never retrained; interrupted ones are resumed. Inside
:func:`layerlab.records.records_only` a run the root does not hold finished is an error, not a training job.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Iterable, Sequence

from layerlab import runs
from layerlab.experiments import EXPERIMENTS, RunSpec
from layerlab.gallery.settings import CURE_ABLATION, CURE_RUN, Context, PathMap
from layerlab.methods import METHODS
from layerlab.methods.cure import CODE_ARGS
from layerlab.records import require_training
from layerlab.study import method_run_name, run_freeze_study, run_method_comparison, run_or_reuse, spec_run_name
from layerlab.train import splits_for


def run_group(method: str) -> str:
    """The name of the gallery's run of ``method`` (``AT``; CURE's is :data:`CURE_RUN`)."""
    return CURE_RUN if method == "cure" else method_run_name(method)


def run_args(method: str) -> dict[str, Any]:
    """The method arguments of the gallery's run of ``method``: its defaults; CURE's are the released code's."""
    return dict(CODE_ARGS) if method == "cure" else {}


def method_runs(ctx: Context, methods: Iterable[str]) -> PathMap:
    """One run per method in the run root (trained once, then re-used): the method's defaults, CURE as the released
    code runs it (:func:`cure_runs`); in the context's regime, the experiments' runs of the same groups there.

    Returns ``{method: run directory}``.
    """
    methods = list(dict.fromkeys(methods))
    if ctx.regime is not None:
        found = experiment_runs(ctx, {ctx.regime.name(run_group(m)): (m, run_args(m)) for m in methods})
        return {m: found[ctx.regime.name(run_group(m))] for m in methods}
    plain = [m for m in methods if m != "cure"]
    if plain:
        _finished_or_trainable(ctx, [method_run_name(m) for m in plain])
        run_method_comparison(ctx.cfg, plain, ctx.root, progress=ctx.progress, st_epochs=ctx.s.st_epochs)
    found = {m: ctx.root / method_run_name(m) for m in plain}
    if "cure" in methods:
        found["cure"] = cure_runs(ctx)[CURE_RUN]
    return ctx.use({m: found[m] for m in methods})


def cure_runs(ctx: Context, suffixes: Iterable[str] = ("",)) -> PathMap:
    """The gallery's CURE (:data:`CURE_RUN`: :func:`run_args`, from the ST model) and its CURE Table 7 variants
    (``suffixes`` of :data:`CURE_ABLATION`). Returns ``{run name: run directory}``."""
    variants = {CURE_RUN + suffix: {**run_args("cure"), **CURE_ABLATION[suffix][2]} for suffix in suffixes}
    init = st_checkpoint(ctx)
    ctx.use({"st": Path(init).parent.parent})  # trained for them, read by them
    return variant_runs(ctx, "cure", variants, init=init)


def st_checkpoint(ctx: Context) -> str:
    """The ST model every layer-wise and CURE run starts from (trained on first use)."""
    path = ctx.root / method_run_name("st") / "checkpoints" / "best.pt"
    if not (path.parent.parent / "summary.json").exists():
        method_runs(ctx, ["st"])
    return str(path)


def freeze_runs(ctx: Context, reinit: bool = True, specs: Sequence[str] | None = None) -> PathMap:
    """ST, SAT (the comparison's AT run) and the U-spec runs of the freeze study (``specs``, default the
    profile's); writes ``study.csv``.

    Returns ``{"ST": ..., "SAT": ..., "U-23": ..., ...}``.
    """
    if specs is None:
        specs = ctx.s.specs if reinit else ctx.s.noreinit_specs
    method_runs(ctx, ["st", "at"])  # AT with its per-epoch checkpoints; the study then re-uses ST and AT
    _finished_or_trainable(ctx, [spec_run_name(spec, reinit) for spec in specs])
    rows = run_freeze_study(ctx.cfg, ",".join(specs), ctx.root, method="at", reinit=reinit, sat=True,
                            progress=ctx.progress, st_epochs=ctx.s.st_epochs)
    found = {r["run"]: Path(r["dir"]) for r in rows}
    st, at = found.pop(method_run_name("st")), found.pop(method_run_name("at"))
    return ctx.use({"ST": st, "SAT": at, **found})


def variant_runs(ctx: Context, method: str, variants: dict[str, dict[str, Any]], *,
                 init: str | None = None) -> PathMap:
    """Runs of ``method`` with other hyper-parameters (``{run name: method args}``) under the shared config; in the
    context's regime, the experiments' runs of the same names there (which start from their own ``init``).

    Returns ``{run name: run directory}`` (the name without the regime's part)."""
    if ctx.regime is not None:
        found = experiment_runs(ctx, {ctx.regime.name(name): (method, dict(args)) for name, args in variants.items()})
        return {name: found[ctx.regime.name(name)] for name in variants}
    todo = {name: args for name, args in variants.items() if not (ctx.root / name / "summary.json").exists()}
    _finished_or_trainable(ctx, todo)
    splits = splits_for(ctx.cfg) if todo else None
    for name, args in variants.items():
        cfg = ctx.cfg.replace(method=method, method_args=dict(args), init=init)
        run_or_reuse(cfg, ctx.root / name, overwrite=False, progress=ctx.progress, splits=splits)
    return ctx.use({name: ctx.root / name for name in variants})


def default_arg(method: str, name: str) -> Any:
    """A method factory's default hyper-parameter value."""
    return inspect.signature(METHODS[method][0]).parameters[name].default


RWP_SWEEP_NAMES = {"c_min": "cmin", "steps": "k"}  # swept RWP argument -> its name in run names (RWP-cmin1, RWP-k1)


def rwp_sweep_runs(ctx: Context, rwp: Path) -> list[tuple[str, float, Path]]:
    """RWP Fig. 3a / 3b: ``(argument, value, run directory)`` for every value of the profile's c_min and K2 sweeps,
    one argument at a time around the defaults (``RWP-cmin1``, ``RWP-k1``, ...); a default value's run is ``rwp``,
    the RWP run itself."""
    points = []
    for param, values in (("c_min", ctx.s.rwp_cmins), ("steps", ctx.s.rwp_steps)):
        default = default_arg("rwp", param)
        names = {v: f"{method_run_name('rwp')}-{RWP_SWEEP_NAMES[param]}{v:g}" for v in values}
        found = variant_runs(ctx, "rwp", {names[v]: {param: v} for v in values if v != default})
        points += [(param, v, rwp if v == default else found[names[v]]) for v in values]
    return points


def experiment_spec(name: str) -> RunSpec:
    """The run ``name`` of :data:`layerlab.experiments.EXPERIMENTS` (one name, one config in every experiment)."""
    for exp in EXPERIMENTS.values():
        for spec in exp.specs:
            if spec.name == name:
                return spec
    raise ValueError(f"no experiment has a run named {name!r}; `python -m layerlab.experiments list` lists them")


def experiment_runs(ctx: Context, wanted: dict[str, tuple[str, dict[str, Any]]]) -> PathMap:
    """The experiments' runs ``{name: (method, method args)}`` (:func:`experiment_spec`), each trained as they train
    it on the profile's config after the run it starts from, or re-used. The method and its arguments are what the
    figure means to read: a run the experiments train otherwise is refused before anything trains.

    Returns ``{run name: run directory}``."""
    specs = {name: experiment_spec(name) for name in wanted}
    for name, (method, args) in wanted.items():
        have = (specs[name].changes.get("method"), dict(specs[name].changes.get("method_args", {})))
        if have != (method, dict(args)):
            raise ValueError(f"the experiments train {name} as {have[0]} {have[1]}, not {method} {args}; name the "
                             f"run the figure reads in layerlab.experiments")
    return ctx.use({name: _train_spec(ctx, spec) for name, spec in specs.items()})


def _train_spec(ctx: Context, spec: RunSpec) -> Path:
    """Train (or re-use) an experiment's run ``spec`` in the run root, after the run it starts from."""
    if spec.init is not None:
        ctx.use({spec.init: _train_spec(ctx, experiment_spec(spec.init))})  # trained for it, read by it
    _finished_or_trainable(ctx, [spec.name])
    run_or_reuse(spec.config(ctx.cfg, ctx.root), ctx.root / spec.name, overwrite=False, progress=ctx.progress)
    return ctx.root / spec.name


def _finished_or_trainable(ctx: Context, names: Iterable[str]) -> None:
    """Refuse (inside :func:`layerlab.records.records_only`) before training any of the runs ``names`` that the run
    root does not hold finished."""
    for name in names:
        if not (ctx.root / name / "summary.json").exists():
            require_training(f"run {name}")


def summary(run_dir: Path) -> dict[str, Any]:
    """A finished run's summary.json."""
    return runs.read_json(Path(run_dir) / "summary.json")
