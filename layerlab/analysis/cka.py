"""Linear CKA between layer representations (Kornblith et al. 2019), as in CURE Fig. 3 and 12.

Estimator: the minibatch CKA of Nguyen, Raghu & Kornblith (2021, "Do wide and deep networks learn
the same things?"). For each minibatch of ``b >= 4`` examples and every layer, features are flattened
per example (no pooling: the whole activation map is the representation) and the linear Gram matrix
``K = X X^T`` is formed in float64. The unbiased HSIC_1 estimator of Song et al. (2012),

    HSIC_1(K, L) = [tr(K~L~) + 1^T K~ 1 * 1^T L~ 1 / ((b-1)(b-2)) - 2/(b-2) * 1^T K~ L~ 1] / (b(b-3)),

with ``K~``, ``L~`` the Gram matrices with zeroed diagonals, is computed for every pair of layers and
summed (float64) over batches, together with HSIC_1(K, K) and HSIC_1(L, L). Then

    CKA = mean HSIC(K, L) / sqrt(mean HSIC(K, K) * mean HSIC(L, L)).

Memory holds one forward pass, a b x b Gram matrix per layer (taken inside the forward hooks, so no
layer's activations are kept) and a layers x layers accumulator, whatever the number of
examples. Two comparisons are provided:

* ``nat-vs-adv``: one model's layers on natural inputs (rows) vs. the same model's layers on PGD
  adversarial inputs crafted against that model (columns) -- the paper's view;
* ``same-inputs``: layers of model A (rows) vs. layers of model B (columns; B = A when omitted) on the
  same inputs, natural or adversarial (adversarial inputs are always crafted against model A).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from layerlab import runs
from layerlab.attacks import eval_mode, pgd
from layerlab.config import EPS, PGD_STEP
from layerlab.data import ImageSet, to_float
from layerlab.evaluation import load_run, load_run_config, model_from_checkpoint
from layerlab.models import BasicBlock, Bottleneck, PreActBlock, WideBasicBlock, _unwrap, block_names

__all__ = [
    "LAYER_SETS",
    "MIN_BATCH",
    "MODES",
    "CKAAccumulator",
    "CKAResult",
    "FeatureRecorder",
    "cka_matrix",
    "cka_run",
    "gram",
    "hsic1",
    "hsic1_pairs",
    "hsic1_self",
    "resolve_layers",
]

MIN_BATCH = 4
"""The unbiased HSIC_1 estimator divides by b(b-3) and (b-2): batches need at least 4 examples."""
MODES: tuple[str, ...] = ("nat-vs-adv", "same-inputs")
LAYER_SETS: tuple[str, ...] = ("blocks", "residual-blocks", "all-convs")
ESTIMATOR = "linear CKA, minibatch unbiased HSIC_1 (Song et al. 2012; Nguyen, Raghu & Kornblith 2021)"
_RESIDUAL_TYPES = (BasicBlock, Bottleneck, PreActBlock, WideBasicBlock)


# ---------------------------------------------------------------------------
# Estimator
# ---------------------------------------------------------------------------


def gram(features: Tensor) -> Tensor:
    """Linear Gram matrix ``X X^T`` (float64) of per-example flattened features ``X`` (b x ...)."""
    x = features.detach().flatten(1).to(torch.float64)
    return x @ x.T


def _zero_diag(grams: Tensor) -> Tensor:
    """Copies of a stack of Gram matrices (m x b x b) with zeroed diagonals."""
    return grams * (1 - torch.eye(grams.shape[-1], dtype=grams.dtype, device=grams.device))


def _check_batch(b: int) -> None:
    if b < MIN_BATCH:
        raise ValueError(f"the unbiased HSIC estimator needs batches of at least {MIN_BATCH} examples, got {b}")


def hsic1_pairs(ks: Tensor, ls: Tensor) -> Tensor:
    """Unbiased HSIC_1 for every pair of a stack of Gram matrices ``ks`` (p x b x b) and ``ls`` (q x b x b): p x q.

    Uses ``tr(K~L~) = <K~, L~>_F`` and ``1^T K~ L~ 1 = (K~1).(L~1)`` (symmetric Gram matrices), so all
    pairs cost two matrix products instead of p*q b x b products.
    """
    b = ks.shape[-1]
    _check_batch(b)
    kt, lt = _zero_diag(ks.to(torch.float64)), _zero_diag(ls.to(torch.float64))
    trace = kt.flatten(1) @ lt.flatten(1).T
    rk, rl = kt.sum(2), lt.sum(2)
    sk, sl = rk.sum(1), rl.sum(1)
    middle = sk[:, None] * sl[None, :] / ((b - 1) * (b - 2))
    right = 2.0 / (b - 2) * (rk @ rl.T)
    return (trace + middle - right) / (b * (b - 3))


def hsic1_self(ks: Tensor) -> Tensor:
    """Unbiased HSIC_1(K, K) for each Gram matrix of a stack (m x b x b): m values."""
    b = ks.shape[-1]
    _check_batch(b)
    kt = _zero_diag(ks.to(torch.float64))
    rk = kt.sum(2)
    sk = rk.sum(1)
    return ((kt * kt).sum((1, 2)) + sk * sk / ((b - 1) * (b - 2)) - 2.0 / (b - 2) * (rk * rk).sum(1)) / (b * (b - 3))


def hsic1(k: Tensor, l: Tensor) -> float:
    """Unbiased HSIC_1 of two b x b Gram matrices (Song et al. 2012)."""
    return float(hsic1_pairs(k[None], l[None])[0, 0])


@dataclass
class CKAAccumulator:
    """Running float64 sums of HSIC_1(K_i, L_j), HSIC_1(K_i, K_i), HSIC_1(L_j, L_j) over minibatches.

    Its size is ``rows x cols`` (+ ``rows`` + ``cols``) whatever the number of examples.
    """

    rows: int
    cols: int
    sum_xy: np.ndarray = field(init=False)
    sum_xx: np.ndarray = field(init=False)
    sum_yy: np.ndarray = field(init=False)
    batches: int = 0
    examples: int = 0

    def __post_init__(self) -> None:
        self.sum_xy = np.zeros((self.rows, self.cols), dtype=np.float64)
        self.sum_xx = np.zeros(self.rows, dtype=np.float64)
        self.sum_yy = np.zeros(self.cols, dtype=np.float64)

    def update(self, xs: Sequence[Tensor], ys: Sequence[Tensor] | None = None) -> None:
        """Add one minibatch: ``xs`` are the row layers' features, ``ys`` the column layers' (None = ``xs``)."""
        self.update_grams(torch.stack([gram(x) for x in xs]),
                          None if ys is None else torch.stack([gram(y) for y in ys]))

    def update_grams(self, ks: Tensor, ls: Tensor | None = None) -> None:
        """Add one minibatch given as Gram matrices (layers x b x b) of the row and column layers."""
        ls = ks if ls is None else ls
        if ks.shape[0] != self.rows or ls.shape[0] != self.cols:
            raise ValueError(f"expected {self.rows} x {self.cols} layers, got {ks.shape[0]} x {ls.shape[0]}")
        if ks.shape[1] != ls.shape[1]:
            raise ValueError(f"row and column features hold {ks.shape[1]} and {ls.shape[1]} examples")
        self.sum_xy += hsic1_pairs(ks, ls).cpu().numpy()
        xx = hsic1_self(ks).cpu().numpy()
        self.sum_xx += xx
        self.sum_yy += xx if ls is ks else hsic1_self(ls).cpu().numpy()
        self.batches += 1
        self.examples += int(ks.shape[1])

    def cka(self) -> np.ndarray:
        """The CKA matrix (rows x cols); NaN where a layer's mean self-HSIC is not positive (e.g. constant)."""
        if self.batches == 0:
            raise ValueError("no minibatch was accumulated")
        denom = np.outer(self.sum_xx, self.sum_yy)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = self.sum_xy / np.sqrt(np.where(denom > 0, denom, np.nan))
        return out


# ---------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------


def resolve_layers(model: nn.Module, layers: str | Sequence[str] = "blocks") -> list[str]:
    """Module names to record, in forward order.

    ``"blocks"``: stem, block1..blockN, head (logits). ``"residual-blocks"``: stem, every residual unit
    (e.g. each BasicBlock), head. ``"all-convs"``: every Conv2d, then head. A list: those module names.
    """
    net = _unwrap(model)
    modules = dict(net.named_modules())
    if isinstance(layers, str):
        if layers == "blocks":
            return block_names(net)
        if layers == "residual-blocks":
            units = [name for name, m in net.named_modules() if isinstance(m, _RESIDUAL_TYPES)]
            return ["stem", *units, "head"]
        if layers == "all-convs":
            return [name for name, m in net.named_modules() if isinstance(m, nn.Conv2d)] + ["head"]
        raise ValueError(f"unknown layer set {layers!r}; use one of {', '.join(LAYER_SETS)} or a list of module names")
    names = list(layers)
    unknown = [n for n in names if n not in modules or n == ""]
    if unknown:
        raise ValueError(f"unknown module names {unknown}; "
                         f"e.g. {', '.join(block_names(net))}, block1.0, block1.0.conv1")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate layer names in {names}")
    return names


class FeatureRecorder:
    """Forward hooks that keep each named module's output (detached) during :meth:`features` only.

    Outside :meth:`features` (e.g. during PGD's forward passes) the hooks record nothing. ``transform``
    (e.g. :func:`gram`) is applied inside the hook, so only its result is kept, not the activation.
    """

    def __init__(self, model: nn.Module, names: Sequence[str],
                 transform: Callable[[Tensor], Tensor] | None = None) -> None:
        self.names = list(names)
        self.transform = transform
        self.outputs: dict[str, Tensor] = {}
        self._recording = False
        self._modules = dict(_unwrap(model).named_modules())
        self._handles: list[Any] = []

    def _hook(self, name: str):
        def record(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
            if not self._recording:
                return
            if name in self.outputs:
                raise RuntimeError(f"module {name!r} ran twice in one forward pass; pick another layer")
            out = output.detach()
            self.outputs[name] = out if self.transform is None else self.transform(out)
        return record

    def __enter__(self) -> FeatureRecorder:
        self._handles = [self._modules[n].register_forward_hook(self._hook(n)) for n in self.names]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def features(self, model: nn.Module, x: Tensor) -> list[Tensor]:
        """Each named module's output for inputs ``x``, in ``names`` order."""
        self.outputs, self._recording = {}, True
        try:
            model(x)
        finally:
            self._recording = False
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise RuntimeError(f"modules {missing} did not run in the forward pass")
        feats, self.outputs = [self.outputs[n] for n in self.names], {}
        return feats


# ---------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------


@dataclass
class CKAResult:
    """A CKA matrix: ``matrix[i, j]`` compares row layer ``rows[i]`` with column layer ``cols[j]``."""

    matrix: np.ndarray
    rows: list[str]
    cols: list[str]
    n: int
    settings: dict[str, Any]

    def diagonal(self) -> dict[str, float]:
        """CKA of each layer with the same-named column layer (layers present in both)."""
        col = {c: j for j, c in enumerate(self.cols)}
        return {r: float(self.matrix[i, col[r]]) for i, r in enumerate(self.rows) if r in col}

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (NaN entries become null)."""
        matrix = [[None if not math.isfinite(v) else float(v) for v in row] for row in self.matrix.tolist()]
        return {"matrix": matrix, "rows": self.rows, "cols": self.cols, "n": self.n, **self.settings}


def _batches(data: ImageSet | Iterable, n: int | None, batch_size: int) -> Iterator[tuple[Tensor, Tensor | None]]:
    """``(x, y)`` batches of the first ``n`` examples.

    For an ImageSet a remainder smaller than :data:`MIN_BATCH` joins the previous batch so every
    example is used; batches of an iterable are truncated at ``n`` and must hold >= MIN_BATCH examples.
    """
    if isinstance(data, ImageSet):
        total = len(data) if n is None else min(n, len(data))
        starts = list(range(0, total, batch_size))
        if len(starts) > 1 and total - starts[-1] < MIN_BATCH:
            starts.pop()
        bounds = starts[1:] + [total]
        for s, e in zip(starts, bounds):
            yield to_float(data.images[s:e]), data.labels[s:e]
        return
    seen = 0
    for item in data:
        x, y = (item, None) if isinstance(item, Tensor) else (item[0], item[1])
        if n is not None:
            if seen >= n:
                return
            x, y = x[: n - seen], (None if y is None else y[: n - seen])
        _check_batch(len(x))
        seen += len(x)
        yield x, y


def _n_batches(data: ImageSet | Iterable, n: int | None, batch_size: int) -> int | None:
    """Number of batches :func:`_batches` yields, when known (for the progress bar)."""
    if isinstance(data, ImageSet):
        total = len(data) if n is None else min(n, len(data))
        return max(1, total // batch_size + (total % batch_size >= MIN_BATCH))
    return len(data) if hasattr(data, "__len__") else None


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def cka_matrix(model_a: nn.Module, model_b: nn.Module | None, data: ImageSet | Iterable, *,
               mode: str | None = None, adversarial: bool | None = None, eps: float = EPS,
               alpha: float = PGD_STEP, steps: int = 10, norm: str = "linf", n: int | None = 1000,
               batch_size: int = 100, layers: str | Sequence[str] = "blocks",
               layers_b: str | Sequence[str] | None = None, seed: int = 0, progress: bool = True) -> CKAResult:
    """Linear CKA (minibatch unbiased HSIC) between layer representations.

    ``mode`` defaults to ``"nat-vs-adv"`` when ``model_b`` is None (rows: ``model_a`` on natural inputs,
    columns: ``model_a`` on PGD inputs crafted against it) and to ``"same-inputs"`` otherwise (rows:
    ``model_a``, columns: ``model_b`` or ``model_a`` again, on the same natural inputs, or adversarial
    ones crafted against ``model_a`` when ``adversarial=True``). ``data`` is an ImageSet or an iterable
    of ``(x, y)`` batches (x in [0, 1]; bare ``x`` tensors are fine for natural inputs). PGD is untargeted,
    CE, random start, one restart, seeded by ``seed``. Features are not pooled: each layer's full output
    is flattened per example. ``layers``/``layers_b`` name the row/column layers (see :func:`resolve_layers`;
    ``layers_b`` defaults to ``layers``). Both models run in eval mode.
    """
    mode = mode or ("nat-vs-adv" if model_b is None else "same-inputs")
    if mode not in MODES:
        raise ValueError(f"unknown CKA mode {mode!r}; use one of {', '.join(MODES)}")
    if mode == "nat-vs-adv":
        if model_b is not None:
            raise ValueError("nat-vs-adv compares one model with itself; use mode='same-inputs' for two models")
        if adversarial is False:
            raise ValueError("nat-vs-adv always compares natural with adversarial inputs; "
                             "use mode='same-inputs' for natural inputs only")
        adversarial = True
    adversarial = bool(adversarial)
    if batch_size < MIN_BATCH:
        raise ValueError(f"batch_size must be at least {MIN_BATCH} (unbiased HSIC estimator), got {batch_size}")
    if n is not None and n < MIN_BATCH:
        raise ValueError(f"n must be at least {MIN_BATCH}, got {n}")
    other = model_a if model_b is None else model_b
    rows = resolve_layers(model_a, layers)
    cols = rows if model_b is None and layers_b is None else resolve_layers(other, layers_b or layers)
    identical = mode == "same-inputs" and other is model_a and cols == rows
    device = _device(model_a)
    generator = torch.Generator(device).manual_seed(seed)
    acc = CKAAccumulator(len(rows), len(cols))
    bar = tqdm(_batches(data, n, batch_size), total=_n_batches(data, n, batch_size), desc=f"CKA {mode}",
               disable=not progress, leave=False, dynamic_ncols=True)
    # The hooks keep each layer's b x b Gram matrix, never its activation: memory holds one forward pass.
    with eval_mode(model_a), eval_mode(other), FeatureRecorder(model_a, rows, gram) as rec_a, \
            FeatureRecorder(other, cols, gram) as rec_b:
        for x, y in bar:
            x = x.to(device)
            x_adv = None
            if adversarial:
                if y is None:
                    raise ValueError("adversarial inputs need labels: pass (x, y) batches or an ImageSet")
                x_adv = pgd(model_a, x, y.to(device), eps=eps, alpha=alpha, steps=steps, norm=norm,
                            generator=generator)
            if mode == "nat-vs-adv":
                acc.update_grams(torch.stack(rec_a.features(model_a, x)), torch.stack(rec_b.features(model_a, x_adv)))
            else:
                inputs = x_adv if adversarial else x
                ks = torch.stack(rec_a.features(model_a, inputs))
                acc.update_grams(ks, None if identical else torch.stack(rec_b.features(other, inputs.to(_device(other)))))
    attack = ({"name": "pgd", "norm": norm, "eps": eps, "alpha": alpha, "steps": steps, "restarts": 1,
               "random_start": True, "loss": "ce", "crafted_on": "model_a", "seed": seed} if adversarial else None)
    if mode == "nat-vs-adv":
        row_label, col_label = "natural inputs", "adversarial inputs"
    else:
        kind = "adversarial" if adversarial else "natural"
        row_label, col_label = f"model A ({kind})", f"model {'A' if model_b is None else 'B'} ({kind})"
    settings = {"mode": mode, "adversarial": adversarial, "attack": attack, "estimator": ESTIMATOR,
                "pooling": "none (full activation flattened per example)", "batch_size": batch_size,
                "batches": acc.batches, "layers": layers if isinstance(layers, str) else list(layers),
                "row_label": row_label, "col_label": col_label}
    return CKAResult(acc.cka(), list(rows), list(cols), acc.examples, settings)


def cka_run(run: str | Path, other: str | Path | None = None, *, mode: str | None = None,
            adversarial: bool | None = None, n: int | None = 1000, batch_size: int = 100,
            checkpoint: str = "best", layers: str | Sequence[str] = "blocks", steps: int | None = None,
            seed: int = 0, device: str = "auto", data_dir: str | None = None, out: str | Path | None = None,
            progress: bool = True) -> tuple[CKAResult, Path]:
    """CKA of a run's model (vs. ``other`` run's model) on its test split; writes ``cka.json`` (or ``out``).

    The attack uses the run's eps/alpha/norm and ``steps`` PGD steps (default: the run's ``eval_steps``).
    """
    model_a, cfg, splits = load_run(run, checkpoint, device, data_dir)
    model_b = None
    if other is not None:
        cfg_b = load_run_config(other)
        if cfg_b.dataset != cfg.dataset:
            raise ValueError(f"runs use different datasets ({cfg.dataset} vs {cfg_b.dataset}); "
                             f"compare runs of one dataset")
        state = runs.load_checkpoint(Path(other) / "checkpoints" / f"{checkpoint}.pt")
        model_b = model_from_checkpoint(state, _device(model_a))
    steps = cfg.eval_steps if steps is None else steps
    result = cka_matrix(model_a, model_b, splits.test, mode=mode, adversarial=adversarial, eps=cfg.eps,
                        alpha=cfg.alpha, steps=steps, norm=cfg.norm, n=n, batch_size=batch_size, layers=layers,
                        seed=seed, progress=progress)
    if result.settings["mode"] == "nat-vs-adv":
        labels = (f"{Path(run).name}: natural inputs", f"{Path(run).name}: adversarial inputs")
    else:
        kind = "adversarial" if result.settings["adversarial"] else "natural"
        labels = (f"{Path(run).name} ({kind})", f"{Path(other or run).name} ({kind})")
    result.settings.update({"row_label": labels[0], "col_label": labels[1], "checkpoint": checkpoint,
                            "run": str(run), "other": None if other is None else str(other),
                            "dataset": splits.name, "model": cfg.model,
                            "model_other": None if other is None else cfg_b.model, "seed": seed})
    path = Path(out) if out is not None else Path(run) / "cka.json"
    runs.write_json(path, result.to_json())
    return result, path
