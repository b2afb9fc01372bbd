"""Evaluate a trained model from a run directory under named attacks and write ``eval.json``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerlab import runs
from layerlab.attacks import eval_mode, fgsm, pgd
from layerlab.config import TrainConfig
from layerlab.data import Splits, eval_batches, load_splits
from layerlab.models import build_model
from layerlab.train import nrr, resolve_device

ATTACK_HELP = "natural, fgsm, pgdN (L-inf, e.g. pgd20, pgd100), pgdN-l2 (eps 0.5, step eps/4)"


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The resolved config a run was trained with."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: --run must be a layerlab run directory")
    return TrainConfig.from_dict(runs.read_json(path)["config"])


def model_from_checkpoint(state: dict[str, Any], device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the model a checkpoint's metadata describes and load its weights."""
    meta = state["meta"]
    model = build_model(meta["model"], num_classes=meta["num_classes"], width=meta["width"],
                        mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    runs.load_weights(model, state)
    return model.to(device).eval()


def load_run(run_dir: str | Path, checkpoint: str = "best", device: str = "auto",
             data_dir: str | None = None) -> tuple[nn.Module, TrainConfig, Splits]:
    """Model (``best`` or ``last`` checkpoint), config and data splits of a run directory."""
    cfg = load_run_config(run_dir)
    dev = resolve_device(device)
    state = runs.load_checkpoint(Path(run_dir) / "checkpoints" / f"{checkpoint}.pt")
    model = model_from_checkpoint(state, dev)
    splits = load_splits(cfg.dataset, data_dir or cfg.data_dir, train_size=cfg.train_size, test_size=cfg.test_size,
                         val_size=cfg.val_size, seed=cfg.seed, device=dev)
    return model, cfg, splits


def parse_attack(name: str, eps: float) -> dict[str, Any]:
    """Settings of a named attack; unknown names list the valid forms."""
    if name in ("natural", "fgsm"):
        return {"name": name, "eps": 0.0 if name == "natural" else eps}
    match = re.fullmatch(r"pgd(\d+)(-l2)?", name)
    if not match:
        raise ValueError(f"unknown attack {name!r}; use {ATTACK_HELP}")
    norm = "l2" if match.group(2) else "linf"
    e = 0.5 if norm == "l2" else eps
    return {"name": name, "norm": norm, "eps": e, "alpha": e / 4 if norm == "l2" else 2 / 255,
            "steps": int(match.group(1)), "restarts": 1}


def robust_accuracy(model: nn.Module, data, settings: dict[str, Any], *, batch_size: int = 256,
                    limit: int | None = None, seed: int = 0) -> float:
    """Accuracy (percent) under one attack on the first ``limit`` examples."""
    correct = total = 0
    generator = torch.Generator(data.images.device).manual_seed(seed)
    with eval_mode(model):
        for x, y in eval_batches(data, batch_size):
            if limit is not None:
                if total >= limit:
                    break
                x, y = x[: limit - total], y[: limit - total]
            if settings["name"] == "natural":
                x_adv = x
            elif settings["name"] == "fgsm":
                x_adv = fgsm(model, x, y, eps=settings["eps"])
            else:
                x_adv = pgd(model, x, y, eps=settings["eps"], alpha=settings["alpha"], steps=settings["steps"],
                            norm=settings["norm"], restarts=settings["restarts"], generator=generator)
            with torch.no_grad():
                correct += int((model(x_adv).argmax(1) == y).sum())
            total += len(y)
    return 100.0 * correct / max(1, total)


def evaluate_run(run_dir: str | Path, attacks: list[str], *, checkpoint: str = "best", n: int | None = None,
                 batch_size: int = 256, seed: int = 0, device: str = "auto", data_dir: str | None = None,
                 write: bool = True) -> dict[str, Any]:
    """Accuracy of a run's model under each attack; written to ``RUN/eval.json`` (merged with earlier results)."""
    model, cfg, splits = load_run(run_dir, checkpoint, device, data_dir)
    settings = [parse_attack(a, cfg.eps) for a in attacks]
    n_used = min(n or len(splits.test), len(splits.test))
    results = {s["name"]: {"accuracy": robust_accuracy(model, splits.test, s, batch_size=batch_size, limit=n,
                                                        seed=seed), "settings": s} for s in settings}
    report = {"run": str(run_dir), "checkpoint": checkpoint, "n": n_used, "seed": seed,
              "dataset": splits.name, "results": results}
    if "natural" in results and "pgd20" in results:
        report["nrr"] = nrr(results["natural"]["accuracy"], results["pgd20"]["accuracy"])
    if write:
        path = Path(run_dir) / "eval.json"
        old = runs.read_json(path) if path.exists() else {}
        if old.get("checkpoint") == checkpoint and old.get("n") == n_used:
            report["results"] = {**old.get("results", {}), **report["results"]}
        runs.write_json(path, report)
    return report
