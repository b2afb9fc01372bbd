"""Adversarial weight perturbation as components: AWP (Wu et al., NeurIPS 2020) and RWP (Yu et al., IJCAI 2022).

Both perturb the weights to w + v after the adversarial examples are crafted, take the training
step at w + v, and restore afterwards by subtracting the very same v (stored between the hooks),
exactly as the reference codes do (``perturb`` / ``restore`` with ``+gamma`` / ``-gamma``). They
differ only in how v is built, which one engine (:class:`WeightPerturbation`) covers:

* **AWP** (``csdongxian/AWP``): one ascent step of a proxy copy (SGD, lr 0.01) on the objective's
  mean adversarial loss, then per layer ``v_l = gamma * ||w_l|| * d_l / ||d_l||`` (``diff_in_weights``).
* **RWP** (``ChaojianYu/Robust-Weight-Perturbation``, Algorithm 1): up to K2 ascent steps, each on
  the examples whose adversarial loss at w + v is below ``c_min`` (the Loss Stationary Condition),
  stopping as soon as none qualifies. The raw ascent steps are accumulated (``d = sum_k lr * g_k``)
  and v is rescaled onto the sphere ``||v|| = gamma * ||w||`` after every step. As in the
  reference ``add_into_diff``, that norm is taken over *all* perturbed weights together
  (``scope="model"``); ``scope="layer"`` rescales each layer instead, like AWP.
* **AWP on a loss range** (RWP, Fig. 1c): AWP's single step on only the examples whose adversarial loss lies
  in ``[loss_lo, loss_hi)`` (``AWP(loss_lo=..., loss_hi=...)``), the selection and masked mean of RWP's steps.

Reference details kept: only weight tensors of dimension > 1 (conv / linear) are perturbed; the
selection is strict (``loss < c_min``), the selected losses are summed and divided by the whole
batch size (a masked mean; the scale cancels in the rescaling); the perturbation's forward passes
run in train mode (BatchNorm batch statistics) without touching the model's running statistics (the
reference uses proxy copies; here the forward passes run on private copies of the buffers with
:func:`torch.func.functional_call`). The early stop is equivalent to the reference's fixed 10
iterations: once no example qualifies, v no longer changes, so neither do later iterations.

Frozen parameters (``requires_grad`` False, e.g. under :func:`layerlab.layerwise.apply_update_spec`)
are never perturbed and do not enter the norms, so frozen blocks stay bit-for-bit frozen.
v is computed in fp32 (fp64 for fp64 weights), even under autocast, from the proxy step lr * grad
itself rather than from a difference of weights (the reference's ``(w + lr g) - w`` loses digits),
and the perturbation draws no random numbers.

Under DDP (torchrun) v is computed on the plain module on every rank from synchronized statistics: the
number of qualifying examples is summed over the ranks (so every rank takes the same K2 steps and stops
together) and the proxy gradients are averaged over the ranks (each rank's masked sum is divided by its
shard size, so the average is the global batch's masked mean); v is then identical on every rank.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from layerlab import distributed
from layerlab.methods.base import Component, Method, Objective, Outputs, StepContext, host_reads_free
from layerlab.methods.objectives import PGDAT, TRADES

EPS = 1e-20  # the reference codes' guard in ||w|| / (||d|| + EPS)
SCOPES = ("layer", "model")
C_MIN = 1.7  # RWP's Loss Stationary Condition on CIFAR-10: the default of the factories, presets, LSC and the CLI
RWP_CMIN_SWEEP = (1.0, 1.4, C_MIN, 2.0, 2.3)  # RWP Fig. 3a: the c_min values swept
RWP_K2_SWEEP = (1, 3, 5, 10)  # RWP Fig. 3b: the K2 values swept (10 = the default)
COUNTERS = ("batches", "perturbed_batches", "steps", "qualified_first", "qualified_total", "examples")


def perturbable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights AWP/RWP perturb: trainable ``*.weight`` tensors of dimension > 1 (convs, linears)."""
    return {name: p for name, p in model.named_parameters()
            if p.requires_grad and p.dim() > 1 and name.rsplit(".", 1)[-1] == "weight"}


def _wide(t: Tensor) -> Tensor:
    """``t`` in at least fp32 (fp64 stays fp64): v is never computed in half precision."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def weight_norms(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """||w|| per tensor in at least fp32 (computed once per step: the weights do not move while v is built)."""
    return {n: _wide(w.detach()).norm() for n, w in weights.items()}


def scale_factors(direction: dict[str, Tensor], norms: dict[str, Tensor], gamma: float, scope: str = "layer",
                  scale: float = 1.0) -> dict[str, Tensor]:
    """The 0-d factors ``f`` with ``f * direction = gamma * ||w|| / (||d|| + EPS) * d`` for ``d = scale *
    direction``, the norms per layer or over all tensors together (``norms`` = :func:`weight_norms` of the
    weights). Working with factors, v is materialized only once, after the last ascent step."""
    if scope == "layer":
        return {n: scale * gamma * norms[n] / (scale * _wide(d).norm() + EPS) for n, d in direction.items()}
    if scope == "model":
        w_norm = torch.stack([norms[n] for n in direction]).norm()
        d_norm = scale * torch.stack([_wide(d).norm() for d in direction.values()]).norm()
        factor = scale * gamma * w_norm / (d_norm + EPS)
        return dict.fromkeys(direction, factor)
    raise ValueError(f"unknown perturbation scope {scope!r}; choose one of {list(SCOPES)}")


def rescale(direction: dict[str, Tensor], norms: dict[str, Tensor], gamma: float, scope: str = "layer",
            scale: float = 1.0) -> dict[str, Tensor]:
    """``gamma * ||w|| / (||d|| + EPS) * d`` for ``d = scale * direction``, in at least fp32 (see
    :func:`scale_factors`)."""
    factors = scale_factors(direction, norms, gamma, scope, scale)
    return {n: _wide(d) * factors[n] for n, d in direction.items()}


def add_(params: dict[str, nn.Parameter], v: dict[str, Tensor]) -> None:
    """w <- w + v in place (perturb)."""
    with torch.no_grad():
        for name, t in v.items():
            params[name].add_(t)


def sub_(params: dict[str, nn.Parameter], v: dict[str, Tensor]) -> None:
    """w <- w - v in place (restore: subtracts exactly the stored v that was added)."""
    with torch.no_grad():
        for name, t in v.items():
            params[name].sub_(t)


class _Substituted(nn.Module):
    """``model`` called with some tensors substituted (perturbed weights, private buffer copies)."""

    def __init__(self, model: nn.Module, tensors: dict[str, Tensor]):
        super().__init__()
        self.inner = model
        self.tensors = tensors

    def forward(self, x: Tensor) -> Tensor:
        return functional_call(self.inner, self.tensors, (x,))


class WeightPerturbation(Component):
    """Perturb the weights to w + v for the training step and restore them after the optimizer step.

    v ascends the objective's per-example adversarial loss (``Objective.adv_loss``) for up to
    ``steps`` proxy-SGD steps (lr ``proxy_lr``), on the examples with ``c_low <= loss < c_min`` (a bound
    that is None does not select), and is rescaled to ``||v|| = gamma * ||w||`` per ``scope`` after each
    step. No perturbation before epoch ``warmup_epochs`` (0-based, as ``epoch >= awp_warmup``).
    """

    name = "wp"

    def __init__(self, gamma: float, steps: int = 1, c_min: float | None = None, scope: str = "layer",
                 warmup_epochs: int = 0, proxy_lr: float = 0.01, c_low: float | None = None):
        if gamma < 0 or not math.isfinite(gamma):
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
        if steps < 1:
            raise ValueError(f"steps (K2) must be >= 1, got {steps}")
        if scope not in SCOPES:
            raise ValueError(f"unknown perturbation scope {scope!r}; choose one of {list(SCOPES)}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if proxy_lr <= 0:
            raise ValueError(f"proxy_lr must be > 0, got {proxy_lr}")
        self.gamma = float(gamma)
        self.steps = int(steps)
        self.c_min = None if c_min is None else float(c_min)
        self.c_low = None if c_low is None else float(c_low)
        self.scope = scope
        self.warmup_epochs = int(warmup_epochs)
        self.proxy_lr = float(proxy_lr)
        self._active: tuple[dict[str, nn.Parameter], dict[str, Tensor]] | None = None
        self._last: dict[str, int] = {"steps": 0, "qualified": 0}
        self._epoch: int | None = None
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._totals = dict.fromkeys(COUNTERS, 0)

    # -- building v --------------------------------------------------------------------------------

    def compute(self, model: nn.Module, objective: Objective, x: Tensor, x_adv: Tensor | None,
                y: Tensor) -> tuple[dict[str, Tensor], int | Tensor, list[int | Tensor]]:
        """(v, ascent steps taken, examples qualifying at each evaluated point); v is {} when no step was taken.

        The model (weights and buffers) is left untouched. Under DDP the counts are those of the global batch.
        Where reading a count costs a device synchronisation (:func:`host_reads_free` is False: CUDA, ...) the
        selection stays on the device: all K2 iterations run, as in the reference code (once none qualifies,
        v and hence every later selection stay the same, and a step on no example adds a zero gradient), and
        the counts are 0-d device tensors.
        """
        model = distributed.unwrap(model)
        weights = perturbable(model)
        if not weights or self.gamma == 0:
            return {}, 0, []
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        norms = weight_norms(weights)
        batch = len(y)
        direction: dict[str, Tensor] = {}  # the summed ascent gradients; v = factors * direction
        factors: dict[str, Tensor] = {}
        qualified: list[int | Tensor] = []
        taken: int | Tensor = 0
        host = host_reads_free(y.device)
        for _ in range(self.steps):
            with torch.no_grad():  # w + v in one pass per tensor, without materializing v
                leaves = {n: (torch.addcmul(w.detach(), direction[n], factors[n]) if direction else w.detach())
                          .requires_grad_(True) for n, w in weights.items()}
            losses = objective.adv_loss(_Substituted(model, {**buffers, **leaves}), x, x_adv, y)
            if not self.selective:
                loss, count = losses.sum() / batch, batch * distributed.world_size()
            else:
                keep = self.selected(losses.detach())
                loss = (losses[keep] if host else torch.where(keep, losses, 0.0)).sum() / batch
                count_t = keep.sum()
                distributed.all_reduce_sum_([count_t])  # every rank takes the same number of steps
                count = int(count_t) if host else count_t
            qualified.append(count)
            if host and count == 0:
                break
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            step = {n: torch.zeros_like(_wide(w)) if g is None else _wide(g) for (n, w), g in zip(weights.items(), grads)}
            distributed.all_reduce_mean_(list(step.values()))  # the global batch's ascent direction
            if not direction:  # the gradients are ours: accumulated in place; the proxy steps are proxy_lr * them
                direction = step
            else:
                for n, g in step.items():
                    direction[n].add_(g)
            factors = scale_factors(direction, norms, self.gamma, self.scope, scale=self.proxy_lr)
            taken = taken + 1 if host or not self.selective else taken + (count > 0).long()
        v = {n: d * factors[n] for n, d in direction.items()}
        return v, taken, qualified

    @property
    def selective(self) -> bool:
        """Whether v ascends on a loss-selected subset of the batch (a bound is set) rather than on all of it."""
        return self.c_min is not None or self.c_low is not None

    def selected(self, losses: Tensor) -> Tensor:
        """The examples v ascends on: ``c_low <= loss < c_min`` (each bound only when set)."""
        keep = torch.ones_like(losses, dtype=torch.bool)
        if self.c_low is not None:
            keep &= losses >= self.c_low
        if self.c_min is not None:
            keep &= losses < self.c_min
        return keep

    # -- hooks ------------------------------------------------------------------------------------

    def before_loss(self, model: nn.Module, objective: Objective, x: Tensor, x_adv: Tensor | None,
                    y: Tensor, ctx: StepContext) -> None:
        self._roll_epoch(ctx.epoch)
        self._active = None
        steps, qualified = 0, []
        if ctx.epoch >= self.warmup_epochs:
            v, steps, qualified = self.compute(model, objective, x, x_adv, y)
            if v:
                weights = perturbable(distributed.unwrap(model))
                v = {n: t.to(weights[n].dtype) for n, t in v.items()}
                add_(weights, v)
                self._active = (weights, v)
        self._record(len(y) * distributed.world_size(), steps, qualified)  # global batch (equal shards)

    def extra_loss(self, model: nn.Module, out: Outputs, x: Tensor, y: Tensor, ctx: StepContext) -> None:
        """Adds nothing to the loss; records this step's perturbation steps and qualifying examples in ``out.terms``."""
        device = out.loss.device
        for key in ("steps", "qualified"):  # counts stay tensors where they are (no host read)
            out.terms[f"{self.name}_{key}"] = torch.as_tensor(self._last[key], device=device).float()

    def after_step(self, model: nn.Module, ctx: StepContext) -> None:
        if self._active is not None:
            sub_(*self._active)
            self._active = None

    @property
    def active(self) -> dict[str, Tensor] | None:
        """The v currently added to the weights (between ``before_loss`` and ``after_step``), else None."""
        return None if self._active is None else self._active[1]

    # -- bookkeeping ------------------------------------------------------------------------------

    def _roll_epoch(self, epoch: int) -> None:
        """Reset the per-epoch counters when a new epoch starts."""
        if epoch != self._epoch:
            self._epoch = epoch
            self._counts = dict.fromkeys(COUNTERS, 0)

    def _record(self, batch: int, steps: int | Tensor, qualified: list[int | Tensor]) -> None:
        """Add one step's counts (ints, or 0-d device tensors read only by :meth:`stats`/:meth:`state_dict`)."""
        first = qualified[0] if qualified else 0
        self._last = {"steps": steps, "qualified": first}
        # qualified_total: the counts at the points a step was taken from, i.e. every non-zero count
        row = {"batches": 1, "perturbed_batches": steps > 0, "steps": steps, "qualified_first": first,
               "qualified_total": sum(qualified), "examples": batch}
        for key, value in row.items():
            self._counts[key] += value
            self._totals[key] += value

    def stats(self) -> dict[str, Any]:
        """Counters of the current epoch (reset when an epoch starts) and ``total_*`` over the whole run
        (kept through resume): batches, perturbed batches, ascent steps, examples qualifying at w
        (``qualified_first``) and summed over the steps taken (``qualified_total``), examples seen."""
        totals = {f"total_{k}": v for k, v in _ints(self._totals).items()}
        return {"epoch": self._epoch, **_ints(self._counts), **totals}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "counts": _ints(self._counts), "totals": _ints(self._totals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._epoch = state.get("epoch")
        self._counts = {k: int(state.get("counts", {}).get(k, 0)) for k in COUNTERS}
        self._totals = {k: int(state.get("totals", {}).get(k, 0)) for k in COUNTERS}

    def hparams(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "steps": self.steps, "c_min": self.c_min, "c_low": self.c_low,
                "scope": self.scope, "warmup_epochs": self.warmup_epochs, "proxy_lr": self.proxy_lr}


def _ints(counts: dict[str, int | Tensor]) -> dict[str, int]:
    """Counters as Python ints (reads device-tensor counters: called outside the training step)."""
    return {k: int(v) for k, v in counts.items()}


class AWP(WeightPerturbation):
    """AWP (Wu et al. 2020): one proxy step on the mean adversarial loss, ||v_l|| = gamma ||w_l|| per layer.

    ``loss_lo`` / ``loss_hi`` restrict the step to the examples whose adversarial loss lies in [loss_lo, loss_hi)
    (RWP, Fig. 1c: weight perturbation generated from one LSC loss range); the others contribute nothing to v.
    The default [0, inf) is plain AWP. A batch with no example in the range is not perturbed. As in RWP's
    selection, the whole batch is forwarded (in train mode) and the loss masked, so examples outside the range
    still enter BatchNorm's batch statistics."""

    name = "awp"

    def __init__(self, gamma: float = 0.01, warmup_epochs: int = 0, proxy_lr: float = 0.01, loss_lo: float = 0.0,
                 loss_hi: float = math.inf):
        if math.isnan(loss_lo) or math.isnan(loss_hi) or not 0.0 <= loss_lo < loss_hi:
            raise ValueError(f"the AWP loss range needs 0 <= loss_lo < loss_hi (loss_hi may be inf), "
                             f"got [{loss_lo}, {loss_hi})")
        super().__init__(gamma, steps=1, c_min=None if math.isinf(loss_hi) else loss_hi, scope="layer",
                         warmup_epochs=warmup_epochs, proxy_lr=proxy_lr, c_low=loss_lo if loss_lo > 0 else None)


class RWP(WeightPerturbation):
    """RWP (Yu et al. 2022): up to K2 steps on examples with loss < c_min; ||v|| = gamma ||w|| (scope)."""

    name = "rwp"

    def __init__(self, gamma: float = 0.01, c_min: float = C_MIN, steps: int = 10, scope: str = "model",
                 warmup_epochs: int = 0, proxy_lr: float = 0.01):
        if c_min is None or math.isnan(c_min):
            raise ValueError(f"c_min must be a number (use inf to perturb on every example), got {c_min}")
        super().__init__(gamma, steps=steps, c_min=c_min, scope=scope, warmup_epochs=warmup_epochs,
                         proxy_lr=proxy_lr)


def _awp(gamma: float = 0.01, warmup_epochs: int = 0, proxy_lr: float = 0.01, loss_lo: float = 0.0,
         loss_hi: float = math.inf) -> Method:
    return Method("awp", PGDAT(), [AWP(gamma, warmup_epochs, proxy_lr, loss_lo, loss_hi)])


def _trades_awp(beta: float = 6.0, gamma: float = 0.005, warmup_epochs: int = 0, proxy_lr: float = 0.01) -> Method:
    return Method("trades-awp", TRADES(beta=beta), [AWP(gamma, warmup_epochs, proxy_lr)])


def _rwp(gamma: float = 0.01, c_min: float = C_MIN, steps: int = 10, scope: str = "model",
         warmup_epochs: int = 0, proxy_lr: float = 0.01) -> Method:
    return Method("rwp", PGDAT(), [RWP(gamma, c_min, steps, scope, warmup_epochs, proxy_lr)])


def _trades_rwp(beta: float = 6.0, gamma: float = 0.005, c_min: float = C_MIN, steps: int = 10,
                scope: str = "model", warmup_epochs: int = 0, proxy_lr: float = 0.01) -> Method:
    return Method("trades-rwp", TRADES(beta=beta), [RWP(gamma, c_min, steps, scope, warmup_epochs, proxy_lr)])


METHODS = {
    "awp": (_awp, "AT-AWP (Wu et al. 2020): PGD-AT + adversarial weight perturbation, gamma=0.01"),
    "at-awp": (_awp, "alias of awp"),
    "trades-awp": (_trades_awp, "TRADES-AWP (Wu et al. 2020): TRADES beta=6 + AWP gamma=0.005"),
    "rwp": (_rwp, f"AT-RWP (Yu et al. 2022): PGD-AT + robust weight perturbation, gamma=0.01, c_min={C_MIN:g}, K2=10"),
    "at-rwp": (_rwp, "alias of rwp"),
    "trades-rwp": (_trades_rwp, f"TRADES-RWP (Yu et al. 2022): TRADES beta=6 + RWP gamma=0.005, c_min={C_MIN:g}"),
}

# The TRADES scripts of both reference codes use --awp-warmup 10 on 1-based epochs (perturb when
# epoch >= 10), i.e. 9 unperturbed epochs: warmup_epochs=9 here (0-based, perturb when epoch >= 9).
# c_min per data set from the RWP paper (the released SVHN script hard-codes 1.7).
PRESETS = {
    "awp-cifar10": ("awp", {"gamma": 0.01}, {}, "AT-AWP, gamma=0.01 (Wu et al. 2020)"),
    "trades-awp-cifar10": ("trades-awp", {"beta": 6.0, "gamma": 0.005, "warmup_epochs": 9}, {},
                           "TRADES-AWP, beta=6, gamma=0.005, AWP from the 10th epoch (Wu et al. 2020)"),
    "rwp-cifar10": ("rwp", {"gamma": 0.01, "c_min": C_MIN, "steps": 10}, {}, f"AT-RWP, gamma=0.01, c_min={C_MIN:g}, K2=10"),
    "rwp-svhn": ("rwp", {"gamma": 0.01, "c_min": 2.2, "steps": 10}, {"dataset": "svhn"},
                 "AT-RWP on SVHN, gamma=0.01, c_min=2.2, K2=10"),
    "rwp-cifar100": ("rwp", {"gamma": 0.01, "c_min": 4.0, "steps": 10}, {"dataset": "cifar100"},
                     "AT-RWP on CIFAR-100, gamma=0.01, c_min=4.0, K2=10"),
    "trades-rwp-cifar10": ("trades-rwp", {"beta": 6.0, "gamma": 0.005, "c_min": C_MIN, "steps": 10,
                                          "warmup_epochs": 9}, {},
                           f"TRADES-RWP, beta=6, gamma=0.005, c_min={C_MIN:g}, K2=10, RWP from the 10th epoch"),
}
