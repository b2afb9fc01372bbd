"""Run records: a run directory's small result files, kept (in git) where checkpoints cannot be.

A long gallery is made over several sessions whose run roots may not survive. :func:`export_records` copies
each finished run's tidy files (``config.json``, ``summary.json``, ``metrics.jsonl``, ``layer_stats.jsonl``,
``eval.json``, ``cka.json``, CSVs; never checkpoints) to a records directory; :func:`restore_records` lays
them back into an empty run root, marked with ``record.json``, so that :mod:`layerlab.gallery` re-uses the
run and every analysis already computed on it instead of retraining. When a later step needs the weights
(an analysis not computed yet, or a run that starts from this one), :func:`materialize` retrains the run
from its own config and checks that it reproduces the recorded summary; recorded analyses are kept only
when it does.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

from layerlab import runs
from layerlab.config import TrainConfig
from layerlab.train import train

MARKER = "record.json"  # in a restored run directory: it holds results, not checkpoints
ASIDE = ".record"  # RUN.record/: where a record waits while its run is retrained
ANALYSIS = "analysis"  # the run root's folder of multi-run results (minimum perturbation, attributions)
COPIED_SUFFIXES = (".json", ".jsonl", ".csv")
MAX_COPY_BYTES = 2_000_000  # larger result files stay in the run directory
TRAINING_FILES = ("config.json", "summary.json", "metrics.jsonl", "layer_stats.jsonl")
COMPARED = ("natural_acc", "robust_acc", "best_epoch")  # what a retrained run must reproduce


ROOT_TOKEN = "RUN_ROOT"  # stands for the run root's absolute path in exported files


def copy_results(run_dir: Path, dest: Path, replace: tuple[str, str] | None = None) -> list[str]:
    """Copy a run's small result files (not checkpoints, not the record marker) to ``dest``; returns the names.
    ``replace=(old, new)`` rewrites every occurrence of ``old`` in the copied text (a run root's path)."""
    copied = []
    for path in sorted(Path(run_dir).iterdir()):
        if (path.is_file() and path.suffix in COPIED_SUFFIXES and path.name != MARKER
                and path.stat().st_size <= MAX_COPY_BYTES):
            dest.mkdir(parents=True, exist_ok=True)
            data = path.read_bytes()
            if replace is not None:
                data = data.replace(replace[0].encode(), replace[1].encode())
            target = dest / path.name
            if not target.exists() or target.read_bytes() != data:
                target.write_bytes(data)
            copied.append(path.name)
    return copied


def is_record(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` was restored from a record and has no checkpoints yet."""
    run_dir = Path(run_dir)
    return (run_dir / MARKER).exists() and not (run_dir / "checkpoints" / "best.pt").exists()


def _finished(run_dir: Path) -> bool:
    """A finished run that no process is training (its lock is free)."""
    return (run_dir / "summary.json").exists() and (run_dir / "config.json").exists() and not runs.is_locked(run_dir)


def export_records(run_root: str | Path, dest: str | Path) -> list[str]:
    """Copy every finished run's result files under ``run_root`` to ``dest/RUN/`` (and ``analysis/``'s to
    ``dest/analysis/``); files already there and unchanged are left alone. Returns the exported run names."""
    run_root, dest = Path(run_root), Path(dest)
    if not run_root.is_dir():
        raise FileNotFoundError(f"run root {run_root} does not exist; pass the --runs directory a study wrote")
    names = []
    for run_dir in sorted(p for p in run_root.iterdir()
                          if p.is_dir() and p.name != ANALYSIS and not p.name.endswith(ASIDE)):
        if _finished(run_dir):
            copy_results(run_dir, dest / run_dir.name, (str(run_root.resolve()), ROOT_TOKEN))
            names.append(run_dir.name)
    if (run_root / ANALYSIS).is_dir():
        copy_results(run_root / ANALYSIS, dest / ANALYSIS, (str(run_root.resolve()), ROOT_TOKEN))
    return names


def restore_records(src: str | Path, run_root: str | Path) -> list[str]:
    """Lay the records in ``src`` into ``run_root`` where the run is absent (a run directory that exists,
    finished or interrupted, is never touched). Returns the restored run names."""
    src, run_root = Path(src), Path(run_root)
    if not src.is_dir():
        return []
    restored = []
    for rec in sorted(p for p in src.iterdir() if p.is_dir()):
        target = run_root / rec.name
        if rec.name == ANALYSIS:
            if not target.exists():
                copy_results(rec, target, (ROOT_TOKEN, str(run_root.resolve())))
            continue
        if not all((rec / name).exists() for name in ("config.json", "summary.json")) or target.exists():
            continue
        copy_results(rec, target, (ROOT_TOKEN, str(run_root.resolve())))
        runs.write_json(target / MARKER, {"restored_from": str(rec.resolve()),
                                          "restored_at": runs.utc_now()})
        restored.append(rec.name)
    return restored


def _init_run(cfg_init: str | None) -> Path | None:
    """The run directory a config's ``init`` checkpoint belongs to (``RUN/checkpoints/best.pt`` -> ``RUN``)."""
    if not cfg_init:
        return None
    path = Path(cfg_init)
    return path.parent.parent if path.parent.name == "checkpoints" else None


def materialize_init(init: str | None, *, progress: bool = True, log: Callable[[str], None] | None = print) -> None:
    """Make sure the checkpoint a run starts from exists: retrain its run when it is only a record."""
    run = _init_run(init)
    if run is not None and is_record(run):
        materialize(run, progress=progress, log=log)


def materialize(run_dir: str | Path, *, progress: bool = True,
                log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Retrain a record-only run in place from its saved config, so its checkpoints exist again.

    The record is kept aside in ``RUN.record/`` while training (and put back when training fails). Its analysis files are put back only when
    the retrained run reproduces the recorded summary (:data:`COMPARED`); either way the comparison is written
    to ``RUN/reproduced.json`` and returned. A run with checkpoints is returned unchanged (``{}``)."""
    run_dir = Path(run_dir)
    if not is_record(run_dir):
        return {}
    # one process retrains a record (others get RunDirBusyError); the record is checked again under the lock
    with runs.run_lock(run_dir.with_name(run_dir.name + ASIDE)):
        return _materialize(run_dir, progress=progress, log=log) if is_record(run_dir) else {}


def _materialize(run_dir: Path, *, progress: bool, log: Callable[[str], None] | None) -> dict[str, Any]:
    """:func:`materialize` under its lock."""
    cfg = TrainConfig.from_dict(runs.read_json(run_dir / "config.json")["config"])
    materialize_init(cfg.init, progress=progress, log=log)
    aside = run_dir.with_name(run_dir.name + ASIDE)
    if aside.exists():
        shutil.rmtree(aside)
    run_dir.rename(aside)
    if log:
        log(f"{run_dir.name} is a record without checkpoints: retraining it from its config")
    try:
        summary = train(cfg, run_dir, progress=progress)
    except BaseException:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        aside.rename(run_dir)  # nothing recorded is lost
        raise
    recorded = runs.read_json(aside / "summary.json")
    same = all(recorded.get(k) == summary.get(k) for k in COMPARED)
    check = {"identical": same, **{k: {"recorded": recorded.get(k), "retrained": summary.get(k)} for k in COMPARED}}
    if same:
        for path in aside.iterdir():
            if path.is_file() and path.name not in TRAINING_FILES and path.name != MARKER:
                shutil.copy2(path, run_dir / path.name)
    elif log:
        log(f"warning: retrained {run_dir.name} differs from its record ({check}); recorded analyses dropped")
    runs.write_json(run_dir / "reproduced.json", check)
    # the recorded training's wall time counts too (summary.json now holds the retrain's seconds)
    runs.append_jsonl(run_dir / runs.COSTS, {"what": "training (the record retrained from)",
                                             "seconds": recorded.get("seconds", 0.0)})
    shutil.rmtree(aside)
    return check
