"""Evaluate a trained model from a run directory under a suite of attacks and write ``eval.json``.

The suite: natural, FGSM, PGD-20/100 (L-inf and L2), CW-inf (the CW margin loss optimized by
PGD for 100 steps, as the RWP paper evaluates), AutoAttack standard (the authors' package
``pyautoattack``), an eps sweep with PGD-20 (CURE Fig. 5b), NRR (CURE Eq. 9) and the sum metric
natural + robust (CURE Table 8). Per-example correctness is kept for every attack, so the
point-wise worst case over all attacks of a threat model is exact: an example counts as robust
only if it is classified correctly naturally and under every attack.

Sanity checks are run and recorded next to the numbers they qualify: the model is in eval mode
at every forward pass during an attack, its outputs are logits (not probabilities), input
gradients are non-zero, and every adversarial batch stays in the eps-ball and in [0, 1].
"""

from __future__ import annotations

import functools
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layerlab import runs
from layerlab.attacks import eval_mode, fgsm, pgd
from layerlab.config import PGD_STEP, TrainConfig
from layerlab.data import Splits, to_float
from layerlab.models import build_model
from layerlab.progress import bar as progress_bar
from layerlab.train import nrr, resolve_device, splits_for

L2_EPS = 0.5
BOUND_TOL = 1e-5  # float32 slack when checking ||x_adv - x|| <= eps
DEFAULT_SWEEP_255 = (0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
SUITE = ("natural", "fgsm", "pgd20", "pgd100", "pgd20-l2", "pgd100-l2", "cw100", "aa", "eps-sweep")
ATTACK_HELP = ("natural, fgsm, pgdN (L-inf, e.g. pgd20, pgd100), pgdN-l2 (eps 0.5, step eps/4), cwN (CW margin "
               "loss by L-inf PGD, e.g. cw100), aa (AutoAttack standard L-inf), aa-l2 (eps 0.5), aa-apgd (AutoAttack "
               "standard's first two attacks, APGD-CE and APGD-T, with its settings), eps-sweep (PGD-20 over eps), "
               "all (= " + ",".join(SUITE) + ")")
# AutoAttack's attacks per name: standard = APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5,000 queries);
# ``aa-apgd`` keeps the first two with standard's settings (the two that break nearly every example AA breaks, at
# about a third of its cost on a CPU, where Square's queries dominate).
AA_ATTACKS = {"aa": None, "aa-l2": None, "aa-apgd": ("apgd-ce", "apgd-t")}
AA_INSTALL = "AutoAttack needs the authors' package: pip install pyautoattack"


# --------------------------------------------------------------------------------------
# run directories
# --------------------------------------------------------------------------------------


class Run:
    """A run directory as a handle: its config, summary and metrics, a checkpoint's model and its data splits.

    A ``Run`` is a path-like object (:func:`os.fspath` gives its directory), so every instrument takes one where it
    takes a run directory, and reads it through this handle (:meth:`of`). The instruments share one naming scheme:
    ``WHAT_run(run)`` for one run, ``WHAT_runs(runs)`` for several (``evaluate_run``, ``cka_run``,
    ``corruptions_run``, ``lsc_run``, ``minpert_runs``, ``attributions_runs``)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @classmethod
    def of(cls, run: Run | str | os.PathLike) -> Run:
        """``run`` itself when it is a ``Run``, else the handle of the directory ``run``."""
        return run if isinstance(run, Run) else cls(run)

    @property
    def name(self) -> str:
        return self.path.name

    @functools.cached_property
    def config(self) -> TrainConfig:
        """The resolved config the run was trained with."""
        path = self.path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: --run must be a layerlab run directory")
        return TrainConfig.from_dict(runs.read_json(path)["config"])

    @property
    def summary(self) -> dict[str, Any]:
        """``summary.json`` of a finished run."""
        return runs.read_json(self.path / "summary.json")

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.jsonl``, one per epoch."""
        return runs.read_jsonl(self.path / "metrics.jsonl")

    def model(self, checkpoint: str = "best", device: torch.device | str = "cpu") -> nn.Module:
        """The model of checkpoint ``best`` or ``last``, in eval mode."""
        path = self.path / "checkpoints" / f"{checkpoint}.pt"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: is {self.path} a finished layerlab run (checkpoint best or "
                                    f"last)?")
        state = runs.load_checkpoint(path)
        meta, cfg = state["meta"], self.config
        if (meta.get("model"), meta.get("width")) != (cfg.model, cfg.width):
            raise runs.CheckpointError(
                f"{path} holds a {meta.get('model')} (width {meta.get('width')}) but the run {self.path} is a "
                f"{cfg.model} (width {cfg.width}): the checkpoint belongs to another run; put this run's own "
                f"checkpoint back, or retrain it with train --overwrite")
        return model_from_checkpoint(state, device)

    def splits(self, device: torch.device | None = None, data_dir: str | None = None) -> Splits:
        """The data splits the run was trained and evaluated on (``data_dir`` overrides the config's)."""
        return splits_for(self.config, device=device, data_dir=data_dir)


def load_run_config(run_dir: Run | str | Path) -> TrainConfig:
    """The resolved config a run was trained with."""
    return Run.of(run_dir).config


def model_from_checkpoint(state: dict[str, Any], device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the model a checkpoint's metadata describes and load its weights."""
    meta = state["meta"]
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten: leave the global RNG as it was
        model = build_model(meta["model"], num_classes=meta["num_classes"], width=meta["width"],
                            mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    runs.load_weights(model, state)
    return model.to(device).eval()


def load_run_model(run_dir: Run | str | Path, checkpoint: str = "best",
                   device: torch.device | str = "cpu") -> nn.Module:
    """Only the model (``best`` or ``last`` checkpoint) of a run directory, in eval mode."""
    return Run.of(run_dir).model(checkpoint, device)


def load_run(run_dir: Run | str | Path, checkpoint: str = "best", device: str = "auto",
             data_dir: str | None = None) -> tuple[nn.Module, TrainConfig, Splits]:
    """Model (``best`` or ``last`` checkpoint), config and data splits of a run directory."""
    run = Run.of(run_dir)
    cfg, dev = run.config, resolve_device(device)  # the config first: a directory without one is not a run
    return run.model(checkpoint, dev), cfg, run.splits(dev, data_dir)


# --------------------------------------------------------------------------------------
# attack settings
# --------------------------------------------------------------------------------------


def expand_attacks(names: Sequence[str]) -> list[str]:
    """Attack names with ``all`` expanded to the full suite, duplicates removed, order kept."""
    out: list[str] = []
    for name in names:
        for n in (SUITE if name == "all" else (name,)):
            if n not in out:
                out.append(n)
    return out


def parse_attack(name: str, eps: float, sweep_255: Sequence[float] = DEFAULT_SWEEP_255, *,
                 step: float = PGD_STEP) -> dict[str, Any]:
    """Settings of a named attack (L-inf PGD and CW with step size ``step``, the run's); unknown names list the
    valid forms."""
    if name == "natural":
        return {"name": name, "norm": "none", "eps": 0.0}
    if name == "fgsm":
        return {"name": name, "norm": "linf", "eps": eps}
    if name in AA_ATTACKS:
        norm = "l2" if name == "aa-l2" else "linf"
        out = {"name": name, "norm": norm, "eps": L2_EPS if norm == "l2" else eps, "version": "standard",
               "package": "pyautoattack"}
        if AA_ATTACKS[name] is not None:
            out["attacks"] = list(AA_ATTACKS[name])
        return out
    if name == "eps-sweep":
        if not sweep_255 or any(e <= 0 for e in sweep_255):
            raise ValueError(f"eps-sweep needs positive eps values (in 1/255), got {list(sweep_255)}")
        return {"name": name, "norm": "linf", "eps_255": [float(e) for e in sweep_255], "steps": 20,
                "alpha": "eps/4", "restarts": 1, "loss": "ce"}
    match = re.fullmatch(r"(pgd|cw)(\d+)(-l2)?", name)
    if not match or int(match.group(2)) < 1 or (match.group(1) == "cw" and match.group(3)):
        raise ValueError(f"unknown attack {name!r}; use {ATTACK_HELP}")
    norm = "l2" if match.group(3) else "linf"
    e = L2_EPS if norm == "l2" else eps
    return {"name": name, "norm": norm, "eps": e, "alpha": e / 4 if norm == "l2" else step,
            "steps": int(match.group(2)), "restarts": 1, "loss": "cw" if match.group(1) == "cw" else "ce"}


def sweep_settings(settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The PGD-20 settings of each eps of an ``eps-sweep`` (step size eps/4, as 2/255 at 8/255)."""
    return [{"name": f"pgd{settings['steps']}@{e:g}/255", "norm": "linf", "eps": e / 255, "alpha": e / 255 / 4,
             "steps": settings["steps"], "restarts": settings["restarts"], "loss": settings["loss"]}
            for e in settings["eps_255"]]


# --------------------------------------------------------------------------------------
# sanity checks
# --------------------------------------------------------------------------------------


class ModeMonitor:
    """Counts a model's forward calls and those made while any of its modules was in training mode."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls = 0
        self.training_calls = 0

    def _hook(self, module: nn.Module, args: Any) -> None:
        self.calls += 1
        self.training_calls += int(any(m.training for m in module.modules()))

    @contextmanager
    def watch(self) -> Iterator["ModeMonitor"]:
        """Record forward calls of the model inside the block."""
        handle = self.model.register_forward_pre_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()

    def report(self) -> dict[str, Any]:
        """Passed when no forward pass ran in training mode (BatchNorm/dropout would change the model)."""
        return {"passed": self.training_calls == 0, "forward_calls": self.calls,
                "training_mode_calls": self.training_calls}


@torch.no_grad()
def check_logits(model: nn.Module, x: Tensor, tol: float = 1e-4) -> dict[str, Any]:
    """Fails when outputs look like probabilities: all in [0, 1] and every row summing to 1."""
    with eval_mode(model):
        out = model(x).float()
    in_unit = bool(out.min() >= -tol and out.max() <= 1 + tol)
    deviation = float((out.sum(1) - 1).abs().max())
    return {"passed": not (in_unit and deviation < tol), "min": float(out.min()), "max": float(out.max()),
            "max_row_sum_deviation_from_1": deviation}


def check_gradients(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Any]:
    """Fails when any example's cross-entropy input gradient is exactly zero (gradient masking)."""
    x = x.detach().clone().requires_grad_(True)
    with eval_mode(model):
        loss = F.cross_entropy(model(x).float(), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    per_example = grad.flatten(1).abs().sum(1)
    zero = int((per_example == 0).sum())
    return {"passed": zero == 0, "zero_gradient_examples": zero, "n": len(x),
            "mean_abs_gradient": float(grad.abs().mean())}


def perturbation_size(x: Tensor, x_adv: Tensor, norm: str) -> Tensor:
    """Per-example L-inf or L2 size of ``x_adv - x``."""
    d = (x_adv - x).flatten(1).float()
    if norm == "linf":
        return d.abs().amax(1)
    if norm == "l2":
        return d.norm(dim=1)
    if norm == "none":
        return d.abs().amax(1)
    raise ValueError(f"unknown norm {norm!r}; use linf, l2 or none")


def check_bounds(x: Tensor, x_adv: Tensor, eps: float, norm: str, tol: float = BOUND_TOL) -> dict[str, Any]:
    """Whether every adversarial example lies in the eps-ball around x and in [0, 1]."""
    size = float(perturbation_size(x, x_adv, norm).max()) if len(x) else 0.0
    lo, hi = (float(x_adv.min()), float(x_adv.max())) if len(x) else (0.0, 1.0)
    return {"passed": size <= eps + tol and lo >= 0.0 and hi <= 1.0, "eps": eps, "norm": norm,
            "max_norm": size, "min": lo, "max": hi}


def merge_bounds(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """Bounds check over the union of two sets of batches."""
    if a is None:
        return dict(b)
    return {"passed": a["passed"] and b["passed"], "eps": b["eps"], "norm": b["norm"],
            "max_norm": max(a["max_norm"], b["max_norm"]), "min": min(a["min"], b["min"]),
            "max": max(a["max"], b["max"])}


# --------------------------------------------------------------------------------------
# attacks
# --------------------------------------------------------------------------------------


def _autoattack(model: nn.Module, settings: dict[str, Any], seed: int, device: torch.device):
    """The authors' AutoAttack (lazy import: an optional dependency)."""
    try:
        from pyautoattack import AutoAttack
    except ImportError as err:
        raise RuntimeError(AA_INSTALL) from err
    attack = AutoAttack(model, eps=settings["eps"], norm="L2" if settings["norm"] == "l2" else "Linf",
                        version=settings["version"], seed=seed, device=device)
    if settings.get("attacks"):  # a subset of the version's attacks, each with the version's settings
        attack.attacks_to_run = list(settings["attacks"])
    return attack


def attack_batch(model: nn.Module, x: Tensor, y: Tensor, settings: dict[str, Any],
                 generator: torch.Generator | None = None, batch_size: int | None = None) -> Tensor:
    """Adversarial examples for one batch under ``settings`` (natural returns x itself).

    AutoAttack takes all examples at once and batches them itself (``batch_size``), because it
    runs each later attack only on the examples the earlier ones did not break.
    """
    name = settings["name"]
    if name == "natural":
        return x
    if name == "fgsm":
        return fgsm(model, x, y, eps=settings["eps"])
    if name in AA_ATTACKS:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device)) if generator else 0
        with eval_mode(model):
            x_adv, _ = _autoattack(model, settings, seed, x.device).run_standard_evaluation(
                x, y, batch_size=batch_size or len(x))
        return x_adv.detach()
    return pgd(model, x, y, eps=settings["eps"], alpha=settings["alpha"], steps=settings["steps"],
               norm=settings["norm"], restarts=settings["restarts"], loss=settings.get("loss", "ce"),
               generator=generator)


def correct_under(model: nn.Module, x: Tensor, y: Tensor, settings: dict[str, Any], *, batch_size: int = 256,
                  seed: int = 0, progress: bool = False) -> tuple[Tensor, dict[str, Any], dict[str, Any]]:
    """Per-example correctness under one attack, its bounds check on the actual batches, its mode check
    (``progress``: a bar over the batches)."""
    generator = torch.Generator(x.device).manual_seed(seed)
    monitor = ModeMonitor(model)
    masks, bounds = [], None
    step = max(1, len(x) if settings["name"] in AA_ATTACKS else batch_size)  # AA batches internally
    starts = progress_bar(range(0, len(x), step), desc=settings["name"], progress=progress, unit="batch")
    with eval_mode(model), monitor.watch(), starts:
        for start in starts:
            xb, yb = x[start:start + step], y[start:start + step]
            x_adv = attack_batch(model, xb, yb, settings, generator, batch_size)
            bounds = merge_bounds(bounds, check_bounds(xb, x_adv, settings["eps"], settings["norm"]))
            with torch.no_grad():
                masks.append(model(x_adv).argmax(1) == yb)
    mask = torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool, device=x.device)
    return mask, bounds or check_bounds(x, x, settings["eps"], settings["norm"]), monitor.report()


def robust_accuracy(model: nn.Module, data, settings: dict[str, Any], *, batch_size: int = 256,
                    limit: int | None = None, seed: int = 0) -> float:
    """Accuracy (percent) under one attack on the first ``limit`` examples."""
    x, y = first_examples(data, limit)
    mask, _, _ = correct_under(model, x, y, settings, batch_size=batch_size, seed=seed)
    return percent(mask) if len(mask) else 0.0


def first_examples(data, limit: int | None) -> tuple[Tensor, Tensor]:
    """The first ``limit`` examples of an ImageSet as float images in [0, 1] and labels."""
    n = len(data) if limit is None else min(limit, len(data))
    return to_float(data.images[:n]), data.labels[:n]


# --------------------------------------------------------------------------------------
# the suite
# --------------------------------------------------------------------------------------


def percent(mask: Tensor) -> float:
    """Percent of True entries, exact (a float32 mean is off by ~1e-6, enough to break worst-case comparisons)."""
    return 100.0 * int(mask.sum()) / max(1, mask.numel())


def mask_to_str(mask: Tensor) -> str:
    """Per-example correctness as a compact '0'/'1' string (kept in eval.json for worst cases)."""
    return "".join("1" if v else "0" for v in mask.tolist())


def str_to_mask(bits: str) -> Tensor:
    """Inverse of :func:`mask_to_str`."""
    return torch.tensor([c == "1" for c in bits], dtype=torch.bool)


def worst_case(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Point-wise worst case per threat model: robust only if correct naturally and under every attack."""
    groups: dict[str, list[str]] = {}
    for name, res in results.items():
        norm = res["settings"]["norm"]
        if norm != "none" and "correct" in res:
            groups.setdefault(norm, []).append(name)
    out = {}
    for norm, names in groups.items():
        members = (["natural"] if "natural" in results else []) + sorted(names)
        mask = torch.stack([str_to_mask(results[m]["correct"]) for m in members]).all(0)
        out[norm] = {"accuracy": percent(mask), "attacks": members,
                     "eps": results[names[0]]["settings"]["eps"], "correct": mask_to_str(mask)}
    return out


def summary_metrics(results: dict[str, dict[str, Any]], worst: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """NRR (harmonic mean, CURE Eq. 9) and sum (natural + robust, CURE Table 8) for every robust accuracy."""
    if "natural" not in results:
        return {}
    nat = results["natural"]["accuracy"]
    robust = {name: res["accuracy"] for name, res in results.items() if name != "natural"}
    robust.update({f"worst-{norm}": w["accuracy"] for norm, w in worst.items()})
    return {name: {"natural": nat, "robust": rob, "nrr": nrr(nat, rob), "sum": nat + rob}
            for name, rob in robust.items()}


def collect_checks(results: dict[str, dict[str, Any]], model_checks: dict[str, Any],
                   sweep: dict[str, Any] | None = None) -> dict[str, Any]:
    """All sanity checks in one place, with ``passed`` true only if every one passed."""
    attacks = {name: {"bounds": res["bounds"], "eval_mode": res["eval_mode"]} for name, res in results.items()}
    if sweep is not None:
        for point in sweep["points"]:
            attacks[point["settings"]["name"]] = {"bounds": point["bounds"], "eval_mode": point["eval_mode"]}
    passed = all(c["passed"] for c in model_checks.values()) and all(
        a["bounds"]["passed"] and a["eval_mode"]["passed"] for a in attacks.values())
    return {"passed": passed, **model_checks, "attacks": attacks}


def evaluate_model(model: nn.Module, x: Tensor, y: Tensor, attacks: Sequence[str], *, eps: float,
                   step: float = PGD_STEP, sweep_255: Sequence[float] = DEFAULT_SWEEP_255, batch_size: int = 256,
                   seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Run the named attacks on (x, y); returns results, eps sweep, worst cases, metrics and checks.
    ``progress``: a bar over the attacks and one over each attack's batches."""
    names = expand_attacks(attacks)
    settings = [parse_attack(a, eps, sweep_255, step=step) for a in names]
    if "natural" not in names:
        settings.insert(0, parse_attack("natural", eps))
    probe_x, probe_y = x[:batch_size], y[:batch_size]
    model_checks = {"logits": check_logits(model, probe_x), "input_gradients": check_gradients(model, probe_x, probe_y)}
    results: dict[str, dict[str, Any]] = {}
    sweep = None
    for s in progress_bar(settings, desc="attacks", progress=progress, leave=True, unit="attack"):
        t0 = time.time()
        if s["name"] == "eps-sweep":
            sweep = {"settings": s, "points": []}
            for point in sweep_settings(s):
                mask, bounds, mode = correct_under(model, x, y, point, batch_size=batch_size, seed=seed,
                                                   progress=progress)
                sweep["points"].append({"eps": point["eps"], "eps_255": point["eps"] * 255,
                                        "accuracy": percent(mask), "settings": point,
                                        "bounds": bounds, "eval_mode": mode})
            sweep["seconds"] = time.time() - t0
            continue
        mask, bounds, mode = correct_under(model, x, y, s, batch_size=batch_size, seed=seed, progress=progress)
        results[s["name"]] = {"accuracy": percent(mask), "settings": s, "bounds": bounds,
                              "eval_mode": mode, "seconds": time.time() - t0, "correct": mask_to_str(mask)}
    report = finish_report(results, model_checks, sweep)
    report["n"] = len(y)
    return report


def finish_report(results: dict[str, dict[str, Any]], model_checks: dict[str, Any],
                  sweep: dict[str, Any] | None) -> dict[str, Any]:
    """Worst cases, NRR/sum metrics and the check summary derived from per-attack results."""
    worst = worst_case(results)
    report: dict[str, Any] = {"results": results, "worst_case": worst, "metrics": summary_metrics(results, worst),
                              "checks": collect_checks(results, model_checks, sweep)}
    if sweep is not None:
        report["eps_sweep"] = sweep
    if "natural" in results and "pgd20" in results:
        report["nrr"] = nrr(results["natural"]["accuracy"], results["pgd20"]["accuracy"])
    return report


def eval_file(checkpoint: str = "best") -> str:
    """The file a run's evaluation of ``checkpoint`` is written to: ``eval.json`` for the best checkpoint,
    ``eval-CHECKPOINT.json`` for any other, so evaluating one checkpoint never replaces another's results."""
    return "eval.json" if checkpoint == "best" else f"eval-{checkpoint}.json"


def evaluate_run(run_dir: str | Path, attacks: list[str], *, checkpoint: str = "best", n: int | None = None,
                 batch_size: int = 256, seed: int = 0, device: str = "auto", data_dir: str | None = None,
                 sweep_255: Sequence[float] = DEFAULT_SWEEP_255, write: bool = True,
                 progress: bool = False) -> dict[str, Any]:
    """Accuracy of a run's model under each attack; written to ``RUN/eval.json`` (:func:`eval_file`).

    Results of an earlier call with the same checkpoint, n and data set are kept (new attacks are
    added, re-run attacks replaced) and worst cases are recomputed over the union.
    """
    model, cfg, splits = load_run(run_dir, checkpoint, device, data_dir)
    x, y = first_examples(splits.test, n)
    report = evaluate_model(model, x, y, attacks, eps=cfg.eps, step=cfg.alpha, sweep_255=sweep_255, batch_size=batch_size,
                            seed=seed, progress=progress)
    header = {"run": str(run_dir), "checkpoint": checkpoint, "n": len(y), "seed": seed, "dataset": splits.name,
              "eps": cfg.eps, "batch_size": batch_size, "method": cfg.method, "model": cfg.model, "width": cfg.width}
    path = Path(run_dir) / eval_file(checkpoint)
    if write and path.exists():
        old = runs.read_json(path)
        same = all(old.get(k) == header[k] for k in ("checkpoint", "n", "dataset"))
        if same and all("correct" in r for r in old.get("results", {}).values()):
            results = {**old.get("results", {}), **report["results"]}
            sweep = report.get("eps_sweep", old.get("eps_sweep"))
            model_checks = {k: report["checks"][k] for k in ("logits", "input_gradients")}
            report = {**finish_report(results, model_checks, sweep), "n": len(y)}
    report = {**header, **report}
    if write:
        runs.write_json(path, report)
    return report
