"""Weight-loss landscapes of LSC groups (RWP, Yu et al. 2022, Section 3, Eq. 7-8, Fig. 2, appendix Fig. 4).

For a checkpoint with weights ``w``: craft PGD adversarial examples on (a fixed, seeded subset of)
the training data, split them into *LSC groups* by their adversarial loss at ``w`` (default edges
``[0, 0.5), [0.5, 1.0), ..., [2.5, 3.0), [3.0, inf)``) and, for each group ``j``, evaluate

    g_j(mu) = mean_{(x', y) in group j} CE(f_{w + mu * d}(x'), y)

on a grid of ``mu``, where the adversarial examples stay fixed and ``d`` is a random Gaussian
direction, *filter-normalized* as in Li et al. (2018): every conv filter and every row of a linear
weight is rescaled to the norm of the corresponding filter/row of ``w``; biases and BatchNorm
parameters get a zero direction (Li et al.'s ``ignore='biasbn'`` choice). The landscape is averaged
over a few seeded directions. The model stays in eval mode throughout (BatchNorm running
statistics fixed), both for the attack and for the landscape.

The *removal rate* view: the fraction of training adversarial examples whose loss is below the
LSC value ``c_min`` (default RWP's, :data:`layerlab.methods.perturbation.C_MIN`), per checkpoint, over training.

Per-epoch checkpoints (``RUN/checkpoints/epoch-E.pt``) are written by the trainer every
``TrainConfig.keep_every`` epochs (``--keep-every N``; the cpu and paper profiles set it).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from layerlab import runs
from layerlab.attacks import eval_mode, pgd
from layerlab.data import to_float
from layerlab.evaluation import load_run_config, model_from_checkpoint
from layerlab.methods.perturbation import C_MIN
from layerlab.plots.lsc import plot_lsc, plot_removal_rate
from layerlab.train import resolve_device, splits_for

DEFAULT_EDGES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, math.inf)
LSC_COLUMNS = ("checkpoint", "epoch", "group", "group_lo", "group_hi", "n_examples", "direction", "mu", "loss")
REMOVAL_COLUMNS = ("checkpoint", "epoch", "n", "c_min", "removal_rate", "mean_loss")
EPOCH_CHECKPOINT = re.compile(r"^epoch-(\d+)\.pt$")


# --------------------------------------------------------------------------------------
# per-epoch checkpoints
# --------------------------------------------------------------------------------------


def epoch_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's per-epoch checkpoints, in epoch order."""
    folder = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("epoch-*.pt") if (m := EPOCH_CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def recorded_epoch_checkpoints(run_dir: str | Path) -> list[Path]:
    """The per-epoch checkpoints a run wrote (from its config's ``keep_every``), whether or not they are still
    on disk: a run restored from a record (:mod:`layerlab.records`) names them without having them."""
    cfg = runs.read_json(Path(run_dir) / "config.json")["config"]
    every, epochs = int(cfg.get("keep_every") or 0), int(cfg["epochs"])
    folder = Path(run_dir) / "checkpoints"
    return [folder / f"epoch-{e}.pt" for e in range(every, epochs + 1, every)] if every else []


def resolve_checkpoints(run_dir: str | Path, tokens: Sequence[str]) -> list[tuple[str, Path]]:
    """(label, path) of each token: ``best``/``last`` of ``run_dir``, a checkpoint file, or a run directory
    (its best.pt)."""
    run_dir = Path(run_dir)
    out = []
    for token in tokens:
        token = token.strip()
        if not token:
            continue
        if token in ("best", "last"):
            out.append((token, run_dir / "checkpoints" / f"{token}.pt"))
            continue
        path = Path(token)
        if path.is_dir():
            out.append((f"{path.name}/best", path / "checkpoints" / "best.pt"))
        elif path.exists():
            same_run = path.resolve().parent == (run_dir / "checkpoints").resolve()
            out.append((path.stem if same_run else f"{path.parent.parent.name}/{path.stem}", path))
        else:
            raise FileNotFoundError(f"checkpoint {token!r} is neither best, last, a checkpoint file nor a run directory")
    if not out:
        raise ValueError("no checkpoints given; use e.g. best,last or paths to .pt files")
    return out


# --------------------------------------------------------------------------------------
# groups, directions, losses
# --------------------------------------------------------------------------------------


def parse_edges(text: str | Sequence[float]) -> tuple[float, ...]:
    """Group edges from ``"0,0.5,1,...,3"`` (a last group ``>= last edge`` is added unless it ends with inf)."""
    values = [float(v) for v in (text.split(",") if isinstance(text, str) else text) if str(v).strip() != ""]
    if not values or (len(values) == 1 and math.isinf(values[0])):
        raise ValueError(f"need at least one finite edge, got {text!r}")
    if not math.isinf(values[-1]):
        values.append(math.inf)
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"group edges must increase strictly, got {values}")
    return tuple(values)


def _edge(value: float) -> str:
    """An edge as text with at least one decimal: ``0.0``, ``0.25``, ``inf``."""
    return "inf" if math.isinf(value) else (f"{value:.1f}" if float(value) == round(value, 1) else f"{value:g}")


def group_label(lo: float, hi: float) -> str:
    """``[0.5,1.0)`` / ``[3.0,inf)``."""
    return f"[{_edge(lo)},{_edge(hi)})"


def group_ids(losses: Tensor, edges: Sequence[float]) -> Tensor:
    """Index of the group ``[edges[k], edges[k+1])`` of each loss; -1 when outside all groups."""
    bounds = torch.tensor(list(edges), dtype=losses.dtype, device=losses.device)
    ids = torch.bucketize(losses, bounds, right=True) - 1
    ids[(losses < bounds[0]) | (losses >= bounds[-1]) | torch.isnan(losses)] = -1
    return ids


@dataclass
class LSCGroup:
    """One LSC group: loss range [lo, hi) and the indices of its examples."""

    index: int
    lo: float
    hi: float
    members: Tensor

    @property
    def label(self) -> str:
        return group_label(self.lo, self.hi)

    def __len__(self) -> int:
        return int(self.members.numel())


def split_groups(losses: Tensor, edges: Sequence[float] = DEFAULT_EDGES) -> list[LSCGroup]:
    """All groups (empty ones included) of ``losses`` by ``edges``."""
    ids = group_ids(losses, edges)
    return [LSCGroup(k, float(edges[k]), float(edges[k + 1]), torch.nonzero(ids == k).flatten())
            for k in range(len(edges) - 1)]


def filter_normalized_direction(weights: nn.Module | Mapping[str, Tensor],
                                generator: torch.Generator) -> dict[str, Tensor]:
    """A Gaussian direction with ||d_filter|| = ||w_filter|| for every conv filter / linear row (Li et al. 2018);
    zero for biases and BatchNorm parameters (1-D tensors). Drawn on the CPU, so it does not depend on the device."""
    named = weights.named_parameters() if isinstance(weights, nn.Module) else weights.items()
    direction = {}
    for name, w in named:
        if w.dim() <= 1:
            direction[name] = torch.zeros_like(w)
            continue
        d = torch.randn(w.shape, generator=generator, dtype=torch.float32).to(device=w.device, dtype=w.dtype)
        w_norm = w.detach().flatten(1).norm(dim=1)
        d_norm = d.flatten(1).norm(dim=1)
        direction[name] = d * (w_norm / (d_norm + 1e-10)).view(-1, *([1] * (w.dim() - 1)))
    return direction


@torch.no_grad()
def per_example_loss(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> Tensor:
    """Cross-entropy of every example, in eval mode, in float32."""
    with eval_mode(model):
        return torch.cat([F.cross_entropy(model(x[i:i + batch_size]).float(), y[i:i + batch_size], reduction="none")
                          for i in range(0, len(y), batch_size)])


def adversarial_examples(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, alpha: float, steps: int,
                         norm: str = "linf", seed: int = 0, batch_size: int = 256, progress: bool = False) -> Tensor:
    """PGD-``steps`` examples (uniform random start, eval mode) for every (x, y), seeded."""
    generator = torch.Generator(x.device).manual_seed(seed)
    chunks = []
    for i in tqdm(range(0, len(y), batch_size), desc="PGD", disable=not progress, leave=False, dynamic_ncols=True):
        chunks.append(pgd(model, x[i:i + batch_size], y[i:i + batch_size], eps=eps, alpha=alpha, steps=steps,
                          norm=norm, generator=generator))
    return torch.cat(chunks)


@torch.no_grad()
def landscape(model: nn.Module, x_adv: Tensor, y: Tensor, groups: Sequence[LSCGroup], mus: Sequence[float],
              directions: int = 3, seed: int = 0, batch_size: int = 256,
              progress: bool = False) -> Tensor:
    """g_j(mu) for every direction, mu and group: a ``directions x len(mus) x len(groups)`` tensor (NaN for empty
    groups). The weights are restored afterwards."""
    params = dict(model.named_parameters())
    original = {k: p.detach().clone() for k, p in params.items()}
    ids = torch.full((len(y),), -1, dtype=torch.long, device=y.device)
    for j, g in enumerate(groups):
        ids[g.members.to(y.device)] = j
    counts = torch.tensor([len(g) for g in groups], dtype=torch.float64)
    result = torch.full((directions, len(mus), len(groups)), math.nan, dtype=torch.float64)
    keep = ids >= 0
    target = ids[keep]
    total = directions * len(mus)
    bar = tqdm(total=total, desc="landscape", disable=not progress, leave=False, dynamic_ncols=True)
    try:
        for k in range(directions):
            d = filter_normalized_direction(original, torch.Generator().manual_seed(seed * 1_000_003 + k))
            for m, mu in enumerate(mus):
                for name, p in params.items():
                    p.copy_(original[name]).add_(d[name], alpha=float(mu))
                losses = per_example_loss(model, x_adv, y, batch_size)
                sums = torch.zeros(len(groups), dtype=torch.float64, device=losses.device)
                sums.index_add_(0, target, losses[keep].double())
                result[k, m] = sums.cpu() / counts
                bar.update()
    finally:
        for name, p in params.items():
            p.copy_(original[name])
        bar.close()
    return result


# --------------------------------------------------------------------------------------
# run-level drivers
# --------------------------------------------------------------------------------------


def training_subset(run_dir: str | Path, n: int | None, seed: int, device: torch.device,
                    data_dir: str | None = None) -> tuple[Tensor, Tensor, object]:
    """``n`` seeded training examples (float [0,1], no augmentation) of the run's own training split, and its config."""
    cfg = load_run_config(run_dir)
    splits = splits_for(cfg, device=device, data_dir=data_dir)
    train = splits.train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    idx = order[: min(n or len(train), len(train))].to(device)
    return to_float(train.images[idx]), train.labels[idx], cfg


def _load(path: Path, device: torch.device) -> tuple[nn.Module, int | None]:
    """The model of a checkpoint, on ``device`` in eval mode, and the epoch it was saved at."""
    state = runs.load_checkpoint(path)
    return model_from_checkpoint(state, device), state["meta"].get("epoch")


def lsc_rows(label: str, epoch: int | None, groups: Sequence[LSCGroup], mus: Sequence[float],
             values: Tensor) -> list[dict]:
    """Tidy lsc.csv rows (non-empty groups only) from a :func:`landscape` tensor."""
    rows = []
    for j, g in enumerate(groups):
        if len(g) == 0:
            continue
        for k in range(values.shape[0]):
            for m, mu in enumerate(mus):
                rows.append({"checkpoint": label, "epoch": epoch, "group": g.label, "group_lo": g.lo,
                             "group_hi": g.hi, "n_examples": len(g), "direction": k, "mu": round(float(mu), 10),
                             "loss": float(values[k, m, j])})
    return rows


def removal_row(label: str, epoch: int | None, losses: Tensor, c_min: float) -> dict:
    """One removal_rate.csv row: fraction of adversarial losses below ``c_min``."""
    return {"checkpoint": label, "epoch": epoch, "n": int(losses.numel()), "c_min": c_min,
            "removal_rate": float((losses < c_min).double().mean()), "mean_loss": float(losses.double().mean())}


def mu_grid(lo: float = -1.0, hi: float = 1.0, points: int = 21) -> list[float]:
    """``points`` evenly spaced values from lo to hi (0 exactly included when the grid is symmetric and odd)."""
    if points < 2:
        raise ValueError(f"need at least 2 grid points, got {points}")
    return [round(lo + (hi - lo) * i / (points - 1), 12) for i in range(points)]


def lsc_run(run_dir: str | Path, checkpoints: Sequence[str] = ("best", "last"), *, n: int | None = 1000,
            edges: Sequence[float] = DEFAULT_EDGES, mus: Sequence[float] | None = None, directions: int = 3,
            seed: int = 0, c_min: float = C_MIN, attack_steps: int = 10, batch_size: int = 256,
            device: str = "auto", data_dir: str | None = None, out: str | Path | None = None,
            progress: bool = True, plot: bool = True) -> dict[str, Path]:
    """LSC landscapes of ``checkpoints`` -> ``lsc.csv`` and removal rates -> ``removal_rate.csv`` (+ figures) in
    ``out`` (default: the run directory). Removal rates use the run's per-epoch checkpoints when it has any,
    else the given checkpoints."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    mus = list(mus) if mus is not None else mu_grid()
    edges = parse_edges(edges)
    x, y, cfg = training_subset(run_dir, n, seed, dev, data_dir)
    attack = {"eps": cfg.eps, "alpha": cfg.alpha, "steps": attack_steps, "norm": cfg.norm, "seed": seed,
              "batch_size": batch_size}
    targets = resolve_checkpoints(run_dir, checkpoints)
    lsc, removal = [], []
    for label, path in tqdm(targets, desc="checkpoints", disable=not progress, dynamic_ncols=True):
        model, epoch = _load(path, dev)
        x_adv = adversarial_examples(model, x, y, progress=progress, **attack)
        losses = per_example_loss(model, x_adv, y, batch_size)
        groups = split_groups(losses, edges)
        values = landscape(model, x_adv, y, groups, mus, directions, seed, batch_size, progress)
        lsc += lsc_rows(label, epoch, groups, mus, values)
        removal.append(removal_row(label, epoch, losses, c_min))
    per_epoch = epoch_checkpoints(run_dir)
    if per_epoch:
        removal = []
        for path in tqdm(per_epoch, desc="removal rate", disable=not progress, dynamic_ncols=True):
            model, epoch = _load(path, dev)
            losses = per_example_loss(model, adversarial_examples(model, x, y, **attack), y, batch_size)
            removal.append(removal_row(path.stem, epoch, losses, c_min))
    paths = {"lsc": out / "lsc.csv", "removal_rate": out / "removal_rate.csv"}
    pd.DataFrame(lsc, columns=list(LSC_COLUMNS)).to_csv(paths["lsc"], index=False)
    pd.DataFrame(removal, columns=list(REMOVAL_COLUMNS)).to_csv(paths["removal_rate"], index=False)
    if plot:
        paths["lsc_plot"] = plot_lsc(paths["lsc"], out / "lsc.png")
        paths["removal_rate_plot"] = plot_removal_rate(paths["removal_rate"], out / "removal_rate.png")
    return paths
