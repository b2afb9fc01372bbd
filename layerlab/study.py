"""CURE's layer-wise freeze/update study (Section 3, Fig. 2b; Appendix G, Fig. 11) as one resumable job.

The study directory holds one run directory per model (``ST/``, ``AT/``, ``U-23/``, ...) and
``study.csv``. Finished runs are re-used, interrupted ones resumed, so the job can be
stopped and restarted at any time.

Under torchrun every run is trained by all processes together (rank 0 decides whether a run is
re-used, resumed or trained, and writes the CSV files). With ``gpus`` the independent runs are
instead trained side by side, one subprocess per GPU (``python -m layerlab.study`` trains one run).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from layerlab import distributed, runs
from layerlab.config import TrainConfig
from layerlab.layerwise import parse_specs
from layerlab.methods import METHODS
from layerlab.models import build_model, num_blocks
from layerlab.records import materialize_init
from layerlab.train import splits_for, train

STUDY_COLUMNS = ("run", "spec", "method", "reinit", "natural_acc", "robust_acc", "nrr", "trainable_params",
                 "trainable", "best_epoch", "seconds", "dir")


def method_run_name(method: str) -> str:
    """Directory name of a method's run (``ST``, ``AT``, ``CURE``, ...): the freeze study and the method
    comparison share one run root, so both find the same ST and AT runs."""
    return method.upper()


def spec_run_name(spec: str, reinit: bool) -> str:
    """Directory name of a U-spec run: ``U-23`` (re-initialized) or ``U-23-noreinit`` (fine-tuned)."""
    return f"U-{spec}" + ("" if reinit else "-noreinit")


def _plan(cfg: TrainConfig, run_dir: Path, overwrite: bool) -> tuple[str, Any]:
    """What to do with ``run_dir``: ("reuse", summary), ("resume", None) or ("train", overwrite flag)."""
    config_path = run_dir / "config.json"
    if config_path.exists() and not overwrite:
        diff = cfg.differences(runs.read_json(config_path)["config"])
        if diff:
            raise FileExistsError(f"{run_dir} was trained with other settings ({'; '.join(diff[:3])}); "
                                  f"pass --overwrite or choose another --out")
        if (run_dir / "summary.json").exists():
            return "reuse", runs.read_json(run_dir / "summary.json")
        if (run_dir / "checkpoints" / "last.pt").exists():
            return "resume", None
    return "train", overwrite or config_path.exists()


def run_or_reuse(cfg: TrainConfig, run_dir: Path, *, overwrite: bool, progress: bool, splits=None) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir``, re-use it when finished with the same config, resume it when interrupted
    (under torchrun rank 0 looks at the directory and every rank follows its decision). When another process
    is training ``run_dir`` (two studies sharing a run root), wait for it, then decide."""
    while True:
        distributed.on_main(lambda: runs.wait_unlocked(run_dir))
        action, value = distributed.on_main(lambda: _plan(cfg, run_dir, overwrite))
        if action == "reuse":
            return value
        if not distributed.active():  # the run it starts from may be a record without weights: retrain it
            materialize_init(cfg.init, progress=progress)
        try:
            if action == "resume":
                return train(cfg, run_dir, resume=True, progress=progress, splits=splits)
            return train(cfg, run_dir, overwrite=value, progress=progress, splits=splits)
        except runs.RunDirBusyError:  # another process took the lock between the wait and the plan
            if distributed.active():
                raise
            overwrite = False  # what the other process wrote is not ours to replace


def _row(name: str, spec: str, run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """One line of study.csv."""
    blocks = runs.read_json(run_dir / "config.json").get("blocks", [])
    return {"run": name, "spec": spec, "method": summary["method"], "reinit": summary.get("reinit"),
            "natural_acc": summary["natural_acc"], "robust_acc": summary["robust_acc"], "nrr": summary["nrr"],
            "trainable_params": sum(b["trainable"] for b in blocks), "trainable": " ".join(summary["trainable"]),
            "best_epoch": summary["best_epoch"], "seconds": summary["seconds"], "dir": str(run_dir)}


StudyRun = tuple[str, str, TrainConfig]  # (run name, spec, config)


def run_freeze_study(cfg: TrainConfig, blocks: str, out: str | Path, *, base: str | None = None,
                     method: str = "at", reinit: bool = True, sat: bool = True, overwrite: bool = False,
                     progress: bool = True, st_epochs: int | None = None,
                     gpus: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Train (or re-use) ST (``st_epochs``, default ``cfg.epochs``), optionally full AT, and one run per
    update spec; write ``study.csv``. ``gpus`` (e.g. ``[0, 1]``) trains ST first, then the independent
    AT and U-spec runs in parallel subprocesses, one per listed GPU (:func:`study_on_gpus`)."""
    out = Path(out)
    with torch.random.fork_rng(devices=[]):  # a throw-away model, only to count blocks: keep the global RNG
        specs = parse_specs(blocks, num_blocks(build_model(cfg.model, width=1 / 64)))
    if base is not None:
        runs.load_checkpoint(base)  # fail now on a bad checkpoint, before any training
    first: list[StudyRun] = []
    if base is None:
        first.append(("ST", "", cfg.replace(method="st", method_args={}, epochs=st_epochs)))
        base = str(out / method_run_name("st") / "checkpoints" / "best.pt")
    adv = cfg.replace(method=method, method_args={})
    rest: list[StudyRun] = [(method_run_name(method), "all", adv)] if sat else []
    rest += [(spec_run_name(spec, reinit), spec, adv.replace(init=str(base), update=spec, reinit=reinit))
             for spec in specs]
    if gpus:
        return study_on_gpus([first, rest], out, gpus, overwrite=overwrite)
    splits = splits_for(cfg)
    common = dict(overwrite=overwrite, progress=progress, splits=splits)
    rows = [_row(name, spec, out / name, run_or_reuse(run_cfg, out / name, **common))
            for name, spec, run_cfg in first + rest]
    distributed.on_main(lambda: write_study_csv(out / "study.csv", rows))
    return rows


def _run_command(cfg: TrainConfig, run_dir: Path, overwrite: bool) -> list[str]:
    """The command line of a subprocess that trains (or re-uses, or resumes) one run: see :func:`main`."""
    return ([sys.executable, "-m", "layerlab.study", "--config", json.dumps(cfg.to_dict()), "--out", str(run_dir)]
            + (["--overwrite"] if overwrite else []))


def study_on_gpus(stages: Sequence[Sequence[StudyRun]], out: Path, gpus: Sequence[int], *,
                  overwrite: bool = False) -> list[dict[str, Any]]:
    """Train each stage's runs side by side, one subprocess per GPU (``CUDA_VISIBLE_DEVICES``), a stage
    after the previous one finished (the U-spec runs start from ST); output goes to ``out/logs/RUN.log``.

    Runs are re-used or resumed as in the sequential study; when some fail, the others still finish, the
    finished ones enter ``study.csv`` and the error names the failed runs' logs.
    """
    distributed.check_gpus(gpus)
    devices = {run_cfg.device for stage in stages for _, _, run_cfg in stage}
    if not devices <= {"auto", "cuda"}:
        raise ValueError(f"--gpus gives every run its own GPU; leave --device at auto (got {sorted(devices)})")
    rows: list[dict[str, Any]] = []
    for stage in stages:
        jobs = [distributed.Job(name, _run_command(run_cfg, out / name, overwrite), out / "logs" / f"{name}.log")
                for name, _, run_cfg in stage]
        codes = distributed.run_on_devices(jobs, [str(g) for g in gpus])
        rows += [_row(name, spec, out / name, runs.read_json(out / name / "summary.json"))
                 for name, spec, _ in stage if codes[name] == 0]
        failed = [job for job in jobs if codes[job.name] != 0]
        if failed:
            if rows:
                write_study_csv(out / "study.csv", rows)
            raise RuntimeError("training failed for " + ", ".join(f"{j.name} (log: {j.log})" for j in failed))
    write_study_csv(out / "study.csv", rows)
    return rows


def write_study_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Merge ``rows`` into ``study.csv`` (rows of other runs already there are kept)."""
    kept: dict[str, dict[str, Any]] = {}
    if path.exists():
        with open(path, newline="") as fh:
            kept = {r["run"]: r for r in csv.DictReader(fh)}
    kept.update({r["run"]: r for r in rows})
    _write_csv(path, list(kept.values()), STUDY_COLUMNS)


# Methods that start from the naturally trained model (CURE Algorithm 1 starts from ST).
NEEDS_ST_INIT = ("cure",)
COMPARE_COLUMNS = ("run", "method", "natural_acc", "robust_acc", "nrr", "best_natural_acc", "best_robust_acc",
                   "seconds_per_epoch", "median_seconds_per_epoch", "epochs", "dir")


def median_epoch_seconds(run_dir: Path) -> float:
    """The median training time of the run's epochs (``metrics.jsonl``): the typical epoch, unmoved by one
    epoch that shared the machine with other work."""
    return float(statistics.median(r["seconds"] for r in runs.read_jsonl(run_dir / "metrics.jsonl")))


def run_method_comparison(cfg: TrainConfig, methods: list[str], out: str | Path, *, overwrite: bool = False,
                          progress: bool = True, st_epochs: int | None = None) -> list[dict[str, Any]]:
    """Train (or re-use) one run per method under the same config; CURE starts from the ST run.

    Writes ``compare.csv`` (natural / PGD accuracy, NRR, wall time per epoch) into ``out``.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    out = Path(out)
    splits = splits_for(cfg)
    common = dict(overwrite=overwrite, progress=progress, splits=splits)
    order = (["st"] if any(m in NEEDS_ST_INIT for m in methods) and "st" not in methods else []) + list(methods)
    rows = []
    for name in sorted(order, key=lambda m: m != "st"):
        init = str(out / method_run_name("st") / "checkpoints" / "best.pt") if name in NEEDS_ST_INIT else None
        epochs = st_epochs if name == "st" else None
        run_dir = out / method_run_name(name)
        summary = run_or_reuse(cfg.replace(method=name, method_args={}, init=init, epochs=epochs), run_dir, **common)
        if name in methods:
            rows.append({"run": run_dir.name, "method": name, "natural_acc": summary["natural_acc"],
                         "robust_acc": summary["robust_acc"], "nrr": summary["nrr"],
                         "best_natural_acc": summary["best"]["natural_acc"],
                         "best_robust_acc": summary["best"]["robust_acc"],
                         "seconds_per_epoch": summary["train_seconds_per_epoch"],
                         "median_seconds_per_epoch": median_epoch_seconds(run_dir), "epochs": summary["epochs"],
                         "dir": str(run_dir)})
    distributed.on_main(lambda: _write_csv(out / "compare.csv", rows, COMPARE_COLUMNS))
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    """Atomically write ``rows`` as CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m layerlab.study --config JSON --out DIR [--overwrite]``: train, re-use or resume one run
    (what every ``freeze-study --gpus`` subprocess runs)."""
    parser = argparse.ArgumentParser(prog="python -m layerlab.study", description=main.__doc__)
    parser.add_argument("--config", required=True, help="the run's TrainConfig as a JSON object")
    parser.add_argument("--out", required=True, type=Path, help="the run directory")
    parser.add_argument("--overwrite", action="store_true", help="replace a run trained with other settings")
    args = parser.parse_args(argv)
    summary = run_or_reuse(TrainConfig.from_dict(json.loads(args.config)), args.out, overwrite=args.overwrite,
                           progress=False)
    print(f"{args.out.name}: natural {summary['natural_acc']:.2f}%  robust {summary['robust_acc']:.2f}%")


if __name__ == "__main__":
    main()
