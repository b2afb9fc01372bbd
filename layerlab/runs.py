"""Run directories and checkpoints: the single place files of a run are written and read.

A run directory holds ``config.json``, ``metrics.jsonl``, ``summary.json`` and
``checkpoints/{last,best}.pt``. Checkpoints are plain dicts of tensors and JSON-able metadata,
loadable with ``torch.load(..., weights_only=True)``, and written atomically.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy
import torch
from torch import nn

import layerlab
from layerlab.config import dumps

CHECKPOINT_KEYS = ("model", "meta")
# what tells two trainings of one config apart (a retrained run must reproduce them; see run_identity)
IDENTITY = ("natural_acc", "robust_acc", "best_epoch")
COSTS = "costs.jsonl"  # one line per analysis computed on a run (or a multi-run analysis directory)


class RunDirExistsError(FileExistsError):
    """A run directory already holds results and neither --resume nor --overwrite was given."""


class CheckpointError(ValueError):
    """A file that is not a usable layerlab checkpoint."""


class RunDirBusyError(RuntimeError):
    """Another process is training the same run directory."""


@contextlib.contextmanager
def run_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on run directory ``out`` while training it, so that two processes never
    write one run. The lock file sits beside the directory (``.NAME.lock``) so that ``--overwrite``
    cannot delete it; the holder removes it when done, and the OS releases the lock when the process ends,
    however it ends."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock_path(path)
    while True:
        fh = open(lock, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise RunDirBusyError(f"run directory {path} is being trained by {holder}; wait for it to finish "
                                  f"or choose another --out") from None
        if _same_file(fh, lock):
            break
        fh.close()  # the previous holder removed this file after we opened it: lock the current one
    with fh:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)  # while still holding it: a waiting process then re-opens a new file
            fcntl.flock(fh, fcntl.LOCK_UN)


def _same_file(fh: Any, path: Path) -> bool:
    """Whether the open file ``fh`` is still the file at ``path`` (not removed or replaced)."""
    try:
        return os.path.samestat(os.fstat(fh.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def _lock_path(out: str | os.PathLike, what: str = "") -> Path:
    """The lock file of run directory ``out`` (or of analysis ``what`` on it), beside the directory so that
    ``--overwrite`` or a record set aside cannot delete or move it. A run directory reached through a symbolic
    link (a run root of links to another's runs) is locked where it really is, so both roots see one lock."""
    path = Path(out).resolve()
    return path.parent / f".{path.name}{'.' + what if what else ''}.lock"


@contextlib.contextmanager
def analysis_lock(directory: str | os.PathLike, what: str,
                  log: Callable[[str], None] | None = print) -> Iterator[None]:
    """Hold analysis ``what`` of ``directory`` (a run or the run root's ``analysis/``) while checking for and
    computing its result, so that a second process waits for the first one's result instead of computing it
    again. Blocks while another process holds it; the OS releases it when the process ends."""
    path = _lock_path(directory, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        _lock_waiting(fh, log and (lambda: log(f"waiting for another process to finish the {what} analysis of "
                                               f"{directory}")))
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _lock_waiting(fh: Any, on_wait: Callable[[], None] | None) -> bool:
    """Take ``fh``'s exclusive lock, calling ``on_wait`` first when another process holds it (then blocking until
    it is released); True when it had to wait."""
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        if on_wait:
            on_wait()
        fcntl.flock(fh, fcntl.LOCK_EX)
        return True


def is_locked(out: str | os.PathLike) -> bool:
    """Whether a process holds ``out``'s run lock right now (it is being trained)."""
    try:
        fh = open(_lock_path(out))  # read-only: never re-create a lock file its holder removed
    except FileNotFoundError:
        return False
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def wait_unlocked(out: str | os.PathLike, log: Callable[[str], None] | None = print) -> bool:
    """Block while another process holds ``out``'s run lock (see :func:`run_lock`); True when it had to wait."""
    try:
        fh = open(_lock_path(out))  # read-only: never re-create a lock file its holder removed
    except FileNotFoundError:
        return False
    with fh:
        def on_wait() -> None:
            fh.seek(0)
            if log:
                log(f"waiting for {fh.read().strip() or 'another process'} to finish training {out}")

        waited = _lock_waiting(fh, on_wait)  # blocks until the holder releases it (or dies)
        fcntl.flock(fh, fcntl.LOCK_UN)
    return waited


def prepare_run_dir(out: str | os.PathLike, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Create ``out`` for a new run; refuse to touch an existing run unless told to resume or overwrite."""
    path = Path(out)
    # Only files count: a run that failed before writing anything (e.g. data not found) leaves empty dirs.
    if path.exists() and any(p.is_file() for p in path.rglob("*")) and not resume:
        if not overwrite:
            raise RunDirExistsError(
                f"run directory {path} already exists; pass --resume to continue it, "
                f"--overwrite to replace it, or choose another --out"
            )
        shutil.rmtree(path)
    if resume and not (path / "checkpoints" / "last.pt").exists():
        raise CheckpointError(f"cannot resume: {path / 'checkpoints' / 'last.pt'} does not exist")
    (path / "checkpoints").mkdir(parents=True, exist_ok=True)
    return path


def _atomic(path: Path, write: Any) -> None:
    """Write through a temporary file in the same directory, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # ``write`` creates the file itself, so it gets the umask's permissions (mkstemp would make it 0600).
    tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as readable JSON."""
    _atomic(Path(path), lambda tmp: Path(tmp).write_text(dumps(obj) + "\n"))


def dumps_line(obj: dict[str, Any]) -> str:
    """One JSON object as one line of a JSON-lines file."""
    return json.dumps(obj, sort_keys=True, default=str) + "\n"


def append_jsonl(path: str | os.PathLike, obj: dict[str, Any]) -> None:
    """Append one JSON object as a line."""
    with open(path, "a") as fh:
        fh.write(dumps_line(obj))


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All objects of a JSON-lines file (empty list when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextlib.contextmanager
def costed(directory: str | os.PathLike, what: str) -> Iterator[None]:
    """Time the block and, when it succeeds, append ``{what, seconds, cpu_seconds, finished, threads}`` to
    ``directory/costs.jsonl`` (``seconds``: wall time; ``cpu_seconds``: this process's CPU time, all threads),
    what each analysis cost, kept next to its result."""
    start, cpu_start = time.perf_counter(), time.process_time()
    yield
    Path(directory).mkdir(parents=True, exist_ok=True)
    append_jsonl(Path(directory) / COSTS, {"what": what, "seconds": round(time.perf_counter() - start, 2),
                                           "cpu_seconds": round(time.process_time() - cpu_start, 2),
                                           "finished": utc_now(), "threads": torch.get_num_threads()})


def analysis_costs(directory: str | os.PathLike) -> dict[str, float]:
    """Wall seconds spent per analysis kind in ``directory`` (summed over its ``costs.jsonl`` entries)."""
    out: dict[str, float] = {}
    for row in read_jsonl(Path(directory) / COSTS):
        out[row["what"]] = out.get(row["what"], 0.0) + float(row["seconds"])
    return out


def utc_now() -> str:
    """The current UTC time as an ISO-8601 string to the second (when a record was written)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any], **extra: Any) -> None:
    """Atomically save the model's state_dict, JSON-able ``meta`` and any ``extra`` tensor dicts."""
    json.dumps(meta)  # fail early on metadata that is not JSON-able
    state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": meta, **extra}
    _atomic(Path(path), lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint safely (weights_only) and check it is one of ours."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "best.pt"
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, pickle, not a torch file...
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}); "
                              f"point to checkpoints/last.pt or best.pt of a layerlab run") from None
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS):
        raise CheckpointError(f"{path} is not a layerlab checkpoint (needs keys {list(CHECKPOINT_KEYS)}); "
                              f"point to checkpoints/last.pt or best.pt of a layerlab run")
    return state


def load_weights(model: nn.Module, state: dict[str, Any], source: str = "checkpoint") -> None:
    """Load ``state['model']`` into ``model`` with a clear message when the architectures differ."""
    meta = state.get("meta", {})
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise CheckpointError(
            f"{source} holds a {meta.get('model', '?')} (width {meta.get('width', '?')}, "
            f"{meta.get('num_classes', '?')} classes) that does not fit the requested "
            f"{getattr(model, 'arch', type(model).__name__)} (width {getattr(model, 'width', '?')}, "
            f"{getattr(model, 'num_classes', '?')} classes); pass matching --model/--width/--dataset"
        ) from None


def environment() -> dict[str, Any]:
    """Git commit, package versions and machine: enough to say what produced a run. ``git_dirty`` says whether
    the layerlab package itself has uncommitted changes (not the results, figures or notes beside it)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
                                    capture_output=True, text=True, cwd=Path(__file__).parent,
                                    timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    import torchvision  # heavy to import; only its version is needed here

    return {
        "git_commit": commit, "git_dirty": dirty, "layerlab": getattr(layerlab, "__version__", None),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": numpy.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file."""
    return json.loads(Path(path).read_text())


def run_identity(run_dir: str | os.PathLike) -> str | None:
    """A short fingerprint of a finished run's outcome (its summary's :data:`IDENTITY` fields with its seed, method
    and epochs), or None when ``run_dir`` holds no finished run. Independent of where the run root is, so a run
    that records another run's fingerprint (``init_identity``: the run it started from) can tell when that run
    was trained again with a different outcome."""
    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").is_file() or not (run_dir / "config.json").is_file():
        return None
    summary, cfg = read_json(run_dir / "summary.json"), read_json(run_dir / "config.json")["config"]
    key = {**{k: summary.get(k) for k in IDENTITY}, **{k: cfg.get(k) for k in ("seed", "method", "epochs")}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def init_run_dir(init: str | os.PathLike | None) -> Path | None:
    """The run directory an ``init`` checkpoint belongs to (``RUN/checkpoints/best.pt`` -> ``RUN``), if any."""
    if not init:
        return None
    path = Path(init)
    return path.parent.parent if path.parent.name == "checkpoints" else None


def init_identity(init: str | os.PathLike | None) -> str | None:
    """:func:`run_identity` of the run an ``init`` checkpoint belongs to (None: not a finished run's)."""
    run = init_run_dir(init)
    return None if run is None else run_identity(run)


def init_changed(run_dir: str | os.PathLike, init: str | os.PathLike | None = None) -> bool:
    """Whether the run it started from has been trained again, with another outcome, since ``run_dir`` was
    trained: ``run_dir`` recorded that run's fingerprint (``init_identity``) and ``init`` (default: the
    checkpoint its config names) now belongs to a finished run with another one."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return False
    saved = read_json(path)
    recorded = saved.get("init_identity")
    current = init_identity(init if init is not None else saved["config"].get("init"))
    return bool(recorded) and current is not None and current != recorded
