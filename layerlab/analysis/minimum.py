"""Minimum L-inf perturbation that flips a model's prediction (CURE Fig. 8, Appendix D.1).

Two estimators: foolbox 3's FMN attack (Pintor et al. 2021, a minimum-norm attack) and a
bisection over eps with our own L-inf PGD on the CW margin (deterministic: starts at x). With
``method="both"`` (default) the smaller successful eps of the two is reported per image, so each
serves as a check and a fallback for the other. Every reported adversarial example is verified:
the model's label differs from the true one and ||x_adv - x||_inf <= eps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from layerlab import runs
from layerlab.attacks import cw_margin_loss, eval_mode, pgd_perturb
from layerlab.data import to_float
from layerlab.evaluation import load_run, load_run_config, load_run_model
from layerlab.plots.robustness import plot_minpert
from layerlab.progress import bar as progress_bar
from layerlab.train import resolve_device

METHODS = ("both", "fmn", "bisection")
FOOLBOX_INSTALL = "the FMN estimator needs foolbox 3: pip install foolbox"


@torch.no_grad()
def predict(model: nn.Module, x: Tensor) -> Tensor:
    """Predicted labels in eval mode."""
    with eval_mode(model):
        return model(x).argmax(1)


def linf(x: Tensor, x_adv: Tensor) -> Tensor:
    """Per-example L-inf distance."""
    return (x_adv - x).flatten(1).abs().amax(1)


def pgd_at(model: nn.Module, x: Tensor, y: Tensor, eps: Tensor, *, steps: int = 50) -> Tensor:
    """Deterministic L-inf PGD on the CW margin with a per-example eps (step 2.5 eps / steps, start at x).

    ``eps`` is a length-N tensor; pgd_perturb's L-inf projection and step broadcast it per example.
    """
    view = eps.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    with eval_mode(model):
        num_classes = model(x[:1]).shape[1]
        return pgd_perturb(model, x, cw_margin_loss(y, num_classes), eps=view, alpha=2.5 * view / steps,
                           steps=steps, norm="linf", init=None)


def flips(model: nn.Module, x_adv: Tensor, y: Tensor) -> Tensor:
    """Whether each example is misclassified."""
    return predict(model, x_adv) != y


def bisection_min_eps(model: nn.Module, x: Tensor, y: Tensor, *, eps_max: float = 32 / 255, iters: int = 12,
                      steps: int = 50, progress: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Smallest eps (per example, to eps_max / 2**iters) at which our PGD flips the label.

    Returns (eps, x_adv, found); examples already misclassified get eps 0; examples not flipped
    at ``eps_max`` get found=False, eps=nan and x_adv=x. ``progress``: a bar over the bisection steps.
    """
    n = len(x)
    lo = torch.zeros(n, device=x.device)
    hi = torch.full((n,), float(eps_max), device=x.device)
    best = x.detach().clone()
    wrong = flips(model, x, y)
    x_max = pgd_at(model, x, y, hi, steps=steps)
    found = flips(model, x_max, y) | wrong
    best[found] = x_max[found]
    for _ in progress_bar(range(iters), desc="bisection", progress=progress, unit="step"):
        mid = (lo + hi) / 2
        x_mid = pgd_at(model, x, y, mid, steps=steps)
        ok = flips(model, x_mid, y) & found & ~wrong
        best[ok] = x_mid[ok]
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok | ~found, lo, mid)
    eps = torch.where(found, hi, torch.full_like(hi, float("nan")))
    eps[wrong] = 0.0
    best[wrong] = x[wrong]
    best[~found] = x[~found]
    return eps, best, found


def fmn_min_eps(model: nn.Module, x: Tensor, y: Tensor, *, steps: int = 100) -> tuple[Tensor, Tensor, Tensor]:
    """foolbox's L-inf FMN: (eps = ||x_adv - x||_inf, x_adv, success verified with our own forward pass)."""
    try:
        import foolbox as fb
    except ImportError as err:
        raise RuntimeError(FOOLBOX_INSTALL) from err
    with eval_mode(model):
        fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=x.device)
        _, x_adv, _ = fb.attacks.LInfFMNAttack(steps=steps)(fmodel, x, y, epsilons=None)
    x_adv = x_adv.detach().clamp(0, 1)
    ok = flips(model, x_adv, y)
    eps = torch.where(ok, linf(x, x_adv), torch.full((len(x),), float("nan"), device=x.device))
    return eps, torch.where(ok.view(-1, 1, 1, 1), x_adv, x), ok


def minimum_perturbation(model: nn.Module, x: Tensor, y: Tensor, *, method: str = "both",
                         eps_max: float = 32 / 255, iters: int = 12, steps: int = 50,
                         fmn_steps: int = 100, progress: bool = False) -> dict[str, Any]:
    """Per-image minimal L-inf perturbation: eps, adversarial images, predictions and which estimator won.

    ``eps`` is the measured ||x_adv - x||_inf of the returned example (nan where none was found);
    ``eps_fmn`` / ``eps_bisection`` are each estimator's own value. ``progress``: a bar over the bisection.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    n = len(x)
    nan = torch.full((n,), float("nan"), device=x.device)
    eps_fmn, adv_fmn, ok_fmn = (fmn_min_eps(model, x, y, steps=fmn_steps) if method != "bisection"
                                else (nan, x, torch.zeros(n, dtype=torch.bool, device=x.device)))
    need_bisection = method != "fmn" or not bool(ok_fmn.all())
    if need_bisection:
        eps_bis, adv_bis, ok_bis = bisection_min_eps(model, x, y, eps_max=eps_max, iters=iters, steps=steps,
                                                     progress=progress)
        if method == "fmn":  # fallback only where FMN failed
            ok_bis = ok_bis & ~ok_fmn
            eps_bis = torch.where(ok_bis, eps_bis, nan)
    else:
        eps_bis, adv_bis, ok_bis = nan, x, torch.zeros(n, dtype=torch.bool, device=x.device)
    use_fmn = ok_fmn & (~ok_bis | (eps_fmn <= eps_bis))
    use_bis = ok_bis & ~use_fmn
    x_adv = torch.where(use_fmn.view(-1, 1, 1, 1), adv_fmn, torch.where(use_bis.view(-1, 1, 1, 1), adv_bis, x))
    eps = torch.where(use_fmn | use_bis, linf(x, x_adv), nan)  # the size of the perturbation actually returned
    return {"eps": eps, "x_adv": x_adv, "found": use_fmn | use_bis, "eps_fmn": eps_fmn, "eps_bisection": eps_bis,
            "source": ["fmn" if f else "bisection" if b else "none"
                       for f, b in zip(use_fmn.tolist(), use_bis.tolist())],
            "orig_pred": predict(model, x), "adv_pred": predict(model, x_adv)}


# --------------------------------------------------------------------------------------
# several run directories
# --------------------------------------------------------------------------------------


def model_labels(run_dirs: Sequence[str | Path]) -> list[str]:
    """Short, unique names for runs: the directory name, or parent/name when names repeat."""
    names = [Path(r).name for r in run_dirs]
    if len(set(names)) == len(names):
        return names
    long = [f"{Path(r).parent.name}/{Path(r).name}" for r in run_dirs]
    return long if len(set(long)) == len(long) else [f"{i}:{n}" for i, n in enumerate(names)]


def load_models(run_dirs: Sequence[str | Path], *, checkpoint: str = "best", device: str = "auto",
                data_dir: str | None = None):
    """Models of several runs plus the first run's splits; all runs must share the data set and classes."""
    if not run_dirs:
        raise ValueError("give at least one run directory")
    first, cfg, splits = load_run(run_dirs[0], checkpoint, device, data_dir)
    models = [first]
    for run in run_dirs[1:]:
        other = load_run_config(run)
        if other.dataset != cfg.dataset:
            raise ValueError(f"{run} was trained on {other.dataset}, {run_dirs[0]} on {cfg.dataset}: "
                             f"compare runs of one data set")
        model = load_run_model(run, checkpoint, resolve_device(device))
        if model.num_classes != splits.num_classes:
            raise ValueError(f"{run} has {model.num_classes} classes, the data {splits.num_classes}")
        models.append(model)
    return models, splits


def common_images(models: Sequence[nn.Module], images: Tensor, labels: Tensor, n: int) -> Tensor:
    """Indices of the first ``n`` test images every model classifies correctly (else the first ``n``)."""
    ok = torch.ones(len(labels), dtype=torch.bool, device=labels.device)
    for start in range(0, len(labels), 256):
        x = to_float(images[start:start + 256])
        for model in models:
            ok[start:start + 256] &= predict(model, x) == labels[start:start + 256]
    idx = torch.nonzero(ok).flatten()[:n]
    return idx if len(idx) >= min(n, len(labels)) else torch.arange(min(n, len(labels)), device=labels.device)


def models_and_shared_images(run_dirs: Sequence[str | Path], n: int, *, checkpoint: str = "best",
                             device: str = "auto", data_dir: str | None = None):
    """The runs' models, their data splits, and the indices, float images and labels of the first ``n`` test
    images every model classifies correctly."""
    models, splits = load_models(run_dirs, checkpoint=checkpoint, device=device, data_dir=data_dir)
    idx = common_images(models, splits.test.images, splits.test.labels, n)
    return models, splits, idx, to_float(splits.test.images[idx]), splits.test.labels[idx]


def _value(v: float) -> float | None:
    """JSON-safe float (nan -> None)."""
    return None if v != v else float(v)


def minpert_runs(run_dirs: Sequence[str | Path], out: str | Path, *, n: int = 8, method: str = "both",
                     eps_max: float = 32 / 255, iters: int = 12, steps: int = 50, fmn_steps: int = 100,
                     checkpoint: str = "best", device: str = "auto", data_dir: str | None = None,
                     progress: bool = False) -> dict[str, Path]:
    """Minimal perturbations of the same images for several runs: OUT/minpert.{json,npz,png} (``progress``: a bar
    over the models and one over each model's bisection)."""
    models, splits, idx, x, y = models_and_shared_images(run_dirs, n, checkpoint=checkpoint, device=device, data_dir=data_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"clean": x.cpu().numpy().astype(np.float32)}
    entries = []
    labelled = progress_bar(list(zip(run_dirs, model_labels(run_dirs), models)), desc="minimum perturbation",
                            progress=progress, leave=True, unit="model")
    for i, (run, name, model) in enumerate(labelled):
        labelled.set_postfix_str(name)
        res = minimum_perturbation(model, x, y, method=method, eps_max=eps_max, iters=iters, steps=steps,
                                   fmn_steps=fmn_steps, progress=progress)
        arrays[f"adv_{i}"] = res["x_adv"].cpu().numpy().astype(np.float32)
        dist = linf(x, res["x_adv"]).tolist()
        images = [{"index": int(k), "label": int(lab), "orig_pred": int(o), "adv_pred": int(a),
                   "eps": _value(e), "eps_255": None if _value(e) is None else e * 255, "linf": d,
                   "eps_fmn": _value(ef), "eps_bisection": _value(eb), "source": src}
                  for k, lab, o, a, e, d, ef, eb, src in zip(idx.tolist(), y.tolist(), res["orig_pred"].tolist(),
                                                             res["adv_pred"].tolist(), res["eps"].tolist(), dist,
                                                             res["eps_fmn"].tolist(), res["eps_bisection"].tolist(),
                                                             res["source"])]
        found = [e["eps_255"] for e in images if e["eps_255"] is not None]
        entries.append({"name": name, "run": str(run), "checkpoint": checkpoint, "images": images,
                        "median_eps_255": float(np.median(found)) if found else None,
                        "found": len(found)})
    info = {"method": method, "eps_max": eps_max, "bisection": {"iters": iters, "pgd_steps": steps, "loss": "cw"},
            "fmn_steps": fmn_steps, "dataset": splits.name, "class_names": splits.class_names,
            "indices": idx.tolist(), "labels": y.tolist(), "models": entries, "npz": "minpert.npz"}
    np.savez_compressed(out / "minpert.npz", **arrays)
    runs.write_json(out / "minpert.json", info)
    png = plot_minpert(out / "minpert.json", out / "minpert.png")
    return {"json": out / "minpert.json", "npz": out / "minpert.npz", "png": png}
