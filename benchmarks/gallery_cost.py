"""7. Gallery cost: where the time of the figure gallery's runs goes.

Measured: one epoch of AT, TRADES, CURE and RWP trained end to end by :func:`layerlab.train.train` with the
gallery's config (``layerlab.gallery.settings.base_config``: the profile's own, default method
hyper-parameters), its data sizes scaled by the settings' ``gallery_scale``, each into a fresh run directory,
broken into the phases the trainer times: training steps (the metrics row's ``seconds``), the per-epoch
evaluation (``eval_seconds``), the final evaluation of the last and best models (the summary's
``final_eval_seconds``), checkpoint and callback writes (``process_write_seconds``) and the rest of the call
(set-up, summary). CURE trains from its random initialization here (the gallery starts it from the ST run's
weights, which changes no cost).

Recorded: the same phases, and every analysis's cost, of the gallery's runs as they were trained, from the run
records under ``results/runs-cpu`` (``metrics.jsonl``, ``summary.json``, ``costs.jsonl``; the gallery's runs are
those the figure manifests ``figures/*/manifest.json`` name). Checkpoint writes are not in the records.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.common import Context, Result
from layerlab import runs
from layerlab.config import TrainConfig
from layerlab.gallery.manifest import stall_excess, stalled_epochs
from layerlab.gallery.settings import base_config
from layerlab.train import splits_for, train

NAME = "gallery_cost"
TITLE = "gallery cost: one epoch by phase, and the recorded runs' phases and analyses"
METHODS = ("at", "trades", "cure", "rwp")
ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "results" / "runs-cpu"
MANIFESTS = ROOT / "figures"
SCALED = ("train_size", "val_size", "test_size", "eval_size")
PHASES = ("train_s", "epoch_eval_s", "final_eval_s", "checkpoint_s", "other_s")


def epoch_config(profile: str, scale: float, method: str, ctx: Context) -> TrainConfig:
    """The gallery's config of ``method`` for one epoch, its data sizes times ``scale``."""
    cfg = base_config(profile)
    sizes = {k: max(10, round(getattr(cfg, k) * scale)) for k in SCALED if getattr(cfg, k) is not None}
    return cfg.replace(method=method, epochs=1, device=str(ctx.device), **sizes)


def one_epoch(cfg: TrainConfig, out: Path, splits) -> dict[str, Any]:
    """Train ``cfg`` (one epoch) into ``out`` and return its wall time by phase."""
    t0 = time.perf_counter()
    summary = train(cfg, out, progress=False, splits=splits)
    total = time.perf_counter() - t0
    (row,) = runs.read_jsonl(out / "metrics.jsonl")
    phases = {"train_s": row["seconds"], "epoch_eval_s": row.get("eval_seconds", 0.0),
              "final_eval_s": summary["final_eval_seconds"], "checkpoint_s": summary["process_write_seconds"]}
    phases["other_s"] = total - sum(phases.values())
    return {**phases, "total_s": total}


def measure_epochs(ctx: Context, log: Callable[[str], None]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One gallery epoch of every method in :data:`METHODS`: the table and the figures (sizes, data loading)."""
    s = ctx.settings
    cfgs = {m: epoch_config(s.gallery_profile, s.gallery_scale, m, ctx) for m in METHODS}
    t0 = time.perf_counter()
    splits = splits_for(cfgs["at"], device=ctx.device)  # the same sizes and seed for every method
    figures = {"data_load_s": round(time.perf_counter() - t0, 2),
               "sizes": {k: getattr(cfgs["at"], k) for k in SCALED},
               "config": {k: getattr(cfgs["at"], k) for k in ("dataset", "width", "batch_size", "attack_steps",
                                                             "epoch_eval_steps", "eval_steps", "amp",
                                                             "channels_last", "eval_every", "keep_every")}}
    table = []
    with tempfile.TemporaryDirectory(prefix="layerlab-bench-") as tmp:
        for method, cfg in cfgs.items():
            phases = one_epoch(cfg, Path(tmp) / method, splits)
            log(f"  {method}: {phases['total_s']:.1f} s")
            shares = {f"{k[:-2]}_share": phases[k] / phases["total_s"] for k in PHASES}
            table.append({"method": method, **phases, **shares,
                          "train_images_per_s": cfg.train_size / phases["train_s"]})
    return table, figures


def gallery_runs(manifests: Path = MANIFESTS) -> list[str]:
    """The run names the figure manifests (``*/manifest.json``) read, sorted."""
    names = {r["run"] for p in manifests.glob("*/manifest.json") for r in json.loads(p.read_text())["runs"]}
    return sorted(names)


def recorded_run(run_dir: Path) -> dict[str, Any]:
    """One recorded run's phases (seconds; stalled epochs' excess over the run's median epoch kept apart) and
    its analyses' costs."""
    metrics = runs.read_jsonl(run_dir / "metrics.jsonl")
    summary = runs.read_json(run_dir / "summary.json")
    return {"run": run_dir.name, "method": summary["method"], "epochs": len(metrics),
            "train_s": sum(r["seconds"] for r in metrics),
            "epoch_eval_s": sum(r.get("eval_seconds", 0.0) for r in metrics),
            "evaluated_epochs": sum("natural_acc" in r for r in metrics),
            "final_eval_s": summary.get("final_eval_seconds"),
            "stall_excess_s": stall_excess(stalled_epochs(metrics)),
            "analyses": runs.analysis_costs(run_dir)}


def recorded(records: Path = RECORDS, manifests: Path = MANIFESTS) -> dict[str, Any]:
    """The gallery's recorded runs: phase totals, a row per method run of :data:`METHODS`, analysis costs per
    kind (per run that has it), and what the records lack."""
    names = [n for n in gallery_runs(manifests) if (records / n / "summary.json").exists()]
    rows = [recorded_run(records / n) for n in names]
    shared = runs.analysis_costs(records / "analysis")
    untimed = [r["run"] for r in rows if r["final_eval_s"] is None]
    hours = lambda seconds: seconds / 3600
    totals = {"training steps": sum(r["train_s"] for r in rows) - sum(r["stall_excess_s"] for r in rows),
              "per-epoch evaluation": sum(r["epoch_eval_s"] for r in rows),
              "final evaluation": sum(r["final_eval_s"] or 0.0 for r in rows)}
    kinds = sorted({k for r in rows for k in r["analyses"]} | set(shared))
    per_kind = []
    for kind in kinds:
        costs = [r["analyses"][kind] for r in rows if kind in r["analyses"]]
        total = sum(costs) + shared.get(kind, 0.0)
        totals[f"analysis {kind}"] = total
        per_kind.append({"analysis": kind, "runs": len(costs), "per_run_s": statistics.mean(costs) if costs else None,
                         "shared_s": shared.get(kind), "total_h": hours(total)})
    whole = sum(totals.values())
    phase_rows = [{"phase": k, "hours": hours(v), "share": v / whole} for k, v in totals.items()]
    method_rows = [{"run": r["run"], "epochs": r["epochs"], "train_s_per_epoch": r["train_s"] / r["epochs"],
                    "epoch_eval_s_per_epoch": r["epoch_eval_s"] / max(1, r["evaluated_epochs"]),
                    "epoch_eval_share": r["epoch_eval_s"] / (r["train_s"] + r["epoch_eval_s"]),
                    "final_eval_s": r["final_eval_s"], **{f"{k}_s": v for k, v in sorted(r["analyses"].items())}}
                   for r in rows if r["run"].lower() in METHODS]
    return {"runs": len(rows), "phases": phase_rows, "methods": method_rows, "analyses": per_kind,
            "total_hours": hours(whole), "final_eval_untimed": untimed,
            "stall_excess_hours": hours(sum(r["stall_excess_s"] for r in rows))}


def run(ctx: Context, log: Callable[[str], None] = print) -> Result:
    s = ctx.settings
    if base_config(s.gallery_profile).dataset != "digits" and not os.environ.get("LAYERLAB_DATA"):
        return Result(NAME, TITLE, skipped=f"the {s.gallery_profile} profile trains on CIFAR-10: set LAYERLAB_DATA "
                                          f"to the directory holding cifar10/")
    table, figures = measure_epochs(ctx, log)
    more_tables: dict[str, list[dict[str, Any]]] = {}
    notes = [f"measured: one {s.gallery_profile}-profile epoch per method through layerlab.train.train, data sizes "
             f"x {s.gallery_scale:g} ({', '.join(f'{k} {v}' for k, v in figures['sizes'].items())}), device "
             f"{ctx.device}, {ctx.threads} thread(s); phases as the trainer times them; other = set-up and summary",
             "final evaluation: PGD-eval_steps on the whole test subset, of the last and of the best model; a run "
             "of E epochs pays it once, the per-epoch evaluation E times (every eval_every-th epoch)"]
    if RECORDS.is_dir() and MANIFESTS.is_dir():
        rec = recorded()
        more_tables["recorded gallery runs: phases (hours)"] = rec["phases"]
        more_tables["recorded gallery runs: AT, TRADES, CURE, RWP"] = rec["methods"]
        more_tables["recorded gallery runs: analysis cost per run"] = rec["analyses"]
        figures.update(recorded_runs=rec["runs"], recorded_total_hours=rec["total_hours"],
                       recorded_stall_excess_hours=rec["stall_excess_hours"],
                       recorded_final_eval_untimed=rec["final_eval_untimed"])
        notes.append(f"recorded: the {rec['runs']} runs the figure manifests name, from their records under "
                     f"results/runs-cpu (as trained, on whatever load the machine had then); training less the "
                     f"stalled epochs' excess over the run's median epoch; checkpoint writes are not recorded; "
                     f"runs trained before the final evaluation was timed count 0 for it")
    return Result(NAME, TITLE, table=table, more_tables=more_tables, figures=figures, notes=notes)
