"""The runs the figures read, in one flat run root shared by every figure (each model is trained once).

* ``ST/ AT/ TRADES/ MART/ AWP/ RWP/ CURE/``: one run per method (:func:`layerlab.study.run_method_comparison`,
  which also writes ``compare.csv``); CURE starts from ``ST/``. Every run keeps the profile's per-epoch
  checkpoints (``checkpoints/epoch-E.pt``) for the LSC removal-rate view.
* ``U-23/ U-23-noreinit/ ...``: the freeze study (:func:`layerlab.study.run_freeze_study`, ``study.csv``),
  which shares ``ST/`` (its starting point) and ``AT/`` (its SAT baseline) with the method comparison.
* ``CURE-p0/ CURE-gamma0/ CURE-p0-gamma0/``: CURE Table 7 (RGP off: ``p=0``; revision off: ``gamma=0``).
* ``RWP-cmin1/ RWP-k1/ ...``: RWP's c_min and K2 sweeps (the default values are ``RWP/`` itself).
* ``analysis/``: results that compare several runs (minimum perturbations, attributions).

Finished runs with the same config are never retrained; interrupted ones are resumed. Inside
:func:`layerlab.records.records_only` a run the root does not hold finished is an error, not a training job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from layerlab import runs
from layerlab.gallery.settings import Context, PathMap
from layerlab.records import require_training
from layerlab.study import (
    NEEDS_ST_INIT,
    method_run_name,
    run_freeze_study,
    run_method_comparison,
    run_or_reuse,
    spec_run_name,
)
from layerlab.train import splits_for


def method_runs(ctx: Context, methods: Iterable[str]) -> PathMap:
    """One run per method in the run root (trained once, then re-used); CURE starts from ``ST/``.

    Returns ``{method: run directory}``.
    """
    methods = list(dict.fromkeys(methods))
    _finished_or_trainable(ctx, [method_run_name(m) for m in methods]
                           + ([method_run_name("st")] if any(m in NEEDS_ST_INIT for m in methods) else []))
    run_method_comparison(ctx.cfg, methods, ctx.root, progress=ctx.progress, st_epochs=ctx.s.st_epochs)
    if any(m in NEEDS_ST_INIT for m in methods):
        ctx.use({"st": ctx.root / method_run_name("st")})  # trained for them, read by them
    return ctx.use({m: ctx.root / method_run_name(m) for m in methods})


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
    """Runs of ``method`` with other hyper-parameters (``{run name: method args}``) under the shared config."""
    todo = {name: args for name, args in variants.items() if not (ctx.root / name / "summary.json").exists()}
    _finished_or_trainable(ctx, todo)
    splits = splits_for(ctx.cfg) if todo else None
    for name, args in variants.items():
        cfg = ctx.cfg.replace(method=method, method_args=dict(args), init=init)
        run_or_reuse(cfg, ctx.root / name, overwrite=False, progress=ctx.progress, splits=splits)
    return ctx.use({name: ctx.root / name for name in variants})


def _finished_or_trainable(ctx: Context, names: Iterable[str]) -> None:
    """Refuse (inside :func:`layerlab.records.records_only`) before training any of the runs ``names`` that the run
    root does not hold finished."""
    for name in names:
        if not (ctx.root / name / "summary.json").exists():
            require_training(f"run {name}")


def summary(run_dir: Path) -> dict[str, Any]:
    """A finished run's summary.json."""
    return runs.read_json(Path(run_dir) / "summary.json")
