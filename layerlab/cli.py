"""The ``layerlab`` command line: a thin caller of the library (train, freeze-study, eval, presets)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from layerlab.config import PROFILES, TrainConfig, make_config

app = typer.Typer(help="Layer-wise analysis of adversarial training (CURE, RWP) in PyTorch.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

# Options shared by `train` and `freeze-study`. None means "the profile's value".
ProfileOpt = typer.Option("smoke", help=f"consistent defaults: {', '.join(PROFILES)} (any flag overrides them)")
ModelOpt = typer.Option(None, help="resnet18, preactresnet18, wrn34-10, wrn28-10, resnet50, resnet101")
WidthOpt = typer.Option(None, help="channel width multiplier (1.0 = the standard model)")
DatasetOpt = typer.Option(None, help="digits (built in), cifar10, cifar100, svhn, or folder:PATH")
DataDirOpt = typer.Option(None, "--data-dir", help="where datasets live (else $LAYERLAB_DATA)")
DownloadOpt = typer.Option(None, "--download/--no-download", help="let torchvision download the dataset")
EpochsOpt = typer.Option(None, help="training epochs")
BatchOpt = typer.Option(None, help="batch size")
LrOpt = typer.Option(None, help="initial learning rate (SGD, momentum 0.9)")
WdOpt = typer.Option(None, help="weight decay")
ScheduleOpt = typer.Option(None, help="step (/10 at 50%,75%), multistep:E1,E2, cosine, constant")
TrainSizeOpt = typer.Option(None, help="class-balanced training subset size (seeded)")
TestSizeOpt = typer.Option(None, help="class-balanced test subset size (seeded)")
ValSizeOpt = typer.Option(None, help="validation examples held out of training, used to pick 'best'")
AttackStepsOpt = typer.Option(None, help="PGD steps at training time (paper: 10)")
EvalStepsOpt = typer.Option(None, help="PGD steps of the final robust accuracy (paper: 20)")
SeedOpt = typer.Option(None, help="random seed (model init, data order, attacks)")
DeviceOpt = typer.Option(None, help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
AmpOpt = typer.Option(None, "--amp/--no-amp", help="bf16 autocast")
OverwriteOpt = typer.Option(False, "--overwrite", help="replace an existing run directory")
ResumeOpt = typer.Option(False, "--resume", help="continue an interrupted run from checkpoints/last.pt")
ProgressOpt = typer.Option(True, "--progress/--no-progress", help="show progress bars")


def _fail(err: Exception) -> None:
    """Print a one-line error and exit with status 2."""
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


def _common(profile: str, **values: Any) -> TrainConfig:
    """The profile's config with every explicitly given option applied."""
    return make_config(profile, **values)


def _print_summary(summary: dict[str, Any]) -> None:
    typer.echo(f"{summary['method']}: natural {summary['natural_acc']:.2f}%  "
               f"PGD-{summary['attack']['steps']} {summary['robust_acc']:.2f}%  NRR {summary['nrr']:.2f}  "
               f"({summary['seconds']:.0f} s)")


@app.command()
def train(
    out: Path = typer.Option(..., "--out", help="run directory to write"),
    method: str = typer.Option("at", help="training method (see `layerlab presets` for all)"),
    preset: Optional[str] = typer.Option(None, help="a named hyper-parameter preset (`layerlab presets`)"),
    arg: list[str] = typer.Option([], "--arg", help="method hyper-parameter KEY=VALUE (repeatable)"),
    init: Optional[str] = typer.Option(None, help="start from this checkpoint (e.g. an ST run's best.pt)"),
    update: Optional[str] = typer.Option(None, help="update only these blocks (e.g. 23), freeze the rest"),
    reinit: bool = typer.Option(True, "--reinit/--no-reinit", help="re-initialize the updated blocks"),
    profile: str = ProfileOpt, model: Optional[str] = ModelOpt, width: Optional[float] = WidthOpt,
    dataset: Optional[str] = DatasetOpt, data_dir: Optional[str] = DataDirOpt, download: Optional[bool] = DownloadOpt,
    epochs: Optional[int] = EpochsOpt, batch_size: Optional[int] = BatchOpt, lr: Optional[float] = LrOpt,
    weight_decay: Optional[float] = WdOpt, schedule: Optional[str] = ScheduleOpt,
    train_size: Optional[int] = TrainSizeOpt, test_size: Optional[int] = TestSizeOpt,
    val_size: Optional[int] = ValSizeOpt, attack_steps: Optional[int] = AttackStepsOpt,
    eval_steps: Optional[int] = EvalStepsOpt, seed: Optional[int] = SeedOpt, device: Optional[str] = DeviceOpt,
    amp: Optional[bool] = AmpOpt, overwrite: bool = OverwriteOpt, resume: bool = ResumeOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Train one model with one method and write its run directory."""
    from layerlab import train as trainer
    from layerlab.methods import resolve_method

    try:
        name, method_args, preset_cfg = resolve_method(method, preset, arg)
        cfg = _common(profile, **preset_cfg).replace(
            method=name, method_args=method_args, init=init, update=update, reinit=reinit, model=model,
            width=width, dataset=dataset, data_dir=data_dir, download=download, epochs=epochs,
            batch_size=batch_size, lr=lr, weight_decay=weight_decay, schedule=schedule, train_size=train_size,
            test_size=test_size, val_size=val_size, attack_steps=attack_steps, eval_steps=eval_steps, seed=seed,
            device=device, amp=amp)
        summary = trainer.train(cfg, out, resume=resume, overwrite=overwrite, progress=progress)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        _fail(err)
    _print_summary(summary)


@app.command("freeze-study")
def freeze_study(
    blocks: str = typer.Option("23", help="update specs, comma-separated (23 = update block2+block3), or 'all'"),
    out: Path = typer.Option(Path("runs/freeze-study"), "--out", help="study directory (ST/, AT/, U-*/, study.csv)"),
    base: Optional[str] = typer.Option(None, help="re-use this ST checkpoint instead of training ST"),
    method: str = typer.Option("at", help="adversarial method of the U-spec runs (at or trades)"),
    reinit: bool = typer.Option(True, "--reinit/--no-reinit", help="re-initialize updated blocks (else fine-tune)"),
    sat: bool = typer.Option(True, "--sat/--no-sat", help="also train the full AT baseline from scratch (SAT)"),
    profile: str = ProfileOpt, model: Optional[str] = ModelOpt, width: Optional[float] = WidthOpt,
    dataset: Optional[str] = DatasetOpt, data_dir: Optional[str] = DataDirOpt, download: Optional[bool] = DownloadOpt,
    epochs: Optional[int] = EpochsOpt, batch_size: Optional[int] = BatchOpt, lr: Optional[float] = LrOpt,
    weight_decay: Optional[float] = WdOpt, train_size: Optional[int] = TrainSizeOpt,
    test_size: Optional[int] = TestSizeOpt, attack_steps: Optional[int] = AttackStepsOpt,
    seed: Optional[int] = SeedOpt, device: Optional[str] = DeviceOpt, overwrite: bool = OverwriteOpt,
    progress: bool = ProgressOpt,
) -> None:
    """CURE's layer-wise study: train ST, then adversarially train only the chosen blocks of it.

    Finished runs in the study directory are re-used; interrupted ones are resumed.
    """
    from layerlab.study import run_freeze_study

    try:
        cfg = _common(profile, model=model, width=width, dataset=dataset, data_dir=data_dir, download=download,
                      epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      train_size=train_size, test_size=test_size, attack_steps=attack_steps, seed=seed,
                      device=device)
        rows = run_freeze_study(cfg, blocks, out, base=base, method=method, reinit=reinit, sat=sat,
                                overwrite=overwrite, progress=progress)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        _fail(err)
    typer.echo(f"{'run':<12}{'natural':>9}{'PGD-20':>9}{'NRR':>8}{'trainable':>12}{'seconds':>9}")
    for r in rows:
        typer.echo(f"{r['run']:<12}{r['natural_acc']:>9.2f}{r['robust_acc']:>9.2f}{r['nrr']:>8.2f}"
                   f"{r['trainable_params']:>12,}{r['seconds']:>9.0f}")
    typer.echo(f"wrote {out / 'study.csv'}")


@app.command("eval")
def eval_cmd(
    run: Path = typer.Option(..., "--run", help="run directory"),
    attacks: str = typer.Option("natural,fgsm,pgd20", help="comma-separated attacks"),
    checkpoint: str = typer.Option("best", help="best or last"),
    n: Optional[int] = typer.Option(None, help="evaluate on the first N test examples"),
    batch_size: int = typer.Option(256, help="evaluation batch size"),
    seed: int = typer.Option(0, help="attack seed"),
    device: str = typer.Option("auto", help="auto, cpu, cuda"),
    data_dir: Optional[str] = DataDirOpt,
) -> None:
    """Evaluate a run's model under attacks; writes RUN/eval.json."""
    from layerlab.evaluation import evaluate_run

    try:
        report = evaluate_run(run, [a.strip() for a in attacks.split(",") if a.strip()], checkpoint=checkpoint,
                              n=n, batch_size=batch_size, seed=seed, device=device, data_dir=data_dir)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(err)
    for name, res in report["results"].items():
        typer.echo(f"{name:<12}{res['accuracy']:>8.2f}%")
    typer.echo(f"wrote {run / 'eval.json'} (n={report['n']})")


@app.command()
def presets() -> None:
    """List training methods and hyper-parameter presets."""
    from layerlab.methods import METHODS, PRESETS

    typer.echo("methods:")
    for name, (_, doc) in METHODS.items():
        typer.echo(f"  {name:<14}{doc}")
    typer.echo("presets:")
    for name, (method, args, overrides, doc) in PRESETS.items():
        typer.echo(f"  {name:<26}{method:<10}{doc}; {args}{'; ' + str(overrides) if overrides else ''}")


def main() -> None:
    """Console-script entry point."""
    app(prog_name="layerlab")


if __name__ == "__main__":
    sys.exit(main())
