"""The ``figures/`` gallery's provenance: a manifest per figure group and the README assembled from them.

Every figure call of :mod:`layerlab.reproduce` ends with :meth:`~layerlab.reproduce.Context.record`,
which writes ``GROUP/manifest.json`` (the command that re-makes the group, profile, data, seeds, the runs
it read with their results and training times, this call's wall time, the git commit, how the setting
differs from the paper's) and copies the small tidy files each figure is drawn from (the runs' JSON,
JSONL and CSV results, never checkpoints) into ``GROUP/data/RUN/``. :func:`write_readme` turns the
manifests into ``README.md``, with the papers' published numbers (:mod:`layerlab.reference`) beside ours.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerlab import runs
from layerlab.records import copy_results

if TYPE_CHECKING:
    from layerlab.reproduce import Context

MANIFEST = "manifest.json"
DATA_DIR = "data"
MAX_TABLE_ROWS = 40  # longer CSV tables are linked, not shown
STALL_FACTOR = 3.0  # an epoch this many times its run's median epoch stalled (see stalled_epochs)
# Figure settings that differ between the profiles and are worth naming next to a figure.
COMPARED_CONFIG = ("model", "width", "dataset", "train_size", "val_size", "test_size", "eval_size", "epochs",
                   "batch_size", "lr", "weight_decay", "attack_steps", "eval_steps", "seed", "amp")


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
    from layerlab.reproduce import base_config, settings

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
    """A run's whole training time (every process that trained it, with its evaluations), less its stalled
    epochs' excess over the run's median epoch (:func:`stalled_epochs`). Summaries written before
    ``final_eval_seconds`` existed held one process's epochs only: their epochs are summed from ``metrics.jsonl``
    and the final evaluation, not timed then, is flagged."""
    from layerlab.train import epoch_seconds

    metrics = runs.read_jsonl(run_dir / "metrics.jsonl")
    timed = "final_eval_seconds" in summary
    recorded = summary["seconds"] if timed else epoch_seconds(metrics)
    stalls = stalled_epochs(metrics)
    return {"train_seconds": round(recorded - stall_excess(stalls), 1), "recorded_train_seconds": round(recorded, 1),
            "stalled_epochs": stalls, "final_eval_timed": timed}


def stalled_epochs(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Epochs whose wall time (training and evaluation) is over ``STALL_FACTOR`` times the run's median epoch:
    the process was stopped or starved meanwhile (a SIGSTOP-paused worker's clock keeps running), so the gallery
    counts each at the median instead. A run of fewer than 3 epochs has no reliable median and no stalls."""
    import statistics

    from layerlab.train import epoch_wall

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
ANALYSIS_FILES = {"eval.json": "eval", "cka.json": "cka", "corruptions.csv": "corruptions", "lsc.csv": "lsc",
                  "minpert.json": "minpert", "attributions.json": "attributions"}


def _analysis_cost(directory: Path) -> dict[str, Any]:
    """The analysis CPU seconds logged in ``directory/costs.jsonl`` and the result files with no logged cost
    (made before costs were logged)."""
    costs = runs.analysis_costs(directory)
    uncosted = sorted(f for f, kind in ANALYSIS_FILES.items() if (directory / f).exists() and kind not in costs)
    return {"analysis_seconds": round(sum(costs.values()), 1), "analysis_costs": costs, "uncosted": uncosted}


def figure_key(group: str) -> str:
    """The ``layerlab reproduce --only`` name of a figure-group directory (``01_freeze_study`` -> ``freeze_study``)."""
    from layerlab.reproduce import FIGURES

    for key, (notebook, _) in FIGURES.items():
        if notebook.split("_", 1)[0] == group.split("_", 1)[0]:
            return key
    raise ValueError(f"no figure group numbered like {group!r}")


def write_manifest(ctx: Context, out: Path, paths: dict[str, Path], extra_sources: tuple[Path, ...] = ()) -> Path:
    """Write ``out/manifest.json`` for one figure call and copy its source data to ``out/data/``."""
    from dataclasses import asdict

    from layerlab.reproduce import FIGURES

    finished = dt.datetime.now(dt.timezone.utc)
    wall = finished.timestamp() - ctx.started
    used = [_run_row(name, d, ctx.started) for name, d in sorted(ctx.used.items())]
    for row in used:
        row["copied"] = copy_results(Path(row["dir"]), out / DATA_DIR / row["run"])
    for src in extra_sources:
        if src.is_file():
            (out / DATA_DIR).mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out / DATA_DIR / src.name)
    shared = {str(d): _analysis_cost(d) for d in sorted({s.parent for s in extra_sources if s.is_file()})}
    trained = sum(r["train_seconds"] for r in used if r["trained_in_call"])
    key = figure_key(out.name)
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
        "group": out.name, "key": key, "notebook": f"notebooks/{FIGURES[key][0]}",
        "command": ((f"LAYERLAB_DATA={data_root} " if data_root and ctx.cfg.dataset != "digits" else "")
                    + f"layerlab reproduce --profile {ctx.profile} --runs {ctx.root} --figures {ctx.figures} "
                      f"--only {key}"),
        "profile": ctx.profile, "data": describe_data(ctx.cfg.dataset, ctx.data_dir),
        "seeds": {"training": ctx.cfg.seed, "evaluation_and_analysis": 0},
        "files": {k: os.path.relpath(v, out) for k, v in paths.items()},
        "runs": used, "shared_analyses": shared, "calls": calls, "differences_from_paper": paper_differences(ctx),
        "figure_settings": _jsonable(asdict(ctx.s)), "environment": env,
    }
    runs.write_json(path, manifest)
    return path


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _jsonable(obj: Any) -> Any:
    """Tuples to lists, recursively (JSON)."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def read_manifests(figures: Path) -> list[dict[str, Any]]:
    """Every group's manifest under ``figures``, in group order."""
    return [runs.read_json(p) for p in sorted(Path(figures).glob(f"*/{MANIFEST}"))]


def gallery_cpu_time(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """What the gallery cost: the training time of every distinct run plus the analysis time logged in every
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


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> list[str]:
    """Rows as Markdown table lines (floats with 2 decimals, missing values blank)."""
    if not rows:
        return []
    columns = columns or list(rows[0])

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and v != v):
            return ""
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows])


def _csv_rows(path: Path, drop: tuple[str, ...] = ("dir",)) -> tuple[list[dict[str, Any]], list[str]]:
    """A table's rows for the README, without the columns ``drop`` (run directories: machine paths)."""
    import pandas as pd

    frame = pd.read_csv(path)
    frame = frame[[c for c in frame.columns if c not in drop]]
    for c in frame.columns:  # integers in a column with blanks (a block spec "12") were read as floats
        col = frame[c]
        if col.dtype.kind == "f" and col.isna().any() and (col.dropna() % 1 == 0).all():
            frame[c] = col.astype("Int64")
    records = [{k: (None if v is pd.NA else v) for k, v in r.items()} for r in frame.to_dict("records")]
    return records, list(frame.columns)


def _group_section(m: dict[str, Any], figures: Path) -> list[str]:
    from layerlab.reference import comparison_table

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
    lines.append(f"- drawn from: `{m['group']}/{DATA_DIR}/` (each run's summary, metrics and analysis results)")
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
    cost = gallery_cpu_time(manifests)
    lines = ["# figures/: the CURE and RWP figures re-made by layerlab", "",
             "Made by `layerlab reproduce` (the same library calls as `notebooks/01-12`) on real runs; every",
             "section says how to re-make it. Written by `layerlab.gallery.write_readme` from each group's",
             "`manifest.json`; nothing here is typed in by hand except the papers' published numbers",
             "(`layerlab/reference.py`, with their table numbers).", "",
             f"Groups made: {len(manifests)} of 12. Cost so far: {cost['runs']} training runs, "
             f"{_hours(cost['training_seconds'])} of training + {_hours(cost['analysis_seconds'])} of analysis = "
             f"{_hours(cost['total_seconds'])} on this machine (drawing the figures: the calls' wall time "
             f"in each group).", ""]
    if cost["uncosted"]:
        lines += [f"Not in that sum: {len(cost['uncosted'])} analysis result(s) made before analysis costs were "
                  f"logged ({', '.join(cost['uncosted'])}).", ""]
    if cost["stalled_epochs"]:
        stalled = cost["stalled_epochs"]
        excess = stall_excess(stalled)
        lines += [f"Counted at their run's median epoch instead of their wall time: {len(stalled)} stalled epoch(s), "
                  f"over {STALL_FACTOR:g}x the median (the worker was paused meanwhile), {_hours(excess)} in all: "
                  + ", ".join(f"{e['run']} epoch {e['epoch']} ({e['seconds']:.0f} s; median {e['median_seconds']:.0f} s)"
                              for e in stalled) + ".", ""]
    if cost["final_eval_untimed"]:
        lines += [f"Also not in it: the final evaluation of {len(cost['final_eval_untimed'])} run(s) trained before it "
                  f"was timed ({', '.join(cost['final_eval_untimed'])}); their epochs are counted.", ""]
    for m in manifests:
        lines += _group_section(m, figures)
    path = figures / "README.md"
    path.write_text("\n".join(lines))
    return path
