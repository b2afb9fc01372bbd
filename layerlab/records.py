"""Run records: a run directory's small result files, kept (in git) where checkpoints cannot be.

A long gallery is made over several sessions whose run roots may not survive. :func:`export_records` copies
each finished run's tidy files (``config.json``, ``summary.json``, ``metrics.jsonl``, ``layer_stats.jsonl``,
``eval.json``, ``cka.json``, CSVs, the multi-run analyses' ``.npz`` arrays; never checkpoints) to a records
directory; :func:`restore_records` lays them back into an empty run root, marked with ``record.json``, so that
:mod:`layerlab.gallery` re-uses the run and every analysis already computed on it instead of retraining. When a
later step needs the weights (an analysis not computed yet, or a run that starts from this one),
:func:`materialize` retrains the run from its own config and checks that it reproduces the recorded summary;
recorded analyses are kept only when it does. Inside :func:`records_only` nothing is retrained: what the
records lack is an error.

A records directory is the store the figures are drawn from: :func:`record_hash` is the content hash a figure
group's manifest keeps of each record file it read, so a record re-made later is told apart.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from layerlab import runs
from layerlab.config import TrainConfig
from layerlab.train import train

MARKER = "record.json"  # in a restored run directory: it holds results, not checkpoints
ASIDE = ".record"  # RUN.record/: where a record waits while its run is retrained
ANALYSIS = "analysis"  # the run root's folder of multi-run results (minimum perturbation, attributions)
TEXT_SUFFIXES = (".json", ".jsonl", ".csv")  # their run-root paths are rewritten (ROOT_TOKEN)
COPIED_SUFFIXES = (*TEXT_SUFFIXES, ".npz")  # .npz: the arrays the minimum-perturbation and attribution figures draw
MAX_COPY_BYTES = 2_000_000  # larger result files stay in the run directory
TRAINING_FILES = ("config.json", "summary.json", "metrics.jsonl", "layer_stats.jsonl")
COMPARED = runs.IDENTITY  # what a retrained run must reproduce


ROOT_TOKEN = "RUN_ROOT"  # stands for the run root's absolute path in exported files
_RETRAINING = contextvars.ContextVar("retraining", default=True)  # False inside records_only()


class NotRecorded(RuntimeError):
    """Drawing from records alone needs a result (or a run) the records do not hold."""


@contextlib.contextmanager
def records_only() -> Iterator[None]:
    """Within this block nothing is trained: :func:`materialize` and :func:`require_training` raise
    :class:`NotRecorded` instead (drawing figures from a records directory alone)."""
    token = _RETRAINING.set(False)
    try:
        yield
    finally:
        _RETRAINING.reset(token)


def require_training(what: str) -> None:
    """Raise :class:`NotRecorded` for ``what`` (a run to train) inside :func:`records_only`."""
    if not _RETRAINING.get():
        raise NotRecorded(f"{what} is not in the records, and drawing from records trains nothing; "
                          f"re-make the figure group with training (layerlab reproduce --records ...)")


def is_result_file(path: Path) -> bool:
    """Whether ``path`` is a result file records keep (small JSON/JSONL/CSV/NPZ, not the record marker)."""
    return (path.is_file() and path.suffix in COPIED_SUFFIXES and path.name != MARKER
            and path.stat().st_size <= MAX_COPY_BYTES)


def record_bytes(path: Path, replace: tuple[str, str] | None = None) -> bytes:
    """A result file's bytes as a record holds them: ``replace=(old, new)`` rewrites every occurrence of ``old``
    in a text file (a run root's path and :data:`ROOT_TOKEN`, one way or the other)."""
    data = Path(path).read_bytes()
    if replace is None or Path(path).suffix not in TEXT_SUFFIXES:
        return data
    return data.replace(replace[0].encode(), replace[1].encode())


def record_hash(data: bytes) -> str:
    """The content hash of a record file's bytes (sha256, hex)."""
    return hashlib.sha256(data).hexdigest()


def copy_results(run_dir: Path, dest: Path, replace: tuple[str, str] | None = None) -> list[str]:
    """Copy a run's small result files (not checkpoints, not the record marker) to ``dest``; returns the names.
    ``replace=(old, new)`` rewrites every occurrence of ``old`` in the copied text (a run root's path)."""
    copied = []
    for path in sorted(Path(run_dir).iterdir()):
        if is_result_file(path):
            dest.mkdir(parents=True, exist_ok=True)
            data = record_bytes(path, replace)
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


def restore_records(src: str | Path, run_root: str | Path, names: Iterable[str] | None = None,
                    log: Callable[[str], None] | None = print) -> list[str]:
    """Lay the records in ``src`` (only the runs ``names``, when given) into ``run_root`` where the run is absent
    (a run directory that exists, finished or interrupted, is never touched). A record that started from an
    earlier training of a run than the one in ``run_root`` (:func:`layerlab.runs.init_changed`) is left out,
    and said; so is a record that does not say which training it started from, unless the run it started from
    is restored with it. Returns the restored run names."""
    src, run_root = Path(src), Path(run_root)
    if not src.is_dir():
        return []
    wanted = None if names is None else set(names)
    restored = []
    recs = [p for p in src.iterdir() if p.is_dir() and (wanted is None or p.name in wanted)]
    # runs that start from no other first, so the run a record started from is in place when it is checked
    for rec in sorted(recs, key=lambda p: (_init_name(p) is not None, p.name)):
        target = run_root / rec.name
        if rec.name == ANALYSIS:
            if not target.exists():
                copy_results(rec, target, (ROOT_TOKEN, str(run_root.resolve())))
            continue
        if not all((rec / name).exists() for name in ("config.json", "summary.json")) or target.exists():
            continue
        init = _init_name(rec)
        if init is not None and runs.init_changed(rec, run_root / init / "checkpoints" / "best.pt"):
            if log:
                log(f"not restoring {rec.name}: it started from an earlier training of {init} than the one in "
                    f"{run_root}")
            continue
        if (init is not None and "init_identity" not in runs.read_json(rec / "config.json")
                and (run_root / init).exists() and init not in restored):
            # it does not say which training of its init it started from: only beside the one restored with it
            if log:
                log(f"not restoring {rec.name}: it does not record which training of {init} it started from, and "
                    f"{run_root} holds a {init} of its own")
            continue
        copy_results(rec, target, (ROOT_TOKEN, str(run_root.resolve())))
        runs.write_json(target / MARKER, {"restored_from": str(rec.resolve()),
                                          "restored_at": runs.utc_now()})
        restored.append(rec.name)
    return restored


def _init_name(rec: Path) -> str | None:
    """The name of the run a record (or run directory) started from, if it started from one."""
    path = rec / "config.json"
    run = runs.init_run_dir(runs.read_json(path)["config"].get("init")) if path.is_file() else None
    return None if run is None else run.name


def materialize_init(init: str | None, *, progress: bool = True, log: Callable[[str], None] | None = print) -> None:
    """Make sure the checkpoint a run starts from exists: retrain its run when it is only a record."""
    run = runs.init_run_dir(init)
    if run is not None and is_record(run):
        materialize(run, progress=progress, log=log)


def materialize(run_dir: str | Path, *, progress: bool = True,
                log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Retrain a record-only run in place from its saved config, so its checkpoints exist again.

    The record is kept aside in ``RUN.record/`` while training (and put back when training fails). Its analysis files are put back only when
    the retrained run reproduces the recorded summary (:data:`COMPARED`); either way the comparison is written
    to ``RUN/reproduced.json`` and returned. A run with checkpoints is returned unchanged (``{}``). A run
    directory reached through a symbolic link is retrained where it really is."""
    run_dir = Path(run_dir).resolve()
    if not is_record(run_dir):
        return {}
    require_training(f"a result of {run_dir.name} (computing it needs the run's weights)")
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
