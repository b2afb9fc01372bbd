"""The ``layerlab`` command line: a thin caller of the library (train, freeze-study, eval, presets)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import typer

from layerlab import distributed
from layerlab import train as trainer
from layerlab.analysis.attributions import attributions_runs
from layerlab.analysis.cka import LAYER_SETS, cka_run
from layerlab.analysis.corruptions import corruptions_run
from layerlab.analysis.curves import write_curves
from layerlab.analysis.lsc import mu_grid, parse_edges, lsc_run
from layerlab.analysis.minimum import minpert_runs
from layerlab.benchmark import EVAL_FILE, MODEL_HELP, NORMALIZE_HELP
from layerlab.benchmark import benchmark as run_benchmark
from layerlab.config import EPS, PGD_STEP, ST_EPOCHS
from layerlab.evaluation import ATTACK_HELP, DEFAULT_SWEEP_255, eval_file, evaluate_run
from layerlab.gallery import GROUPS, redraw, verify, write_readme
from layerlab.gallery import reproduce as run_all
from layerlab.gallery.notebooks import NOTEBOOKS_DIR
from layerlab.gallery.notebooks import execute as execute_notebooks
from layerlab.gallery.settings import group_of
from layerlab.loggers import LOGGERS, loggers
from layerlab.methods import METHODS, PRESETS, resolve_method
from layerlab.methods.perturbation import C_MIN
from layerlab.options import UNITS_HELP, ConfigArgs, config_options, switch
from layerlab.plots.cka import plot_cka
from layerlab.plots.layer_stats import plot_grads
from layerlab.plots.robustness import plot_eps_sweep
from layerlab.progress import note
from layerlab.records import NotRecorded, export_records, restore_records
from layerlab.study import run_freeze_study, run_method_comparison
from layerlab.system import tune_cpu_allocator

class _FlagHelp:
    """Commands whose ``--help`` is shown as a flag (typer otherwise shows it as taking a ``<bool>``)."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class _Group(_FlagHelp, typer.core.TyperGroup):
    pass


class _Command(_FlagHelp, typer.core.TyperCommand):
    pass


app = typer.Typer(help="Layer-wise analysis of adversarial training (CURE, RWP) in PyTorch.", cls=_Group,
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

def version() -> str:
    """The installed layerlab version."""
    try:
        return importlib.metadata.version("layerlab")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"layerlab {version()}")
        raise typer.Exit()


@app.callback()
def _main(show_version: bool = switch(False, "--version", help="print the version and exit", is_eager=True,
                                      callback=_print_version)) -> None:
    """Layer-wise analysis of adversarial training (CURE, RWP) in PyTorch."""


DataDirOpt = typer.Option(None, "--data-dir", help="where datasets live (else $LAYERLAB_DATA)")
OverwriteOpt = switch(False, "--overwrite", help="replace an existing run directory")
ResumeOpt = switch(False, "--resume", help="continue an interrupted run from checkpoints/last.pt")
ProgressOpt = switch(True, "--progress/--no-progress", help="show progress bars")
# the attack suite's options, shared by `eval` (a run) and `benchmark` (any model)
AttacksOpt = typer.Option("natural,fgsm,pgd20", help="comma-separated: " + ATTACK_HELP)
EvalNOpt = typer.Option(None, help="evaluate on the first N test examples (AutoAttack is slow on CPU)")
EvalBatchOpt = typer.Option(256, help="evaluation batch size")
EpsSweepOpt = typer.Option(",".join(f"{e:g}" for e in DEFAULT_SWEEP_255), help="eps values (x 1/255) of the eps-sweep")
DeviceOpt = typer.Option("auto", help="auto, cpu, cuda")
Cifar10cOpt = typer.Option(None, "--cifar10c", help="directory of the published CIFAR-10-C files (<corruption>.npy, "
                           "labels.npy): read the corrupted images from them instead of generating them")
StEpochsOpt = typer.Option(None, help=f"epochs of the natural (ST) model; default --epochs when given, else per "
                                         f"profile {ST_EPOCHS}")


def _fail(err: Exception) -> None:
    """Print a one-line error and exit with status 2."""
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


def _print_summary(summary: dict[str, Any]) -> None:
    typer.echo(f"{summary['method']}: natural {summary['natural_acc']:.2f}%  "
               f"PGD-{summary['attack']['steps']} {summary['robust_acc']:.2f}%  NRR {summary['nrr']:.2f}  "
               f"({summary['seconds']:.0f} s)")


def _st_epochs(config: ConfigArgs, st_epochs: int | None) -> int:
    """Epochs of the ST model: ``--st-epochs``, else ``--epochs`` when given, else the profile's."""
    return st_epochs or config.given.get("epochs") or ST_EPOCHS[config.profile]


@app.command(epilog=UNITS_HELP)
@config_options()
def train(
    out: Path = typer.Option(..., "--out", help="run directory to write"),
    method: Optional[str] = typer.Option(None, help="training method (see `layerlab presets` for all; default: "
                                         "the --config file's, else at)"),
    preset: Optional[str] = typer.Option(None, help="a named hyper-parameter preset (`layerlab presets`)"),
    arg: list[str] = typer.Option([], "--arg", help="method hyper-parameter KEY=VALUE (repeatable)"),
    logger: list[str] = typer.Option([], "--logger", metavar="NAME", help=(
        "log each epoch's metrics and per-block gradient / update statistics (repeatable): "
        + "; ".join(f"{name}: {doc}" for name, (_, doc) in LOGGERS.items()))),
    overwrite: bool = OverwriteOpt, resume: bool = ResumeOpt, progress: bool = ProgressOpt,
    config: ConfigArgs = None,
) -> None:
    """Train one model with one method and write its run directory (on several GPUs under torchrun)."""
    try:
        callbacks = loggers(logger)
        saved = trainer.saved_config(out) if resume else None  # resuming: options given must match the run's
        base = config.build(saved)
        name, method_args, preset_cfg = resolve_method(method or base.method, preset, arg)
        if preset is None and name == base.method:  # the config file's (or run's) method keeps its hyper-parameters
            method_args = {**base.method_args, **method_args}
        cfg = config.build(saved, **preset_cfg, method=name, method_args=method_args)
        with distributed.launch(cfg.device):  # torchrun: one process group, DDP; otherwise a no-op
            main = distributed.is_main()
            summary = trainer.train(cfg, out, resume=resume, overwrite=overwrite, progress=progress,
                                    callbacks=callbacks)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        _fail(err)
    if main:
        _print_summary(summary)


@app.command("freeze-study", epilog=UNITS_HELP)
@config_options(skip=("init", "update", "reinit"))
def freeze_study(
    blocks: str = typer.Option("23", help="update specs, comma-separated (23 = update block2+block3), or 'all'"),
    out: Path = typer.Option(Path("runs/freeze-study"), "--out", help="study directory (ST/, AT/, U-*/, study.csv)"),
    base: Optional[str] = typer.Option(None, help="re-use this ST checkpoint instead of training ST"),
    method: str = typer.Option("at", help="adversarial method of the U-spec runs (at or trades)"),
    reinit: bool = switch(True, "--reinit/--no-reinit", help="re-initialize updated blocks (else fine-tune)"),
    sat: bool = switch(True, "--sat/--no-sat", help="also train the full AT baseline from scratch (SAT)"),
    st_epochs: Optional[int] = StEpochsOpt, overwrite: bool = OverwriteOpt, progress: bool = ProgressOpt,
    gpus: Optional[str] = typer.Option(None, "--gpus", help="GPU ids, e.g. 0,1: after ST, train the independent "
                                       "runs in parallel, one subprocess per GPU (logs in OUT/logs; not with torchrun)"),
    config: ConfigArgs = None,
) -> None:
    """CURE's layer-wise study: train ST, then adversarially train only the chosen blocks of it.

    Finished runs in the study directory are re-used; interrupted ones are resumed. Under torchrun every
    run uses all GPUs together; with --gpus independent runs train side by side, one per GPU.
    """
    try:
        cfg = config.build()
        with distributed.launch(cfg.device):  # torchrun: one process group, DDP; otherwise a no-op
            main = distributed.is_main()
            rows = run_freeze_study(cfg, blocks, out, base=base, method=method, reinit=reinit, sat=sat,
                                    overwrite=overwrite, progress=progress, st_epochs=_st_epochs(config, st_epochs),
                                    gpus=distributed.parse_gpus(gpus) if gpus is not None else None)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        _fail(err)
    if not main:
        return
    typer.echo(f"{'run':<12}{'natural':>9}{'PGD-20':>9}{'NRR':>8}{'trainable':>12}{'seconds':>9}")
    for r in rows:
        typer.echo(f"{r['run']:<12}{r['natural_acc']:>9.2f}{r['robust_acc']:>9.2f}{r['nrr']:>8.2f}"
                   f"{r['trainable_params']:>12,}{r['seconds']:>9.0f}")
    typer.echo(f"wrote {out / 'study.csv'}")


@app.command("eval")
def eval_cmd(
    run: Path = typer.Option(..., "--run", help="run directory"),
    attacks: str = AttacksOpt,
    checkpoint: str = typer.Option("best", help="best or last"),
    n: Optional[int] = EvalNOpt,
    batch_size: int = EvalBatchOpt,
    seed: int = typer.Option(0, help="attack seed"),
    eps_sweep: str = EpsSweepOpt,
    device: str = DeviceOpt,
    data_dir: Optional[str] = DataDirOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Evaluate a run's model under attacks; writes RUN/eval.json (RUN/eval-last.json for the last checkpoint; and
    RUN/eps_sweep.png for eps-sweep)."""
    try:
        sweep = [float(e) for e in eps_sweep.split(",") if e.strip()]
        report = evaluate_run(run, [a.strip() for a in attacks.split(",") if a.strip()], checkpoint=checkpoint,
                              n=n, batch_size=batch_size, seed=seed, device=device, data_dir=data_dir,
                              sweep_255=sweep, progress=progress)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(err)
    _print_eval(report, run / eval_file(checkpoint), run.name)


def _print_eval(report: dict[str, Any], path: Path, label: str) -> None:
    """Print an eval.json report written to ``path`` (and draw its eps-sweep beside it)."""
    for name, res in report["results"].items():
        typer.echo(f"{name:<12}{res['accuracy']:>8.2f}%")
    for norm, res in report["worst_case"].items():
        typer.echo(f"{'worst-' + norm:<12}{res['accuracy']:>8.2f}%  (over {', '.join(res['attacks'])})")
    for name, m in report["metrics"].items():
        typer.echo(f"{name:<12} NRR {m['nrr']:6.2f}  sum {m['sum']:7.2f}")
    if "eps_sweep" in report:
        points = report["eps_sweep"]["points"]
        typer.echo("eps-sweep   " + "  ".join(f"{p['eps_255']:g}:{p['accuracy']:.1f}" for p in points))
        typer.echo(f"wrote {plot_eps_sweep({label: path}, path.parent / 'eps_sweep.png')}")
    if not report["checks"]["passed"]:
        typer.echo(f"WARNING: sanity checks failed (see 'checks' in {path.name}); do not trust these numbers",
                   err=True)
    status = "passed" if report["checks"]["passed"] else "FAILED"
    typer.echo(f"wrote {path} (n={report['n']}, sanity checks {status})")


@app.command("benchmark")
def benchmark_cmd(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    weights: Optional[Path] = typer.Option(None, "--weights", help="state_dict file (read with torch.load "
                                           "weights_only=True; also nested under state_dict or model)"),
    dataset: str = typer.Option("cifar10", help="digits, cifar10, cifar100, svhn or folder:PATH"),
    out: Path = typer.Option(..., "--out", help="directory for eval.json (and corruptions.csv/png)"),
    attacks: str = AttacksOpt,
    n: Optional[int] = EvalNOpt,
    eps: float = typer.Option(EPS * 255, help="L-inf attack radius, in 1/255 units"),
    pgd_step: float = typer.Option(PGD_STEP * 255, "--pgd-step", help="L-inf PGD/CW step size, in 1/255 units"),
    normalize: Optional[str] = typer.Option(None, help=NORMALIZE_HELP),
    corruptions: Optional[str] = typer.Option(None, help="also CIFAR-10-C: comma-separated corruption types or "
                                              "groups (noise, blur, weather, digital, all)"),
    severities: str = typer.Option("1,2,3,4,5", help="comma-separated corruption severities (1-5)"),
    cifar10c: Optional[Path] = Cifar10cOpt,
    batch_size: int = EvalBatchOpt,
    seed: int = typer.Option(0, help="attack (and generated corruption) seed"),
    eps_sweep: str = EpsSweepOpt,
    device: str = DeviceOpt,
    data_dir: Optional[str] = DataDirOpt,
    overwrite: bool = switch(False, "--overwrite", help="replace OUT/eval.json and OUT/corruptions.csv"),
    progress: bool = ProgressOpt,
) -> None:
    """Evaluate any model (not only a run) under attacks, and optionally CIFAR-10-C; writes OUT/eval.json.

    The model takes images in [0, 1] and returns logits, normalizing inside (RobustBench's convention) unless
    given --normalize. A module:function spec may name a module of the current directory. With --cifar10c DIR
    the corrupted images are read from the published files (all 15 corruptions unless --corruptions says
    otherwise); with --corruptions alone they are generated. eval.json names the source.
    """
    if str(Path.cwd()) not in sys.path:  # as under python -m: specs may name a module of the current directory
        sys.path.insert(0, str(Path.cwd()))
    try:
        report = run_benchmark(
            model, dataset, weights=weights, data_dir=data_dir, n=n, eps=eps / 255, step=pgd_step / 255,
            attacks=[a.strip() for a in attacks.split(",") if a.strip()],
            sweep_255=[float(e) for e in eps_sweep.split(",") if e.strip()], normalize=normalize,
            corruptions=[t.strip() for t in corruptions.split(",") if t.strip()] if corruptions else None,
            severities=[int(s) for s in severities.split(",") if s.strip()], cifar10c=cifar10c,
            batch_size=batch_size, seed=seed, device=device, out=out, overwrite=overwrite,
            progress=progress)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        _fail(err)
    _print_eval(report, out / EVAL_FILE, model)
    if "corruptions" in report:
        c = report["corruptions"]
        typer.echo(f"{'cifar10-c':<12}{c['mean']:>8.2f}%  (mean over {len(c['types'])} corruptions x "
                   f"{len(c['severities'])} severities; {c['source']}; wrote {out / c['file']})")


@app.command()
def corruptions(
    run: Path = typer.Option(..., "--run", help="run directory"),
    n: Optional[int] = typer.Option(None, help="use the first N test images"),
    severities: str = typer.Option("1,2,3,4,5", help="comma-separated severities (1-5)"),
    types: str = typer.Option("all", help="comma-separated corruption types or groups (noise, blur, weather, digital)"),
    seed: int = typer.Option(0, help="corruption noise seed"),
    checkpoint: str = typer.Option("best", help="best or last"),
    batch_size: int = EvalBatchOpt,
    device: str = DeviceOpt,
    data_dir: Optional[str] = DataDirOpt,
    cifar10c: Optional[Path] = Cifar10cOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Accuracy under the 15 CIFAR-10-C corruptions (read from --cifar10c DIR, else generated on the fly); writes
    RUN/corruptions.{csv,png}, whose source column says which."""
    try:
        csv, png = corruptions_run(run, n=n, types=[t.strip() for t in types.split(",") if t.strip()],
                                       severities=[int(s) for s in severities.split(",") if s.strip()], seed=seed,
                                       checkpoint=checkpoint, batch_size=batch_size, device=device, data_dir=data_dir,
                                       cifar10c=cifar10c, progress=progress)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(err)
    typer.echo(f"wrote {csv} and {png}")


@app.command()
def minpert(
    runs: list[Path] = typer.Option(..., "--runs", help="run directories: --runs DIR1 DIR2 ... (or repeat --runs)"),
    more: Optional[list[Path]] = typer.Argument(None, help="further run directories", show_default=False),
    n: int = typer.Option(8, help="number of test images (the first ones every model classifies correctly)"),
    out: Optional[Path] = typer.Option(None, "--out", help="output directory (default: PARENT_OF_FIRST_RUN/analysis)"),
    method: str = typer.Option("both", help="both (smaller of FMN and PGD bisection), fmn (bisection as fallback), "
                               "bisection"),
    eps_max: float = typer.Option(32.0, help="largest eps (x 1/255) the bisection searches"),
    checkpoint: str = typer.Option("best", help="best or last"),
    device: str = DeviceOpt,
    data_dir: Optional[str] = DataDirOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Minimum L-inf perturbation flipping each of a few test images, per model; writes minpert.{json,npz,png}."""
    try:
        dirs = runs + list(more or [])
        paths = minpert_runs(dirs, out or dirs[0].parent / "analysis", n=n, method=method, eps_max=eps_max / 255,
                                 checkpoint=checkpoint, device=device, data_dir=data_dir, progress=progress)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(err)
    typer.echo(f"wrote {paths['json']} and {paths['png']}")


@app.command()
def attributions(
    runs: list[Path] = typer.Option(..., "--runs", help="run directories: --runs DIR1 DIR2 ... (or repeat --runs)"),
    more: Optional[list[Path]] = typer.Argument(None, help="further run directories", show_default=False),
    n: int = typer.Option(6, help="number of test images (the first ones every model classifies correctly)"),
    out: Optional[Path] = typer.Option(None, "--out", help="output directory (default: PARENT_OF_FIRST_RUN/analysis)"),
    ig_steps: int = typer.Option(32, help="integrated-gradients steps"),
    layer_method: str = typer.Option("lig", help="lig (layer integrated gradients) or gxa (gradient x activation)"),
    checkpoint: str = typer.Option("best", help="best or last"),
    device: str = DeviceOpt,
    data_dir: Optional[str] = DataDirOpt,
) -> None:
    """Saliency / integrated-gradients maps and per-block layer attributions; writes attributions.{json,npz,png}."""
    try:
        dirs = runs + list(more or [])
        paths = attributions_runs(dirs, out or dirs[0].parent / "analysis", n=n, ig_steps=ig_steps,
                                      layer_method=layer_method, checkpoint=checkpoint, device=device,
                                      data_dir=data_dir)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(err)
    typer.echo(f"wrote {paths['json']}, {paths['png']} and {paths['blocks_png']}")


@app.command(epilog=UNITS_HELP)
@config_options(skip=("init", "update", "reinit", "reset_bn"))
def compare(
    methods: str = typer.Option("st,at,trades,mart,awp,rwp,cure,cure-eff", help="comma-separated methods"),
    out: Path = typer.Option(Path("runs/compare"), "--out", help="directory of one run per method + compare.csv"),
    st_epochs: Optional[int] = StEpochsOpt, overwrite: bool = OverwriteOpt, progress: bool = ProgressOpt,
    config: ConfigArgs = None,
) -> None:
    """Train every method under the same settings (CURE from the ST run) and tabulate natural / PGD-20 / NRR.

    Finished runs are re-used and interrupted ones resumed, so the command can be re-run at any time.
    """
    try:
        rows = run_method_comparison(config.build(), [m.strip() for m in methods.split(",") if m.strip()], out,
                                     overwrite=overwrite, progress=progress, st_epochs=_st_epochs(config, st_epochs))
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        _fail(err)
    typer.echo(f"{'method':<12}{'natural':>9}{'PGD-20':>9}{'NRR':>8}{'s/epoch':>9}{'median':>9}")
    for r in rows:
        typer.echo(f"{r['method']:<12}{r['natural_acc']:>9.2f}{r['robust_acc']:>9.2f}{r['nrr']:>8.2f}"
                   f"{r['seconds_per_epoch']:>9.1f}{r['median_seconds_per_epoch']:>9.1f}")
    typer.echo(f"wrote {out / 'compare.csv'}")


@app.command("cka")
def cka(
    run: Path = typer.Option(..., "--run", help="run directory (model A)"),
    other: Optional[Path] = typer.Option(None, "--other", help="second run directory (model B, same-inputs mode)"),
    n: int = typer.Option(1000, help="number of test examples"),
    batch_size: int = typer.Option(100, help="minibatch size of the unbiased HSIC estimator (>= 4)"),
    mode: Optional[str] = typer.Option(None, help="nat-vs-adv (default without --other) or same-inputs"),
    adversarial: Optional[bool] = switch(None, "--adversarial/--natural",
                                               help="same-inputs: PGD inputs crafted on model A, or natural ones"),
    checkpoint: str = typer.Option("best", help="best or last"),
    layers: str = typer.Option("blocks", help="blocks, residual-blocks, all-convs, or comma-separated module names"),
    steps: Optional[int] = typer.Option(None, help="PGD steps (default: the run's eval_steps)"),
    seed: int = typer.Option(0, help="attack seed"),
    device: str = DeviceOpt,
    data_dir: Optional[str] = DataDirOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="JSON path (default RUN/cka.json); the PNG goes next to it"),
    progress: bool = ProgressOpt,
) -> None:
    """Linear CKA between layers (natural vs adversarial, or two models); writes cka.json and a heatmap PNG."""
    layer_spec = layers if layers in LAYER_SETS else [name.strip() for name in layers.split(",") if name.strip()]
    try:
        result, path = cka_run(run, other, mode=mode, adversarial=adversarial, n=n, batch_size=batch_size,
                               checkpoint=checkpoint, layers=layer_spec, steps=steps, seed=seed, device=device,
                               data_dir=data_dir, out=out, progress=progress)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(err)
    png = plot_cka(path, path.with_suffix(".png"))
    for name, value in result.diagonal().items():
        typer.echo(f"{name:<16}{value:>8.3f}")
    typer.echo(f"wrote {path} and {png} (n={result.n})")


plot_app = typer.Typer(help="Figures drawn from a run's result files only (no model is loaded).", cls=_Group,
                       no_args_is_help=True)
app.add_typer(plot_app, name="plot")


@plot_app.command("grads")
def plot_grads_cmd(
    run: Path = typer.Option(..., "--run", help="run directory (needs layer_stats.jsonl, written by default)"),
    out: Optional[Path] = typer.Option(None, "--out", help="figure directory (default RUN/figures)"),
) -> None:
    """Mean gradient per block over training and percent of weights updated per layer and phase (CURE Fig. 6)."""
    try:
        paths = plot_grads(run, out)
    except (ValueError, FileNotFoundError, KeyError) as err:
        _fail(err)
    for path in paths:
        typer.echo(f"wrote {path}")


@plot_app.command("curves")
def plot_curves_cmd(
    run_dirs: list[Path] = typer.Argument(..., metavar="RUN...", help="run directories (with metrics.jsonl)"),
    select_on: str = typer.Option("val", "--select-on", help="pick the best epoch on val or test robust accuracy"),
    out: Path = typer.Option(Path("curves"), "--out", help="directory for curves.csv, overfitting.csv, curves.png"),
) -> None:
    """Robust overfitting: accuracy curves across runs and the best / last / delta table."""
    try:
        paths = write_curves(run_dirs, out, select_on=select_on)
    except (ValueError, FileNotFoundError, KeyError) as err:
        _fail(err)
    typer.echo(pd.read_csv(paths["overfitting"]).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    typer.echo(f"wrote {', '.join(str(p) for p in paths.values())}")


@app.command("lsc")
def lsc_cmd(
    run: Path = typer.Option(..., "--run", help="run directory (its config gives the data and the attack)"),
    checkpoints: str = typer.Option("best,last", help="comma-separated: best, last, checkpoint files, run directories"),
    n: int = typer.Option(1000, help="training examples to attack (seeded subset)"),
    edges: str = typer.Option("0,0.5,1,1.5,2,2.5,3", help="LSC group edges of the adversarial loss (+ a last >= group)"),
    mu_min: float = typer.Option(-1.0, help="smallest step along the direction"),
    mu_max: float = typer.Option(1.0, help="largest step along the direction"),
    points: int = typer.Option(21, help="grid points from mu-min to mu-max"),
    directions: int = typer.Option(3, help="random filter-normalized directions to average"),
    c_min: float = typer.Option(C_MIN, help="LSC value of the removal-rate view (RWP's default)"),
    attack_steps: int = typer.Option(10, help="PGD steps of the training adversarial examples"),
    seed: int = typer.Option(0, help="seed of the subset, the attack and the directions"),
    batch_size: int = typer.Option(256, help="batch size"),
    device: str = DeviceOpt,
    data_dir: Optional[str] = DataDirOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="output directory (default: the run directory)"),
    progress: bool = ProgressOpt,
) -> None:
    """Weight-loss landscapes of LSC groups (RWP Fig. 2) -> lsc.csv/png, and removal rates -> removal_rate.csv/png."""
    try:
        paths = lsc_run(run, checkpoints.split(","), n=n, edges=parse_edges(edges),
                        mus=mu_grid(mu_min, mu_max, points), directions=directions, seed=seed, c_min=c_min,
                        attack_steps=attack_steps, batch_size=batch_size, device=device, data_dir=data_dir, out=out,
                        progress=progress)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(err)
    for path in paths.values():
        typer.echo(f"wrote {path}")


@app.command()
def presets() -> None:
    """List training methods and hyper-parameter presets."""
    typer.echo("methods:")
    for name, (_, doc) in METHODS.items():
        typer.echo(f"  {name:<14}{doc}")
    typer.echo("presets:")
    for name, (method, args, overrides, doc) in PRESETS.items():
        typer.echo(f"  {name:<30} {method:<11} {doc}\n{'':<46}args {args}"
                   f"{'; config ' + str(overrides) if overrides else ''}")


@app.command()
def reproduce(
    profile: str = typer.Option("tiny", help="tiny (minutes, digits), smoke, cpu (hours, CIFAR-10 subset), paper: "
                                "the same configs as under train and compare, so their runs are re-used"),
    runs: Path = typer.Option(Path("runs/reproduce"), "--runs", help="run root shared by every figure (re-used)"),
    figures: Path = typer.Option(Path("runs/figures"), "--figures", help="where figures and tables are written"),
    only: Optional[str] = typer.Option(None, help="comma-separated figure groups (default: all, in notebook order)"),
    data_dir: Optional[str] = DataDirOpt,
    progress: Optional[bool] = switch(None, "--progress/--no-progress",
                                            help="progress bars (default: on at cpu and paper scale)"),
    records: Optional[Path] = typer.Option(None, "--records", help="directory of run records (e.g. results/runs-cpu): "
                                           "restore missing runs from it first, export finished runs to it; "
                                           "the manifests name its files"),
) -> None:
    """Re-make every figure of the CURE and RWP papers: the same library calls as notebooks/01-12."""
    try:
        done = run_all(profile, runs, figures, data_dir, progress=progress, records=records,
                       only=[n.strip() for n in only.split(",") if n.strip()] if only else None,
                       log=note)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        _fail(err)
    for name, paths in done.items():
        typer.echo(f"{name} ({GROUPS[name].notebook}):")
        for path in paths.values():
            typer.echo(f"  {path}")


records_app = typer.Typer(help="Run records: a run root's small result files, kept where checkpoints cannot be.",
                          cls=_Group, no_args_is_help=True)
app.add_typer(records_app, name="records")


@records_app.command("export")
def records_export(
    runs: Path = typer.Option(..., "--runs", help="run root whose finished runs are exported"),
    to: Path = typer.Option(..., "--to", help="records directory (e.g. results/runs-cpu)"),
) -> None:
    """Copy every finished run's JSON/JSONL/CSV/NPZ results (never checkpoints) to TO/RUN/."""
    try:
        names = export_records(runs, to)
    except FileNotFoundError as err:
        _fail(err)
    typer.echo(f"exported {len(names)} runs to {to}: {', '.join(names)}")


@records_app.command("restore")
def records_restore(
    src: Path = typer.Option(..., "--from", help="records directory"),
    runs: Path = typer.Option(..., "--runs", help="run root to restore the missing runs into"),
) -> None:
    """Lay recorded runs into RUNS where they are missing (marked record.json; retrained when weights are needed)."""
    if not src.is_dir():
        _fail(FileNotFoundError(f"records directory {src} does not exist"))
    names = restore_records(src, runs)
    typer.echo(f"restored {len(names)} runs into {runs}: {', '.join(names)}")


@records_app.command("verify")
def records_verify(
    figures: Path = typer.Option(Path("figures"), "--figures", help="figures directory whose manifests are checked"),
) -> None:
    """Check that every figure group's manifest matches the records it was drawn from (content hashes) and that no
    file under FIGURES copies a record; exit 1 listing each problem."""
    if not figures.is_dir():
        _fail(FileNotFoundError(f"figures directory {figures} does not exist; pass it with --figures"))
    problems = verify(figures)
    for problem in problems:
        typer.echo(problem, err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{figures}: every manifest matches its records")


@records_app.command("redraw")
def records_redraw(
    only: str = typer.Option(..., "--only", help="comma-separated figure groups to draw again from their records"),
    figures: Path = typer.Option(Path("figures"), "--figures", help="figures directory holding the groups"),
    data_dir: Optional[str] = DataDirOpt,
) -> None:
    """Draw figure groups again from the records their manifests name, alone (nothing trains), and rewrite
    FIGURES/README.md."""
    try:
        groups = [group_of(k.strip()) for k in only.split(",") if k.strip()]  # every name checked before drawing
        for group in groups:
            for path in redraw(group.key, figures, data_dir).values():
                typer.echo(f"  {path}")
    except (ValueError, FileNotFoundError, FileExistsError, NotRecorded) as err:
        _fail(err)
    write_readme(figures)


@app.command()
def notebooks(
    only: Optional[str] = typer.Option(None, help="comma-separated figure groups (default: all, in notebook order)"),
    folder: Path = typer.Option(Path(NOTEBOOKS_DIR), "--notebooks", help="the notebooks' directory; the committed "
                                "gallery and records are beside it (../figures, ../results)"),
) -> None:
    """Execute the figure notebooks in place for committing: each group drawn again from the records (nothing
    trains) and shown, volatile metadata stripped; a group not matching its records is left without outputs."""
    try:
        done = execute_notebooks(folder, [k.strip() for k in only.split(",") if k.strip()] if only else None)
    except (ValueError, FileNotFoundError, NotRecorded) as err:
        _fail(err)
    for key, what in done.items():
        typer.echo(f"{GROUPS[key].notebook}: {what}")


@app.command()
def explore(
    runs: Path = typer.Option(Path("runs/reproduce"), "--runs", help="run root to explore"),
    port: int = typer.Option(8866, help="localhost port of the Voilà server"),
    browser: bool = switch(True, "--browser/--no-browser", help="open a browser tab"),
) -> None:
    """Serve the interactive explorer (layerlab.explore) of a run root with Voilà on localhost."""
    from layerlab.explore import app_notebook, voila_command

    if not runs.is_dir():
        _fail(FileNotFoundError(f"{runs} is not a directory; pass a run root with --runs"))
    if importlib.util.find_spec("voila") is None:
        _fail(RuntimeError("the explorer server needs Voilà: pip install 'layerlab[notebooks]'"))
    notebook = app_notebook(runs, Path(tempfile.mkdtemp(prefix="layerlab-explore-")) / "explorer.ipynb")
    cmd = voila_command(notebook, port=port, open_browser=browser)
    typer.echo(f"serving {runs} at http://127.0.0.1:{port}/ (Ctrl-C stops)", err=True)
    os.execv(cmd[0], cmd)  # the server replaces this process, so Ctrl-C and kill reach it directly


for _typer_app in (app, plot_app, records_app):
    for _info in _typer_app.registered_commands:
        if _info.cls in (None, typer.core.TyperCommand):
            _info.cls = _Command


def main() -> None:
    """Console-script entry point (the process is ours: tune glibc's allocator for training, see layerlab.system)."""
    tune_cpu_allocator()
    app(prog_name="layerlab")


if __name__ == "__main__":
    sys.exit(main())
