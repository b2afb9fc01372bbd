"""Input and per-block attributions with captum: what each model, and each block of it, relies on.

Input maps: saliency |d logit_y / d x| (Simonyan et al. 2014) and integrated gradients from a
black baseline (Sundararajan et al. 2017) for the true class. Per block: layer integrated
gradients (default) or gradient x activation on the outputs of stem, block1..blockN, summarized
as the share of absolute attribution mass per block, its signed sum (for layer IG this equals
f(x) - f(baseline) at every block: completeness), its mean per unit and how concentrated it is
on the top 10% channels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from layerlab import runs
from layerlab.analysis.minimum import model_labels, models_and_shared_images, predict
from layerlab.attacks import eval_mode
from layerlab.models import block_names
from layerlab.plots.robustness import plot_attributions, plot_block_attributions

LAYER_METHODS = ("lig", "gxa")
CAPTUM_INSTALL = "attributions need captum: pip install captum"


def _captum():
    """The captum.attr module (lazy: an optional dependency)."""
    try:
        from captum import attr
    except ImportError as err:
        raise RuntimeError(CAPTUM_INSTALL) from err
    return attr


def saliency(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """|d logit_target / d x| per input value (captum Saliency)."""
    with eval_mode(model):
        inputs = x.detach().clone().requires_grad_(True)
        return _captum().Saliency(model).attribute(inputs, target=target, abs=True).detach()


def integrated_gradients(model: nn.Module, x: Tensor, target: Tensor, *, steps: int = 32,
                         baseline: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Integrated gradients from ``baseline`` (black image) to x and captum's completeness delta."""
    base = torch.zeros_like(x) if baseline is None else baseline
    with eval_mode(model):
        ig, delta = _captum().IntegratedGradients(model).attribute(
            x, baselines=base, target=target, n_steps=steps, return_convergence_delta=True)
    return ig.detach(), delta.detach()


def layer_attributions(model: nn.Module, x: Tensor, target: Tensor, *, method: str = "lig", steps: int = 16,
                       layers: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Attributions of the outputs of ``layers`` (default stem, block1..N) for the target logit."""
    if method not in LAYER_METHODS:
        raise ValueError(f"unknown layer attribution method {method!r}; use one of {', '.join(LAYER_METHODS)}")
    names = list(layers) if layers is not None else [b for b in block_names(model) if b != "head"]
    modules = [getattr(model, name) for name in names]
    attr = _captum()
    out = {}
    with eval_mode(model):
        for name, module in zip(names, modules):  # one layer per call: captum needs independent layers in a list
            if method == "lig":
                a = attr.LayerIntegratedGradients(model, module).attribute(
                    x, baselines=torch.zeros_like(x), target=target, n_steps=steps)
            else:
                a = attr.LayerGradientXActivation(model, module).attribute(x, target=target)
            out[name] = a.detach()
    return out


def concentration(values: Tensor, top: float = 0.1) -> Tensor:
    """Per example: share of the total (non-negative) mass held by the largest ``top`` fraction of entries."""
    flat = values.flatten(1)
    k = max(1, int(round(top * flat.shape[1])))
    total = flat.sum(1).clamp_min(1e-12)
    return flat.topk(k, dim=1).values.sum(1) / total


def block_stats(attributions: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Per block: abs mass, its share over blocks, signed sum, mean |a| per unit, top-10% channel share."""
    mass = {b: a.flatten(1).abs().sum(1) for b, a in attributions.items()}  # per example
    total = torch.stack(list(mass.values())).sum(0).clamp_min(1e-12)
    stats = {}
    for b, a in attributions.items():
        per_channel = a.abs().flatten(2).sum(2) if a.dim() > 2 else a.abs()
        stats[b] = {"abs_mass": float(mass[b].mean()), "share": float((mass[b] / total).mean()),
                    "signed_sum": float(a.flatten(1).sum(1).mean()), "mean_abs": float(a.abs().mean()),
                    "top10_channel_share": float(concentration(per_channel).mean()), "units": int(a[0].numel())}
    return stats


def channel_map(a: Tensor) -> Tensor:
    """N x H x W magnitude map: sum of |attribution| over colour channels."""
    return a.abs().sum(1)


def attribute_model(model: nn.Module, x: Tensor, y: Tensor, *, ig_steps: int = 32, layer_method: str = "lig",
                    layer_steps: int = 16) -> dict[str, Any]:
    """Saliency and IG maps, their statistics and per-block layer attribution stats of one model."""
    sal = saliency(model, x, y)
    ig, delta = integrated_gradients(model, x, y, steps=ig_steps)
    with torch.no_grad(), eval_mode(model):
        gap = model(x).gather(1, y[:, None])[:, 0] - model(torch.zeros_like(x)).gather(1, y[:, None])[:, 0]
    layers = layer_attributions(model, x, y, method=layer_method, steps=layer_steps)
    return {
        "saliency": channel_map(sal), "ig": channel_map(ig),
        "stats": {"ig_completeness_abs_error": float(delta.abs().mean()),
                  "saliency_top10_share": float(concentration(channel_map(sal)).mean()),
                  "ig_top10_share": float(concentration(channel_map(ig)).mean()),
                  "logit_gap_to_baseline": float(gap.mean())},
        "blocks": block_stats(layers),
    }


def attributions_runs(run_dirs: Sequence[str | Path], out: str | Path, *, n: int = 6, ig_steps: int = 32,
                          layer_method: str = "lig", layer_steps: int = 16, checkpoint: str = "best",
                          device: str = "auto", data_dir: str | None = None) -> dict[str, Path]:
    """Attributions of the same images for several runs: OUT/attributions.{json,npz,png} + block bars."""
    models, splits, idx, x, y = models_and_shared_images(run_dirs, n, checkpoint=checkpoint, device=device, data_dir=data_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"clean": x.cpu().numpy().astype(np.float32)}
    entries = []
    for i, (run, name, model) in enumerate(zip(run_dirs, model_labels(run_dirs), models)):
        res = attribute_model(model, x, y, ig_steps=ig_steps, layer_method=layer_method, layer_steps=layer_steps)
        arrays[f"saliency_{i}"] = res["saliency"].cpu().numpy().astype(np.float32)
        arrays[f"ig_{i}"] = res["ig"].cpu().numpy().astype(np.float32)
        entries.append({"name": name, "run": str(run), "checkpoint": checkpoint,
                        "predictions": predict(model, x).tolist(),
                        **res["stats"], "blocks": res["blocks"]})
    info = {"target": "true label", "ig": {"steps": ig_steps, "baseline": "zeros (black image)"},
            "layer_method": layer_method, "layer_steps": layer_steps if layer_method == "lig" else None,
            "dataset": splits.name, "indices": idx.tolist(), "labels": y.tolist(),
            "block_order": list(entries[0]["blocks"]), "models": entries, "npz": "attributions.npz"}
    np.savez_compressed(out / "attributions.npz", **arrays)
    runs.write_json(out / "attributions.json", info)
    return {"json": out / "attributions.json", "npz": out / "attributions.npz",
            "png": plot_attributions(out / "attributions.json", out / "attributions.png"),
            "blocks_png": plot_block_attributions(out / "attributions.json", out / "attributions_blocks.png")}
