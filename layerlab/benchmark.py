"""Evaluate any classifier, not only a layerlab run, and write the same ``eval.json`` (RobustBench's
``benchmark(model, ...)`` convention).

A model is an ``nn.Module`` or a spec (:data:`MODEL_HELP`): ``module:function`` or ``path/to/file.py:function``
(a function called with no arguments, or an ``nn.Module`` attribute), ``torchvision:NAME`` or ``timm:NAME`` (built
for the data set's classes; timm is optional). Weights are a state_dict file read with
``torch.load(weights_only=True)``.

Inputs are images in [0, 1] and the model returns logits: as in RobustBench, normalization belongs inside the
model, so the attacks' eps-balls are in pixel space. A model that expects normalized inputs is wrapped in
:class:`layerlab.models.Normalize` by ``normalize`` ("dataset" for the data set's training-split channel
statistics, as layerlab's own models use, or explicit ``"m1,m2,m3/s1,s2,s3"``).

Every input is checked before any evaluation: the spec imports and builds a module, the weights fit it (missing,
unexpected and other-shape keys named), its output on test images has one logit per class of the data set, the
output files do not exist yet (unless ``overwrite``), the attacks and corruptions are known, and the published
CIFAR-10-C files (``cifar10c``) match the test set.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from layerlab import runs
from layerlab.analysis.corruptions import (CORRUPTIONS, CSV_FILE, SEVERITIES, PublishedCorruptions, check_names,
                                           check_severities, evaluate_corruptions, write_csv)
from layerlab.config import EPS, PGD_STEP
from layerlab.data import NUM_CLASSES, Splits, load_splits, to_float
from layerlab.evaluation import DEFAULT_SWEEP_255, eval_file, evaluate_model, expand_attacks, parse_attack
from layerlab.models import WRAPPER_PREFIXES, Normalize
from layerlab.plots.robustness import plot_corruptions
from layerlab.train import resolve_device

MODEL_HELP = ("module:function or path/to/file.py:function (a function called with no arguments, or an nn.Module), "
              "torchvision:NAME or timm:NAME (built untrained for the data set's classes: give --weights)")
LIBRARIES = ("torchvision", "timm")  # specs whose models are built untrained
NORMALIZE_HELP = ("none (the model takes [0, 1] images and normalizes itself, RobustBench's convention), dataset "
                  "(the data set's training-split mean/std), or m1,m2,m3/s1,s2,s3")
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")  # where checkpoints commonly nest the state_dict
EVAL_FILE = eval_file()
SHOWN_KEYS = 3  # keys named per kind in a weights mismatch


# --------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------


def _import_attribute(module: str, name: str) -> Any:
    """``module.name``, the module given by import path or by a ``.py`` file path."""
    if module.endswith(".py"):
        path = Path(module)
        if not path.is_file():
            raise FileNotFoundError(f"--model {module}:{name}: {path} does not exist")
        spec = importlib.util.spec_from_file_location(f"_layerlab_model_{path.stem}", path)  # shadows no module
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = loaded  # as an import would (dataclasses and pickling look modules up there)
        spec.loader.exec_module(loaded)
    else:
        try:
            loaded = importlib.import_module(module)
        except ModuleNotFoundError as err:
            raise ValueError(f"--model {module}:{name}: cannot import {module!r} ({err}); put its folder on "
                             f"PYTHONPATH or give the file, path/to/file.py:{name}") from None
    if not hasattr(loaded, name):
        raise ValueError(f"--model {module}:{name}: {module} has no attribute {name!r}")
    return getattr(loaded, name)


def build_from_spec(spec: str, num_classes: int) -> nn.Module:
    """The module a model spec (:data:`MODEL_HELP`) names, freshly built (weights not loaded)."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise ValueError(f"--model {spec!r}: use {MODEL_HELP}")
    if source == "torchvision":
        import torchvision.models

        if name not in torchvision.models.list_models():
            raise ValueError(f"--model {spec}: torchvision has no model {name!r}; see torchvision.models.list_models()")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if source == "timm":
        if importlib.util.find_spec("timm") is None:
            raise RuntimeError(f"--model {spec} needs timm: pip install timm")
        import timm

        if not timm.is_model(name):
            raise ValueError(f"--model {spec}: timm has no model {name!r}; see timm.list_models()")
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    found = _import_attribute(source, name)
    model = found if isinstance(found, nn.Module) else found() if callable(found) else found
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec} gives a {type(model).__name__}, not a torch.nn.Module; point to a function "
                         f"that returns the model")
    return model


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state_dict from a file, read with ``torch.load(weights_only=True)``: at the top level or under one of
    :data:`STATE_DICT_KEYS`, with a wrapper prefix shared by every key removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--weights {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickled model object, a truncated or foreign file
        raise ValueError(f"--weights {path} cannot be read with torch.load(weights_only=True) "
                         f"({type(err).__name__}); save the weights as torch.save(model.state_dict(), PATH)") from None
    if isinstance(state, dict):
        state = next((state[k] for k in STATE_DICT_KEYS if isinstance(state.get(k), dict)), state)
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"--weights {path} holds no state_dict (a dict of tensors, possibly under one of "
                         f"{', '.join(STATE_DICT_KEYS)}); save the weights as torch.save(model.state_dict(), PATH)")
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _named(keys: Sequence[str], what: str) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS]) + (", ..." if len(keys) > SHOWN_KEYS else "")
    return f"{len(keys)} {what} ({shown})"


def load_weights(model: nn.Module, path: str | Path, spec: str) -> None:
    """Load the state_dict in ``path`` into ``model``; keys missing, unexpected or of another shape are refused,
    summarized in one line."""
    state, own = read_state_dict(path), model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
                if k in own and state[k].shape != own[k].shape]
    problems = [_named(keys, what) for keys, what in ((missing, "missing"), (unexpected, "unexpected"),
                                                        (reshaped, "of another shape (file vs model)")) if keys]
    if problems:
        raise ValueError(f"--weights {path} does not fit --model {spec}: {'; '.join(problems)}; give the weights of "
                         f"this architecture or the function that builds theirs")
    model.load_state_dict(state)


def parse_normalize(normalize: str | tuple[Sequence[float], Sequence[float]] | None,
                    splits: Splits) -> tuple[list[float], list[float]] | None:
    """(mean, std) the model's inputs are normalized with, or None (the model normalizes itself)."""
    if normalize is None or normalize == "none":
        return None
    if normalize == "dataset":
        return list(splits.mean), list(splits.std)
    if isinstance(normalize, str):
        try:
            mean, std = ([float(v) for v in part.split(",")] for part in normalize.split("/"))
        except ValueError:
            raise ValueError(f"--normalize {normalize!r}: use {NORMALIZE_HELP}") from None
    else:
        mean, std = ([float(v) for v in part] for part in normalize)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"--normalize needs 3 means and 3 positive stds, got {mean} / {std}; use {NORMALIZE_HELP}")
    return mean, std


def check_output(model: nn.Module, x: Tensor, num_classes: int, dataset: str) -> None:
    """Refuse a model whose output on ``x`` is not one logit per class of the data set."""
    with torch.no_grad():
        out = model(x)
    shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
    if shape != (len(x), num_classes):
        raise ValueError(f"the model's output on {len(x)} images of {dataset} is {shape}, expected ({len(x)}, "
                         f"{num_classes}): build it with {num_classes} classes")


def load_model(spec: str, weights: str | Path | None = None, *, num_classes: int) -> nn.Module:
    """The model a spec names, with ``weights`` loaded (required for a library's untrained architecture)."""
    with torch.random.fork_rng(devices=[]):  # a random init is overwritten or part of the spec: keep the global RNG
        model = build_from_spec(spec, num_classes)
    if weights is None and spec.partition(":")[0] in LIBRARIES:
        raise ValueError(f"--model {spec} is built untrained; pass its --weights")
    if weights is not None:
        load_weights(model, weights, spec)
    return model


# --------------------------------------------------------------------------------------
# the entry point
# --------------------------------------------------------------------------------------


def benchmark(model: nn.Module | str, dataset: str = "cifar10", *, weights: str | Path | None = None,
              data_dir: str | None = None, n: int | None = None, attacks: Sequence[str] = ("natural", "fgsm", "pgd20"),
              eps: float = EPS, step: float = PGD_STEP, sweep_255: Sequence[float] = DEFAULT_SWEEP_255,
              normalize: str | tuple[Sequence[float], Sequence[float]] | None = None,
              corruptions: Sequence[str] | None = None, severities: Sequence[int] = SEVERITIES,
              cifar10c: str | Path | None = None, batch_size: int = 256, seed: int = 0, device: str = "auto",
              out: str | Path | None = None, overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """Accuracy of any model under the named attacks on the first ``n`` test images of ``dataset``; written to
    ``OUT/eval.json`` (the layout of a run's, with the model, weights and normalization in the header).

    ``model`` is an ``nn.Module`` taking [0, 1] images or a spec (:data:`MODEL_HELP`), with ``weights``.
    ``corruptions`` (names or groups, e.g. ``["all"]``) adds CIFAR-10-C accuracies at ``severities`` on the same
    images: read from the published files in ``cifar10c`` when given (all 15 unless ``corruptions`` says
    otherwise), else generated with ``seed``; they go to ``OUT/corruptions.{csv,png}`` and their source and mean
    to ``eval.json``. ``progress``: bars over the attacks, each attack's batches and the corruptions.
    """
    # refuse bad input before any work
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise FileExistsError(f"--out {out} is a file; give a directory")
    if out is not None and not overwrite:
        taken = [Path(out) / f for f in (EVAL_FILE, CSV_FILE) if (Path(out) / f).exists()]
        if taken:
            raise FileExistsError(f"{taken[0]} exists; pass --overwrite to replace it, or another --out")
    if n is not None and n < 1:
        raise ValueError(f"--n must be positive, got {n}")
    for name in expand_attacks(attacks):
        parse_attack(name, eps, sweep_255, step=step)
    types = check_names(corruptions or (CORRUPTIONS if cifar10c is not None else []))
    severities = check_severities(severities)
    dev = resolve_device(device)
    spec = model if isinstance(model, str) else type(model).__name__
    classes = NUM_CLASSES.get(dataset)  # None (a folder data set): known once the data is read
    if isinstance(model, str) and classes is not None:  # a bad spec or weights is refused before the data loads
        model = load_model(model, weights, num_classes=classes)
    elif not isinstance(model, str) and weights is not None:
        load_weights(model, weights, spec)
    splits = load_splits(dataset, data_dir, device=dev)
    if isinstance(model, str):
        model = load_model(model, weights, num_classes=splits.num_classes)
    stats = parse_normalize(normalize, splits)
    if stats is not None:
        model = nn.Sequential(Normalize(*stats), model)
    model = model.to(dev).eval()
    count = len(splits.test) if n is None else min(n, len(splits.test))
    images, labels = splits.test.images[:count], splits.test.labels[:count]
    check_output(model, to_float(images[:2]), splits.num_classes, splits.name)
    published = None if cifar10c is None else PublishedCorruptions(
        cifar10c, types, splits.test_index[:count], splits.stored_test_labels, tuple(images.shape[2:]))

    report = evaluate_model(model, to_float(images), labels, attacks, eps=eps, step=step, sweep_255=sweep_255,
                            batch_size=batch_size, seed=seed, progress=progress)
    header = {"model": spec, "weights": None if weights is None else str(weights),
              "normalize": None if stats is None else {"mean": stats[0], "std": stats[1]}, "dataset": splits.name,
              "n": count, "seed": seed, "eps": eps, "step": step, "batch_size": batch_size}
    report = {**header, **report}
    rows = None
    if types:
        rows = evaluate_corruptions(model, images, labels, types=types, severities=severities, seed=seed,
                                    batch_size=batch_size, published=published, progress=progress)
        corrupted = [r["accuracy"] for r in rows if r["severity"] > 0]
        report["corruptions"] = {"source": rows[0]["source"], "file": CSV_FILE, "types": types,
                                 "severities": severities, "clean": rows[0]["accuracy"],
                                 "mean": float(np.mean(corrupted))}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        runs.write_json(out / EVAL_FILE, report)
        if rows is not None:
            csv = write_csv(rows, out / CSV_FILE)
            plot_corruptions(csv, csv.with_suffix(".png"), title=spec)
    return report
