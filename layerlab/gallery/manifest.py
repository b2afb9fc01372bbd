"""The gallery's provenance and entry points: a manifest per figure group and the README assembled from them.

:func:`make` runs one figure group (:data:`layerlab.gallery.figures.DRAW`) and writes ``GROUP/manifest.json``
(the command that re-makes the group, profile, data, seeds, the runs it read with their results and training
times, this call's wall time, the git commit, how the setting differs from the paper's). Its ``reads`` name
every result file the group's figures and numbers were drawn from, as the file in the records directory
(:mod:`layerlab.records`, e.g. ``results/runs-cpu``) relative to the figures directory's parent, with its
content hash; a group folder holds its figures, its own derived tables and the manifest, never copies of run
files. :func:`verify` checks every manifest's hashes against the records, :func:`redraw` draws a group again
from the records alone, :func:`reproduce` makes every group in order, and :func:`write_readme` turns the
manifests into ``README.md``, with the papers' published numbers (:mod:`layerlab.gallery.reference`) beside ours.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pandas as pd
import torch

from layerlab import claims, runs
from layerlab.gallery.figures import DRAW
from layerlab.gallery.reference import comparison_table, markdown_table
from layerlab.gallery.settings import (
    FIGURES_DIR,
    GROUPS,
    RUN_ROOT,
    Context,
    FigureGroup,
    PathMap,
    base_config,
    context,
    group_of,
    settings,
)
from layerlab.progress import bar as progress_bar
from layerlab.records import (
    COPIED_SUFFIXES,
    MARKER,
    ROOT_TOKEN,
    export_records,
    record_bytes,
    record_hash,
    records_only,
    restore_records,
)
from layerlab.train import epoch_seconds, epoch_wall

MANIFEST = "manifest.json"
MAX_TABLE_ROWS = 40  # longer CSV tables are linked, not shown
STALL_FACTOR = 3.0  # an epoch this many times its run's median epoch stalled (see stalled_epochs)
# Figure settings that differ between the profiles and are worth naming next to a figure.
COMPARED_CONFIG = ("model", "width", "dataset", "train_size", "val_size", "test_size", "eval_size", "eval_every",
                   "epochs", "batch_size", "lr", "weight_decay", "attack_steps", "eval_steps", "seed", "amp")


def make(key: str, profile: str = "tiny", run_root: str | Path = RUN_ROOT, figures_dir: str | Path = FIGURES_DIR,
         data_dir: str | None = None, *, progress: bool | None = None, records: str | Path | None = None) -> PathMap:
    """Make figure group ``key`` (a :data:`GROUPS` key): train or re-use its runs, draw its figures into
    ``figures_dir/NN_key/``, write its manifest; returns ``{name: path}``. What a notebook calls.

    With ``records`` (a records directory) the run root's finished runs are exported there first and the
    manifest names the records' files; without, it names the run root's (``RUN_ROOT/RUN/FILE``)."""
    group = group_of(key)
    ctx = context(profile, run_root, figures_dir, data_dir, progress)
    with reading(ctx.root) as read:
        paths = DRAW[group.key](ctx)
    drop_leftover_figures(ctx.group_dir(group), paths)
    if records is not None:
        export_records(ctx.root, records)
    write_manifest(ctx, group, paths, read, records)
    return paths


def drop_leftover_figures(group_dir: Path, paths: PathMap) -> list[str]:
    """Delete the PNGs in ``group_dir`` that this drawing of the group did not write (figures an earlier
    definition of the group drew under other names), so the folder shows only what its manifest describes."""
    drawn = {Path(p).resolve() for p in paths.values()}
    dropped = sorted(p.name for p in Path(group_dir).glob("*.png") if p.resolve() not in drawn)
    for name in dropped:
        (Path(group_dir) / name).unlink()
    return dropped


def redraw(key: str, figures_dir: str | Path = FIGURES_DIR, data_dir: str | None = None, *,
           progress: bool | None = None) -> PathMap:
    """Draw figure group ``key`` again from the records its manifest names, alone: the runs it read are restored
    into a temporary run root and drawn inside :func:`layerlab.records.records_only` (nothing trains; a result
    the records lack is an error). The group's figures and manifest are rewritten; returns ``{name: path}``.
    A redraw that leaves every file of the group as it was, from the same records, leaves the manifest as it was
    too (it still describes those files): redrawing an up-to-date group changes nothing on disk."""
    group = group_of(key)
    path = Path(figures_dir) / group.folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; make the group first (layerlab reproduce --only {group.key})")
    manifest = runs.read_json(path)
    if not manifest.get("store"):
        raise ValueError(f"{path} names no records directory; re-make the group with --records DIR")
    store = Path(figures_dir).resolve().parent / manifest["store"]
    before = _file_bytes(path.parent)
    with tempfile.TemporaryDirectory(prefix="layerlab-redraw-") as root:
        restore_records(store, root, names={r["run"] for r in manifest["reads"]})
        with records_only():
            paths = make(group.key, manifest["profile"], root, figures_dir, data_dir, progress=progress,
                         records=store)
    after = _file_bytes(path.parent)
    if (runs.read_json(path)["reads"] == manifest["reads"]
            and {k: v for k, v in after.items() if k != MANIFEST} == {k: v for k, v in before.items() if k != MANIFEST}):
        path.write_bytes(before[MANIFEST])
    return paths


def _file_bytes(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (its path relative to it -> its bytes)."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def reproduce(profile: str = "tiny", run_root: str | Path = RUN_ROOT, figures_dir: str | Path = FIGURES_DIR,
              data_dir: str | None = None, *, only: Sequence[str] | None = None, progress: bool | None = None,
              records: str | Path | None = None, log: Callable[[str], None] | None = None) -> dict[str, PathMap]:
    """Every figure group (or ``only`` those named), in notebook order: what ``layerlab reproduce`` runs.

    ``records`` (a directory, e.g. ``results/runs-cpu``) carries a long gallery across machines: runs recorded
    there and missing from the run root are restored before anything trains, every finished run's result
    files are exported there after each group (:mod:`layerlab.records`), and a group whose records a later
    group changed (an analysis added to a run's file) is drawn again at the end, so every manifest's hashes
    match the records."""
    names = list(GROUPS) if not only else list(only)
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        raise ValueError(f"unknown figures {unknown}; choose from {', '.join(GROUPS)}")
    settings(profile)  # fail on a bad profile before any training
    if records is not None:
        restored = restore_records(records, Path(run_root))
        if log and restored:
            log(f"restored {len(restored)} runs from {records}: {', '.join(restored)}")
    done = {}
    # The bar over the figure groups shows unless progress is turned off; the runs' own bars follow the profile.
    groups = progress_bar([(k, g) for k, g in GROUPS.items() if k in names], desc="reproduce", leave=True,
                          progress=progress is not False, unit="group")
    for key, group in groups:
        groups.set_postfix_str(key)
        if log:
            log(f"{key} ({group.notebook}) ...")
        try:
            done[key] = make(key, profile, run_root, figures_dir, data_dir, progress=progress, records=records)
        finally:  # what finished is kept even when a later run fails
            if records is not None:
                export_records(run_root, records)
    if records is not None:
        for key in stale_groups(figures_dir, done):
            if log:
                log(f"{key}: drawn again, a later group changed the records it read")
            done[key] = make(key, profile, run_root, figures_dir, data_dir, progress=progress, records=records)
    write_readme(figures_dir)
    return done


SHOWN = "layerlab"  # the output metadata key under which :func:`show` names the file an output displays


def show(paths: PathMap) -> None:
    """Display a figure group's PNGs, CSV tables (as data frames) and HTML tables in a notebook (prints the paths
    elsewhere). Each file is labelled with its shorter path (relative to the working directory or absolute), and
    its output's metadata name it (``GROUP/FILE``) with the sha256 of the bytes shown, so a committed notebook's
    outputs can be checked against the files."""
    try:  # IPython: only inside a notebook
        from IPython import get_ipython
        from IPython.display import HTML, Image, Markdown, display
    except ImportError:
        get_ipython = None  # noqa: N806
    if get_ipython is None or get_ipython() is None:
        for name, path in paths.items():
            print(f"{name}: {path}")
        return
    for name, path in paths.items():
        path = Path(path)
        display(Markdown(f"**{name}**: `{min(str(path), os.path.relpath(path), key=len)}`"))
        shown = {SHOWN: {"file": f"{path.parent.name}/{path.name}", "sha256": record_hash(path.read_bytes())}}
        if path.suffix == ".png":
            display(Image(filename=str(path)), metadata=shown)
        elif path.suffix == ".csv":
            display(pd.read_csv(path).round(2), metadata=shown)
        elif path.suffix == ".html":
            display(HTML(path.read_text()), metadata=shown)


def describe_data(dataset: str, data_dir: str | None) -> str:
    """What data a figure used, in words (the CIFAR-10 JPEG copy is named as such)."""
    root = data_dir or os.environ.get("LAYERLAB_DATA")
    if dataset == "digits":
        return "digits (built in, scikit-learn's 8x8 digits upscaled; no download)"
    if dataset.startswith("folder:"):
        return f"image folders at {dataset[len('folder:'):]}"
    if root and (Path(root) / dataset / "train").is_dir():
        return f"{dataset.upper().replace('CIFAR', 'CIFAR-')} (JPEG re-encoded copy, image folders under {root})"
    return f"{dataset} (torchvision layout under {root})"


def paper_differences(ctx: Context) -> list[str]:
    """How this call's training config and analysis sizes differ from the ``paper`` profile's."""
    if ctx.profile == "paper":
        return []
    paper_cfg, mine = base_config("paper").to_dict(), ctx.cfg.to_dict()
    out = [f"{k}: {mine[k]} (paper: {paper_cfg[k] if paper_cfg[k] is not None else 'all'})"
           for k in COMPARED_CONFIG if mine[k] != paper_cfg[k]]
    paper_s, my_s = settings("paper"), ctx.s
    for name in ("st_epochs", "eval_n", "cka_n", "corruption_n", "lsc_n", "lsc_panels"):
        a, b = getattr(my_s, name), getattr(paper_s, name)
        if a != b:
            out.append(f"{name}: {a} (paper: {b if b is not None else 'whole test split'})")
    regime = ctx.s.regime
    if regime is not None and any(regime.tag in name for name in ctx.used):
        changes = ", ".join(f"{k} {v}" for k, v in regime.changes.items())
        out.append(f"runs ending in -{regime.tag}: the overfitting regime ({changes}; AT robust-overfits in it)")
    return out


def _run_row(name: str, run_dir: Path, started: float) -> dict[str, Any]:
    """A used run's identity, results and training time (``trained_in_call``: finished during this call)."""
    summary_path = run_dir / "summary.json"
    s = runs.read_json(summary_path)
    cfg = runs.read_json(run_dir / "config.json")["config"]
    return {"run": name, "dir": str(run_dir), "method": s["method"], "update": cfg.get("update"),
            "reinit": cfg.get("reinit"), "init": cfg.get("init"), "method_args": cfg.get("method_args"),
            "seed": cfg.get("seed"), "epochs": s["epochs"], "natural_acc": s["natural_acc"],
            "robust_acc": s["robust_acc"], "nrr": s["nrr"], "best_epoch": s["best_epoch"],
            **_train_seconds(run_dir, s), "trained_in_call": summary_path.stat().st_mtime >= started,
            **_analysis_cost(run_dir)}


def _train_seconds(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """A run's whole training wall time (every process that trained it, with its evaluations), less its stalled
    epochs' excess over the run's median epoch (:func:`stalled_epochs`). A summary without
    ``final_eval_seconds`` has its epochs summed from ``metrics.jsonl``, and its final evaluation is flagged as
    untimed (``final_eval_timed``)."""
    metrics = runs.read_jsonl(run_dir / "metrics.jsonl")
    timed = "final_eval_seconds" in summary
    recorded = summary["seconds"] if timed else epoch_seconds(metrics)
    stalls = stalled_epochs(metrics)
    return {"train_seconds": round(recorded - stall_excess(stalls), 1), "recorded_train_seconds": round(recorded, 1),
            "stalled_epochs": stalls, "final_eval_timed": timed}


def stalled_epochs(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Epochs whose wall time (training and evaluation) is over ``STALL_FACTOR`` times the run's median epoch:
    the process was stopped or starved meanwhile (its wall clock kept running), so the gallery counts each at the
    median instead. A run of fewer than 3 epochs has no reliable median and no stalls."""
    walls = [epoch_wall(r) for r in metrics]
    if len(walls) < 3:
        return []
    median = statistics.median(walls)
    return [{"epoch": r["epoch"], "seconds": round(w, 1), "median_seconds": round(median, 1)}
            for r, w in zip(metrics, walls) if w > STALL_FACTOR * median]


def stall_excess(stalls: list[dict[str, Any]]) -> float:
    """The seconds stalled epochs (:func:`stalled_epochs`) spent beyond their run's median epoch."""
    return sum(e["seconds"] - e["median_seconds"] for e in stalls)


# result file -> the analysis kind its cost is logged under (``runs.costed``)
ANALYSIS_FILES = {"eval.json": "eval", "eval-last.json": "eval", "cka.json": "cka", "corruptions.csv": "corruptions", "lsc.csv": "lsc",
                  "minpert.json": "minpert", "attributions.json": "attributions"}


def _analysis_cost(directory: Path) -> dict[str, Any]:
    """The analysis wall seconds logged in ``directory/costs.jsonl`` and the result files with no logged cost."""
    costs = runs.analysis_costs(directory)
    uncosted = sorted(f for f, kind in ANALYSIS_FILES.items() if (directory / f).exists() and kind not in costs)
    return {"analysis_seconds": round(sum(costs.values()), 1), "analysis_costs": costs, "uncosted": uncosted}


_READING: contextvars.ContextVar[tuple[Path, set[tuple[str, str]]] | None] = contextvars.ContextVar(
    "gallery_reading", default=None)
_HOOKED = False  # the audit hook is added once per process (hooks cannot be removed)


def _opened_for_reading(mode: Any, flags: Any) -> bool:
    if isinstance(mode, str):  # open() / io.open
        return not any(c in mode for c in "wax+")
    return isinstance(flags, int) and not flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT)  # os.open


def _note_read(event: str, args: tuple[Any, ...]) -> None:
    """Audit hook: inside :func:`reading`, note each result file under its run root opened for reading."""
    if event != "open" or (current := _READING.get()) is None:
        return
    try:
        path, mode, flags = args
        if isinstance(path, int) or not _opened_for_reading(mode, flags):
            return
        root, seen = current
        rel = Path(os.fsdecode(path)).resolve().relative_to(root)
        if len(rel.parts) == 2 and rel.suffix in COPIED_SUFFIXES and rel.name not in (MARKER, runs.COSTS):
            seen.add((rel.parts[0], rel.parts[1]))
    except Exception:  # noqa: BLE001 - a path outside the root, or odd arguments: not a result file read
        return


@contextlib.contextmanager
def reading(root: str | Path) -> Iterator[set[tuple[str, str]]]:
    """The result files (``(run, file)``) opened for reading under run root ``root`` while the block runs, in this
    thread: exactly what a figure group was drawn from, however deep in the library the read happened."""
    global _HOOKED
    if not _HOOKED:
        sys.addaudithook(_note_read)
        _HOOKED = True
    seen: set[tuple[str, str]] = set()
    token = _READING.set((Path(root).resolve(), seen))
    try:
        yield seen
    finally:
        _READING.reset(token)


def _read_entries(ctx: Context, read: set[tuple[str, str]], records: str | Path | None) -> list[dict[str, str]]:
    """A manifest's ``reads``: each result file read, as the records directory holds it (its path relative to the
    figures directory's parent) or, with no records, as ``RUN_ROOT/RUN/FILE``, and the record's content hash."""
    entries = []
    for run, name in sorted(read):
        src = ctx.root / run / name
        if not src.is_file():  # read, then replaced by nothing (an interrupted analysis)
            continue
        path = (os.path.relpath(Path(records).resolve() / run / name, ctx.figures.parent) if records is not None
                else f"{ROOT_TOKEN}/{run}/{name}")
        entries.append({"run": run, "file": name, "path": path,
                        "sha256": record_hash(record_bytes(src, (str(ctx.root), ROOT_TOKEN)))})
    return entries


def write_manifest(ctx: Context, group: FigureGroup, paths: PathMap, read: set[tuple[str, str]],
                   records: str | Path | None = None) -> Path:
    """Write ``GROUP/manifest.json`` for one figure call (earlier calls with the same setting are kept in
    ``calls``); ``read`` holds the result files the figures were drawn from (:func:`reading`), to which the
    runs' summaries, configs and costs read here are added."""
    out = ctx.group_dir(group)
    extra_sources = tuple(ctx.sources)
    finished = dt.datetime.now(dt.timezone.utc)
    wall = finished.timestamp() - ctx.started
    with reading(ctx.root) as also:
        used = [_run_row(name, d, ctx.started) for name, d in sorted(ctx.used.items())]
        shared = {str(d): _analysis_cost(d) for d in sorted({s.parent for s in extra_sources if s.is_file()})}
    store = None if records is None else os.path.relpath(Path(records).resolve(), ctx.figures.parent)
    trained = sum(r["train_seconds"] for r in used if r["trained_in_call"])
    key = group.key
    env = runs.environment()
    call = {"finished": finished.isoformat(timespec="seconds"), "wall_seconds": round(wall, 1),
            "training_seconds": round(trained, 1),
            "git_commit": env["git_commit"], "git_dirty": env["git_dirty"], "threads": _threads()}
    path = out / MANIFEST
    old = runs.read_json(path) if path.exists() else {}
    same_setting = old.get("profile") == ctx.profile and old.get("figure_settings") == _jsonable(asdict(ctx.s))
    calls = (old.get("calls", []) if same_setting else []) + [call]  # earlier calls made with this setting
    data_root = ctx.data_dir or os.environ.get("LAYERLAB_DATA")
    manifest = {
        "group": group.folder, "key": key, "notebook": f"notebooks/{group.notebook}",
        "command": (("LAYERLAB_DATA=$LAYERLAB_DATA " if data_root and ctx.cfg.dataset != "digits" else "")
                    + f"layerlab reproduce --profile {ctx.profile} --runs RUN_ROOT --figures {_figures_arg(ctx)} "
                      f"--only {key}" + ("" if store is None else f" --records {store}")),
        "profile": ctx.profile, "data": describe_data(ctx.cfg.dataset, ctx.data_dir),
        "seeds": {"training": ctx.cfg.seed, "evaluation_and_analysis": 0},
        "files": {k: os.path.relpath(v, out) for k, v in paths.items()},
        "store": store,
        "reads": _read_entries(ctx, read | also, records),
        "runs": used, "shared_analyses": shared, "calls": calls, "differences_from_paper": paper_differences(ctx),
        "figure_settings": _jsonable(asdict(ctx.s)), "environment": env,
    }
    make_portable(out, ctx)
    runs.write_json(path, json.loads(portable(json.dumps(manifest), ctx)))
    return path


PORTABLE_SUFFIXES = (".csv", ".json", ".html", ".md")  # a group's text files, rewritten by :func:`make_portable`


def make_portable(group_dir: Path, ctx: Context) -> None:
    """Rewrite the text files a group's figure calls wrote (tables, their data, HTML) through :func:`portable`, so
    none names this machine's run root, data root or figures directory."""
    for path in sorted(Path(group_dir).rglob("*")):
        if path.is_file() and path.suffix in PORTABLE_SUFFIXES and path.name != MANIFEST:
            text = path.read_text()
            if (new := portable(text, ctx)) != text:
                path.write_text(new)


def portable(text: str, ctx: Context) -> str:
    """``text`` without this machine's paths: the run root becomes ``RUN_ROOT``, the data root
    ``$LAYERLAB_DATA`` and the figures directory its path relative to the working directory."""
    data_root = ctx.data_dir or os.environ.get("LAYERLAB_DATA")
    for path, token in ((ctx.root, "RUN_ROOT"), (data_root, "$LAYERLAB_DATA"), (ctx.figures, _figures_arg(ctx))):
        if path:
            text = text.replace(str(Path(path).resolve()), token).replace(str(path), token)
    return text


def _figures_arg(ctx: Context) -> str:
    """The figures directory as the command line gives it: relative to the working directory when inside it."""
    try:
        return str(Path(ctx.figures).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return "FIGURES"


def _threads() -> int:
    return torch.get_num_threads()


def _jsonable(obj: Any) -> Any:
    """Tuples to lists, recursively (JSON)."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------
# Checking the manifests against the records
# --------------------------------------------------------------------------------------


def _group_problems(m: dict[str, Any], base: Path) -> list[str]:
    """What is wrong with one manifest's reads (``base``: the directory its paths are relative to)."""
    group = m["group"]
    if "reads" not in m:
        return [f"{group}: its manifest names no result files it read; re-make the group with --records DIR"]
    if not m.get("store"):
        return [f"{group}: drawn from a run root, not from records; re-make the group with --records DIR"]
    problems = []
    # the cost ledger grows with every analysis of a run: the cost account reads it, no figure does
    for r in (r for r in m["reads"] if Path(r["path"]).name != runs.COSTS):
        path = base / r["path"]
        if not path.is_file():
            problems.append(f"{group}: read {r['path']}, which the records do not hold; re-make the group")
        elif record_hash(path.read_bytes()) != r["sha256"]:
            problems.append(f"{group}: {r['path']} changed since the group was drawn; "
                            f"draw it again (layerlab records redraw --only {m['key']})")
    return problems


def stale_groups(figures: str | Path, keys: Sequence[str]) -> list[str]:
    """The groups among ``keys`` whose manifest's reads no longer match their records."""
    base = Path(figures).resolve().parent
    found = {m["key"]: m for m in read_manifests(Path(figures))}
    return [k for k in keys if k in found and _group_problems(found[k], base)]


def verify(figures: str | Path) -> list[str]:
    """Every problem of the manifests under ``figures`` (empty when none): a result file a group read that its
    records no longer hold or hold with other content (a re-made run), a manifest that names no records, and a
    file under ``figures`` that is a copy of a record file."""
    figures = Path(figures)
    base = figures.resolve().parent
    manifests = read_manifests(figures)
    problems = [p for m in manifests for p in _group_problems(m, base)]
    stores = {base / m["store"] for m in manifests if m.get("store")}
    recorded = {record_hash(p.read_bytes()): p for s in stores if s.is_dir() for p in s.rglob("*") if p.is_file()}
    for path in sorted(figures.rglob("*")):
        if path.is_file() and path.name not in (MANIFEST, "README.md"):
            twin = recorded.get(record_hash(path.read_bytes()))
            if twin is not None:
                problems.append(f"{path.relative_to(figures)} is a copy of {os.path.relpath(twin, base)}; "
                                f"delete it (the manifest names the record)")
    return problems


# --------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def read_manifests(figures: Path) -> list[dict[str, Any]]:
    """Every group's manifest under ``figures``, in group order."""
    return [runs.read_json(p) for p in sorted(Path(figures).glob(f"*/{MANIFEST}"))]


def gallery_wall_time(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """What the gallery cost in wall time: the training time of every distinct run plus the analysis time logged in every
    distinct run or shared-analysis directory (the largest, i.e. latest, value seen), and the result files
    whose cost was never logged. Drawing the figures (the calls' wall time) is listed per group, not here."""
    trained: dict[str, float] = {}
    analysis: dict[str, float] = {}
    uncosted: set[str] = set()
    untimed: dict[str, bool] = {}
    stalls: dict[str, list[dict[str, Any]]] = {}
    for m in manifests:
        entries = [(r["dir"], r) for r in m["runs"]] + list(m.get("shared_analyses", {}).items())
        for r in m["runs"]:
            trained[r["dir"]] = r["train_seconds"]
            untimed[r["dir"]] = not r.get("final_eval_timed", False)
            stalls[r["dir"]] = r.get("stalled_epochs", [])
        for directory, entry in entries:
            if "analysis_seconds" in entry:
                analysis[directory] = max(analysis.get(directory, 0.0), entry["analysis_seconds"])
                uncosted.update(f"{Path(directory).name}/{f}" for f in entry.get("uncosted", []))
    training, analysed = sum(trained.values()), sum(analysis.values())
    return {"runs": len(trained), "training_seconds": training, "analysis_seconds": analysed,
            "total_seconds": training + analysed, "uncosted": sorted(uncosted),
            "final_eval_untimed": sorted(Path(d).name for d, flag in untimed.items() if flag),
            "stalled_epochs": [{"run": Path(d).name, **e} for d, es in sorted(stalls.items()) for e in es]}


def _csv_rows(path: Path, drop: tuple[str, ...] = ("dir",)) -> tuple[list[dict[str, Any]], list[str]]:
    """A table's rows for the README, without the columns ``drop`` (run directories: machine paths)."""
    frame = pd.read_csv(path)
    frame = frame[[c for c in frame.columns if c not in drop]]
    for c in frame.columns:  # integers in a column with blanks (a block spec "12") were read as floats
        col = frame[c]
        if col.dtype.kind == "f" and col.isna().any() and (col.dropna() % 1 == 0).all():
            frame[c] = col.astype("Int64")
    records = [{k: (None if v is pd.NA else v) for k, v in r.items()} for r in frame.to_dict("records")]
    return records, list(frame.columns)


def _drawn_from(m: dict[str, Any]) -> str:
    """The runs a group read, each linked to its folder in the records (paths relative to ``figures/``)."""
    if not m.get("reads"):
        return "no record of the files it read (re-make the group with --records DIR)"
    files: dict[str, list[str]] = {}
    for r in m["reads"]:
        files.setdefault(r["run"], []).append(r["file"])
    if not m.get("store"):
        return "the run root (no records): " + "; ".join(f"{run} ({', '.join(fs)})" for run, fs in files.items())
    return (f"{len(m['reads'])} result files of {len(files)} runs in `{m['store']}` (hashes in `manifest.json`): "
            + "; ".join(f"[{run}](../{m['store']}/{run}/) ({', '.join(fs)})" for run, fs in files.items()))


def _group_section(m: dict[str, Any], figures: Path) -> list[str]:
    last = m["calls"][-1]
    lines = [f"## {m['group']}", "",
             f"- notebook: `{m['notebook']}`; command: `{m['command']}`",
             f"- profile `{m['profile']}`; data: {m['data']}; seeds: training {m['seeds']['training']}, "
             f"evaluation/analysis {m['seeds']['evaluation_and_analysis']}",
             f"- made at git commit `{(last['git_commit'] or 'unknown')[:10]}`"
             f"{' (uncommitted changes)' if last['git_dirty'] else ''} on {last['finished']}; wall time of the "
             f"calls: {_hours(sum(c['wall_seconds'] for c in m['calls']))} ({len(m['calls'])} call(s), "
             f"{last['threads']} thread(s)); training time of the {len(m['runs'])} runs it reads: "
             f"{_hours(sum(r['train_seconds'] for r in m['runs']))}"]
    if m["differences_from_paper"]:
        lines.append("- miniature vs the paper's setting: " + "; ".join(m["differences_from_paper"]))
    lines.append("- drawn from: " + _drawn_from(m))
    problems = _group_problems(m, figures.resolve().parent)
    if problems:
        lines.append(f"- **not matching its records**: {len(problems)} problem(s), e.g. {problems[0].split(': ', 1)[1]} "
                     f"(`layerlab records verify` lists them all)")
    lines.append("")
    for name, rel in m["files"].items():
        if rel.endswith(".png"):
            lines += [f"![{name}]({m['group']}/{rel})", ""]
        else:
            lines += [f"- {name}: [`{m['group']}/{rel}`]({m['group']}/{rel})", ""]
            if rel.endswith(".csv"):
                rows, columns = _csv_rows(figures / m["group"] / rel)
                lines += [*markdown_table(rows[:MAX_TABLE_ROWS], columns), ""]
    table = comparison_table(m["key"], figures / m["group"])
    if table:
        lines += ["", "Paper vs this miniature:", "", *table]
    lines.append("")
    return lines


def write_readme(figures: str | Path) -> Path:
    """(Re)write ``figures/README.md`` from the groups' manifests."""
    figures = Path(figures)
    manifests = read_manifests(figures)
    cost = gallery_wall_time(manifests)
    lines = ["# figures/: the CURE and RWP figures re-made by layerlab", "",
             "Made by `layerlab reproduce` (the same library calls as `notebooks/01-12`) on real runs; every",
             "section says how to re-make it. Written by `layerlab.gallery.write_readme` from each group's",
             "`manifest.json`; nothing here is typed in by hand except the papers' published numbers",
             "(`layerlab/gallery/reference.py`, with their table numbers).", "",
             f"Groups made: {len(manifests)} of {len(GROUPS)}. Cost so far: {cost['runs']} training runs, "
             f"{_hours(cost['training_seconds'])} of training + {_hours(cost['analysis_seconds'])} of analysis = "
             f"{_hours(cost['total_seconds'])} on this machine (drawing the figures: the calls' wall time "
             f"in each group).", ""]
    if cost["uncosted"]:
        lines += [f"Not in that sum: {len(cost['uncosted'])} analysis result(s) with no logged cost "
                  f"({', '.join(cost['uncosted'])}).", ""]
    if cost["stalled_epochs"]:
        stalled = cost["stalled_epochs"]
        excess = stall_excess(stalled)
        lines += [f"Counted at their run's median epoch instead of their wall time: {len(stalled)} stalled epoch(s), "
                  f"over {STALL_FACTOR:g}x the median (the process was stopped or starved meanwhile), {_hours(excess)} in all: "
                  + ", ".join(f"{e['run']} epoch {e['epoch']} ({e['seconds']:.0f} s; median {e['median_seconds']:.0f} s)"
                              for e in stalled) + ".", ""]
    if cost["final_eval_untimed"]:
        lines += [f"Also not in it: the final evaluation of {len(cost['final_eval_untimed'])} run(s) whose summary "
                  f"does not time it ({', '.join(cost['final_eval_untimed'])}); their epochs are counted.", ""]
    for m in manifests:
        lines += _group_section(m, figures)
    path = figures / "README.md"
    old = path.read_text() if path.exists() else ""
    path.write_text("\n".join(lines))
    if claims.BEGIN in old and claims.END in old:  # the claims section is computed elsewhere (layerlab.claims)
        claims.update_readme(path, old[old.index(claims.BEGIN): old.index(claims.END) + len(claims.END)])
    return path
