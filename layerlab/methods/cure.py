"""CURE: Conserve-Update-Revise (Gowda, Zonooz & Arani, ICLR 2024), and CURE^Eff (its Appendix B).

Algorithm 1 of the paper, as objective + components of the shared trainer step:

* :class:`CUREObjective` crafts x_adv = x + argmax_delta [CE(f(x+delta), y) + alpha KL(f(x) || f(x+delta))]
  (Eq. 4 as written in Alg. 1 step 4; PGD in eval mode, uniform random start) and minimizes
  L_adv = CE(f(x_nat), y) + KL(p(x_nat) || p(x_adv)) (Eq. 5, batch-mean KL as TRADES' outer term).
* :class:`RGPMask` ("conserve / update") keeps, per parameter tensor, the p% of entries with the lowest
  Robust Gradient Prominence RGP(w) = alpha |dCE(x_nat)/dw| + (1 - alpha) |dCE(x_adv)/dw| (Eq. 6) fixed.
* :class:`Revision` ("revise") keeps theta_rev, a stochastic moving average of theta (Eq. 7), and adds
  gamma * L_CR, L_CR = KL(p(x_nat; rev) || p(x_nat; theta)) + KL(p(x_adv; rev) || p(x_adv; theta)) (Eq. 8).

CURE starts from a naturally trained model: pass the ST run's checkpoint as ``--init`` (``cfg.init``);
the method itself does nothing special about it. ``cure-eff`` needs none: its first epochs are plain
natural training inside the same epoch budget (:class:`Warmup`).

Component order matters and is fixed by the factories: ``[RGPMask, Revision]``, so that after the
optimizer step the masked entries are restored *before* theta_rev averages theta.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layerlab import distributed
from layerlab.attacks import ce_loss, eval_mode, kl_loss, pgd_perturb
from layerlab.methods.base import Component, Method, Objective, Outputs, StepContext, host_reads_free
from layerlab.methods.objectives import trades_kl

MASK_SCOPES = ("conv", "conv+linear", "all")
# The paper's ResNet-18 CIFAR-10 values (Table 9), read by the factories, the presets and the gallery.
RGP_P = 30.0  # percent of each tensor's weights (lowest prominence) kept fixed
RGP_ALPHA = 0.1  # weight of the natural gradient in RGP (Eq. 6) and of the KL term in the attack
R_DECAYS = ("none", "linear", "cosine", "step")
ATTACKS = ("alg1", "kl")  # the inner maximization: Alg. 1 step 4 (CE + alpha KL), or Eq. 4 / released code (KL)
MASK_RULES = ("paper", "code")  # RGP mask: Eq. 6 on |gradients| (paper), or the released code's rgp_soft
REVISION_BN = ("eval", "train")  # BatchNorm of theta_rev: averaged statistics, or batch statistics (code)


@dataclass(frozen=True)
class Warmup:
    """CURE^Eff's natural warm-up: the first ``epochs`` epochs train CE on clean inputs only.

    ``epochs=None`` means automatic: 10% of the run (rounded), at least 1 when the run has >= 2 epochs.
    The length is capped at ``total - 1`` so at least one CURE epoch runs. Plain CURE uses ``Warmup(0)``.
    """

    epochs: int | None = 0

    def length(self, total_epochs: int) -> int:
        """Warm-up epochs of a run of ``total_epochs`` epochs."""
        if total_epochs < 2:
            return 0
        wanted = max(1, round(0.1 * total_epochs)) if self.epochs is None else self.epochs
        return min(wanted, total_epochs - 1)

    def active(self, ctx: StepContext) -> bool:
        """True while the step is part of the natural warm-up."""
        return ctx.epoch < self.length(ctx.epochs)

    def progress(self, ctx: StepContext) -> float:
        """Fraction of the CURE (post-warm-up) phase done, in [0, 1)."""
        start = self.length(ctx.epochs) / max(1, ctx.epochs)
        return max(0.0, (ctx.progress - start) / max(1e-12, 1.0 - start))

    def describe(self) -> int | str:
        return "auto" if self.epochs is None else self.epochs


class CUREObjective(Objective):
    """Alg. 1 steps 4-5: craft x_adv, then minimize L_adv = CE(x_nat) + beta * KL(p(x_nat) || p(x_adv)).

    ``attack``: "alg1" maximizes CE + alpha * KL from a uniform start (Alg. 1 step 4 as written); "kl"
    maximizes the KL alone from x + 0.001 N(0, 1) (Eq. 4, the TRADES attack the released code runs).
    ``beta``: the KL weight of L_adv (Eq. 5 writes 1; the released code's ``trades_beta`` default is 5).
    """

    name = "cure"

    def __init__(self, alpha: float = RGP_ALPHA, warmup: Warmup = Warmup(0), beta: float = 1.0, attack: str = "alg1"):
        if attack not in ATTACKS:
            raise ValueError(f"unknown CURE attack {attack!r}; choose one of {list(ATTACKS)}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.alpha, self.warmup, self.beta, self.attack = alpha, warmup, float(beta), attack

    def craft(self, model: nn.Module, x: Tensor, y: Tensor, ctx: StepContext) -> Tensor | None:
        if self.warmup.active(ctx):
            return None
        a = ctx.attack
        with eval_mode(model):
            with torch.no_grad():
                clean = model(x)
            kl = kl_loss(clean)
            if self.attack == "kl":
                inner, init = kl, "normal"
            else:
                ce = ce_loss(y)
                inner, init = (lambda logits: ce(logits) + self.alpha * kl(logits)), "uniform"
            return pgd_perturb(model, x, inner, eps=a.eps, alpha=a.alpha, steps=a.steps, norm=a.norm, init=init,
                               generator=ctx.generator, shard=ctx.shard)

    def loss(self, model: nn.Module, x: Tensor, x_adv: Tensor | None, y: Tensor, ctx: StepContext) -> Outputs:
        if x_adv is None:  # CURE^Eff warm-up: natural training
            logits = model(x)
            return Outputs(F.cross_entropy(logits, y), logits_nat=logits)
        logits_nat, logits_adv = model(x), model(x_adv)  # two passes: BatchNorm sees each batch alone
        ce = F.cross_entropy(logits_nat, y)
        kl = trades_kl(logits_nat, logits_adv)
        return Outputs(ce + self.beta * kl, logits_nat, logits_adv, x_adv, {"ce_nat": ce, "kl": kl})

    def adv_loss(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> Tensor:
        logits_nat, logits_adv = model(x), model(x_adv)
        kl = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits_nat, 1), reduction="none").sum(1)
        return F.cross_entropy(logits_nat, y, reduction="none") + self.beta * kl

    def hparams(self) -> dict[str, Any]:
        return {"rgp_alpha": self.alpha, "beta": self.beta, "attack": self.attack,
                "warmup_epochs": self.warmup.describe()}


def masked_parameters(model: nn.Module, scope: str) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters the RGP mask applies to: conv weights ("conv"), also linear weights
    ("conv+linear"), or every trainable parameter incl. BatchNorm affine and biases ("all")."""
    if scope not in MASK_SCOPES:
        raise ValueError(f"unknown mask_scope {scope!r}; choose one of {list(MASK_SCOPES)}")
    if scope == "all":
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    kinds: tuple[type, ...] = (nn.modules.conv._ConvNd,) + ((nn.Linear,) if scope == "conv+linear" else ())
    chosen = {id(m.weight) for m in model.modules() if isinstance(m, kinds) and isinstance(m.weight, nn.Parameter)}
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) in chosen]


def block_conv1_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The first convolution weight of every residual block (``blockN.<i>.conv1.weight``): the tensors the
    released code's mask applies to (the stem's convolution is not one of them)."""
    return [(n, p) for n, p in model.named_parameters()
            if p.requires_grad and n.startswith("block") and n.endswith(".conv1.weight")]


def mask_count(percent: float, numel: int) -> int:
    """How many of ``numel`` entries a p% mask holds: p% of numel rounded half up."""
    return min(numel, math.floor(percent / 100.0 * numel + 0.5))


def kth_smallest(score: Tensor, k: int, nonnegative: bool = False) -> Tensor:
    """The k-th smallest entry of ``score`` (1-based), as a 0-d tensor on the score's device.

    On the CPU, non-negative float32 scores (RGP is a sum of absolute values) take an exact two-pass radix
    select on their bit patterns, which order like the values: a histogram of the high 16 bits finds the bin
    that holds the k-th value, a histogram of the low 16 bits inside that bin finds the value. That is linear
    in the number of entries and ~4x faster than ``torch.topk``/``kthvalue`` there. Other devices and dtypes
    use ``torch.kthvalue`` (no host sync). ``nonnegative=True`` (the caller knows) skips the sign check."""
    flat = score.reshape(-1)
    if (not host_reads_free(flat.device) or flat.dtype != torch.float32
            or (not nonnegative and bool((flat < 0).any()))):
        return torch.kthvalue(flat, k).values
    bits = flat.view(torch.int32)
    high = bits >> 16
    cum_high = torch.bincount(high, minlength=1 << 16).cumsum(0)
    want = torch.tensor([k], device=flat.device, dtype=cum_high.dtype)
    b = torch.searchsorted(cum_high, want)  # first high bin whose cumulative count reaches k
    below_bin = torch.where(b > 0, cum_high[(b - 1).clamp_min(0)], torch.zeros_like(b))
    cum_low = torch.bincount(bits[high == b] & 0xFFFF, minlength=1 << 16).cumsum(0)
    low = torch.searchsorted(cum_low, want - below_bin)
    return ((b << 16) | low).to(torch.int32).view(torch.float32).reshape(())


def lowest_k_mask(score: Tensor, k: int, nonnegative: bool = False) -> Tensor:
    """Boolean mask (shape of ``score``) of exactly ``k`` entries with the lowest (finite) score, computed on
    the score's device; ties at the threshold go to the lowest flat (row-major) indices. On accelerators
    nothing is copied to the host (ties are resolved unconditionally); on the CPU the tie step runs only
    when there are ties beyond the k-th value."""
    flat = score.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(score, dtype=torch.bool)
    kth = kth_smallest(flat, k, nonnegative)
    mask = flat <= kth
    extra = mask.sum() - k  # entries tied with the k-th value beyond the k wanted (usually 0)
    if not host_reads_free(flat.device) or bool(extra > 0):
        tied = flat == kth
        drop = tied & (torch.cumsum(tied.flip(0), 0, dtype=torch.int64) <= extra).flip(0)
        mask &= ~drop  # keep the lowest-index tied entries, drop the highest
    return mask.view(score.shape)


class RGPMask(Component):
    """Alg. 1 steps 6 and 11: per parameter tensor, the p% entries with the lowest RGP get a ZERO update.

    RGP(w) = alpha |dCE(x_nat)/dw| + (1 - alpha) |dCE(x_adv)/dw| (Eq. 6), from ``torch.autograd.grad`` on
    the forward graphs the objective already built (no extra forwards), after the total loss has been
    backpropagated as usual (the order changes no value; see :meth:`gradients`). Exactly round(p% * numel)
    entries per masked tensor; ties broken by index.

    Mask semantics: the masked entries' gradients are set to 0 (the paper's step 11, so momentum buffers
    and gradient instruments only see the gradients of updated entries) *and* their values are saved
    before ``optimizer.step()`` and restored after it, because SGD momentum and weight decay would still
    move an entry with a zero gradient. Masked entries therefore do not change at all in that step (their
    momentum buffers still accumulate the weight-decay term, as for any entry with a zero gradient).

    Under DDP the two ``autograd.grad`` gradients are not reduced by DDP, so they are averaged over the
    ranks here before RGP is computed: every rank then ranks the global batch's gradients and masks the
    same entries (the total loss's gradients are averaged by DDP in ``loss.backward()``).

    ``mask_scope``: "conv" (default: every convolution weight incl. stem and shortcuts; the paper's
    gradient analysis, Figs. 6/10, is about conv layers), "conv+linear" (also the classifier weight), "all"
    (also BatchNorm affine parameters and biases). Frozen parameters (requires_grad False) are never touched.
    ``rule="paper"`` (default) follows the paper (Eq. 6, Alg. 1); ``rule="code"`` runs the released code's
    ``rgp_soft`` mode instead (:meth:`_code_mask`: the signed alpha * g(CE_nat) + (1 - alpha) * g(KL), the
    blocks' ``conv1`` weights only, gradients zeroed but weights not held).
    """

    name = "rgp"

    def __init__(self, p: float = RGP_P, alpha: float = RGP_ALPHA, mask_scope: str = "conv", warmup: Warmup = Warmup(0),
                 rule: str = "paper"):
        if not 0.0 <= p <= 100.0:
            raise ValueError(f"p must be a percentage in [0, 100], got {p}")
        if mask_scope not in MASK_SCOPES:
            raise ValueError(f"unknown mask_scope {mask_scope!r}; choose one of {list(MASK_SCOPES)}")
        if rule not in MASK_RULES:
            raise ValueError(f"unknown mask_rule {rule!r}; choose one of {list(MASK_RULES)}")
        self.p, self.alpha, self.mask_scope, self.warmup = float(p), float(alpha), mask_scope, warmup
        self.rule = rule
        self.params: list[tuple[str, nn.Parameter]] = []
        self.masks: dict[str, Tensor] = {}  # last step's masks (True = conserved), for analysis
        self._saved: list[tuple[nn.Parameter, Tensor, Tensor]] = []

    def setup(self, model: nn.Module) -> None:
        self.params = (block_conv1_parameters(model) if self.rule == "code"
                       else masked_parameters(model, self.mask_scope))

    def backward(self, model: nn.Module, out: Outputs, loss: Tensor, x: Tensor, y: Tensor,
                 ctx: StepContext) -> bool:
        if (self.p == 0 or not self.params or self.warmup.active(ctx)
                or out.logits_nat is None or out.logits_adv is None):
            return False
        loss.backward(retain_graph=True)
        if self.rule == "code":
            self._code_mask(out, y)
            return True
        g_nat, g_adv = self.gradients(out, y)
        self.masks, self._saved = {}, []
        with torch.no_grad():
            for (name, p), gn, ga in zip(self.params, g_nat, g_adv):
                # The gradients are ours (from autograd.grad): scored in place, without copies.
                score = gn.abs_().mul_(self.alpha) if gn is not None else torch.zeros_like(p)
                if ga is not None:
                    score.add_(ga.abs_(), alpha=1.0 - self.alpha)
                mask = lowest_k_mask(score, mask_count(self.p, p.numel()), nonnegative=True)
                if p.grad is not None:
                    p.grad.masked_fill_(mask, 0.0)
                self.masks[name] = mask
                self._saved.append((p, mask, p.detach().clone()))
        return True

    def gradients(self, out: Outputs, y: Tensor) -> tuple[tuple[Tensor | None, ...], tuple[Tensor | None, ...]]:
        """dCE(x_nat)/dw, dCE(x_adv)/dw of the masked tensors (rank-averaged), taken after ``loss.backward``: each
        pass frees its graph as it goes, so its temporaries reuse that memory instead of faulting in fresh pages."""
        params = [p for _, p in self.params]
        g_nat = torch.autograd.grad(F.cross_entropy(out.logits_nat, y), params, allow_unused=True)
        g_adv = torch.autograd.grad(F.cross_entropy(out.logits_adv, y), params, allow_unused=True)
        distributed.all_reduce_mean_([g for g in (*g_nat, *g_adv) if g is not None])  # same mask on every rank
        return g_nat, g_adv

    def _code_mask(self, out: Outputs, y: Tensor) -> None:
        """The released code's ``rgp_soft`` mask: score = alpha g(CE(x_nat)) + (1 - alpha) g(KL) (signed, the
        adversarial term is L_adv's KL, not CE(x_adv)); entries whose score lies strictly below the tensor's
        p-th percentile (linear interpolation, as ``np.percentile``) get a zero gradient. Their values are not
        held: momentum and weight decay still move them, as in the code."""
        params = [p for _, p in self.params]
        g_nat = torch.autograd.grad(F.cross_entropy(out.logits_nat, y), params, retain_graph=True,
                                    allow_unused=True)
        g_kl = torch.autograd.grad(out.terms["kl"], params, allow_unused=True)
        distributed.all_reduce_mean_([g for g in (*g_nat, *g_kl) if g is not None])
        self.masks, self._saved = {}, []
        with torch.no_grad():
            for (name, p), gn, gk in zip(self.params, g_nat, g_kl):
                score = torch.zeros_like(p) if gn is None else gn.mul_(self.alpha)
                if gk is not None:
                    score.add_(gk, alpha=1.0 - self.alpha)
                mask = score < torch.quantile(score.reshape(-1).float(), self.p / 100.0).to(score.dtype)
                if p.grad is not None:
                    p.grad.masked_fill_(mask, 0.0)
                self.masks[name] = mask

    def after_step(self, model: nn.Module, ctx: StepContext) -> None:
        with torch.no_grad():
            for p, mask, before in self._saved:
                torch.where(mask, before, p.detach(), out=p.detach())
        self._saved = []

    def hparams(self) -> dict[str, Any]:
        return {"p": self.p, "mask_scope": self.mask_scope, "rule": self.rule}


def revision_rate(r: float, decay: str, progress: float) -> float:
    """The revision probability at ``progress`` in [0, 1] of the CURE phase under schedule ``decay``."""
    if decay == "none":
        return r
    if decay == "linear":
        return r * (1.0 - progress)
    if decay == "cosine":
        return r * 0.5 * (1.0 + math.cos(math.pi * progress))
    if decay == "step":
        return r if progress < 0.5 else 0.0
    raise ValueError(f"unknown r_decay {decay!r}; choose one of {list(R_DECAYS)}")


def revision_decay(d: float, step: int, ramp: bool) -> float:
    """The decay of Eq. 7 at the ``step``-th optimizer step (1-based): ``d``, or with ``ramp`` the released
    code's ``min(1 - 1/(step + 1), d)`` (0.5 after the first step, 0.9 after the ninth), so theta_rev
    follows theta closely early on and averages over a horizon of at most 1/(1 - d) steps later."""
    return min(1.0 - 1.0 / (step + 1), d) if ramp else d


def _frozen_bn(module: nn.Module) -> bool:
    """A BatchNorm whose affine parameters are all frozen (apply_update_spec also freezes its statistics)."""
    params = list(module.parameters(recurse=False))
    return bool(params) and not any(p.requires_grad for p in params)


class Revision(Component):
    """Alg. 1 steps 7-10: the revision model theta_rev and the consistency loss gamma * L_CR (Eqs. 7-8).

    theta_rev is a deep copy of the model at setup (eval mode, no gradients; for CURE^Eff it is re-synced
    to theta when the warm-up ends). After each optimizer step, with probability r_t (a uniform draw from
    ``ctx.generator``, made every step, so runs are reproducible and r does not shift other randomness),
    theta_rev <- d * theta_rev + (1 - d) * theta for every trainable parameter (Eq. 7). Updating after
    step t with theta_{t+1} equals Alg. 1's update before the loss of step t+1. theta itself is only read.

    BatchNorm buffers: running mean/var are averaged with the same d when the update fires (the statistics
    of an averaged network are approximated by the averaged statistics, and copying theta's current ones
    would pair lagging weights with current statistics); ``num_batches_tracked`` is copied. Buffers of
    frozen BatchNorms and frozen parameters are skipped (they equal theta's anyway).

    Under DDP every rank draws from an identically seeded generator and rank 0's draw is used by all, so
    all ranks revise together; after a revision the BatchNorm buffers are broadcast from rank 0 (they differ
    when each rank keeps its own BatchNorm statistics, i.e. on CPU), so theta_rev is identical everywhere.

    ``r_decay`` ("gradually decay the revision rate", App. F.1): "none" r; "linear" r(1 - t) (default: the
    simplest gradual decay to 0 at the end, "minimizing revisions when the network stabilizes", mean rate
    r/2); "cosine" r(1 + cos(pi t))/2; "step" r until half of training, then 0 (what the released code's
    ``ema_dynamic`` amounts to: it halves r at every step after epoch 100 of 200). t is the progress of the
    CURE phase (after any warm-up). gamma = 0 skips theta_rev's forward passes entirely.
    """

    name = "revision"

    def __init__(self, gamma: float = 1.0, r: float = 0.2, d: float = 0.999, r_decay: str = "linear",
                 warmup: Warmup = Warmup(0), d_ramp: bool = False, bn: str = "eval"):
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if not 0.0 <= r <= 1.0 or not 0.0 <= d <= 1.0:
            raise ValueError(f"r and d must lie in [0, 1], got r={r}, d={d}")
        if r_decay not in R_DECAYS:
            raise ValueError(f"unknown r_decay {r_decay!r}; choose one of {list(R_DECAYS)}")
        if not isinstance(d_ramp, bool):
            raise ValueError(f"d_ramp must be true or false, got {d_ramp!r}")
        if bn not in REVISION_BN:
            raise ValueError(f"unknown revision_bn {bn!r}; choose one of {list(REVISION_BN)}")
        self.gamma, self.r, self.d, self.r_decay, self.warmup = float(gamma), float(r), float(d), r_decay, warmup
        self.d_ramp, self.bn = d_ramp, bn
        self.model: nn.Module | None = None
        self.synced = False
        self.revisions = 0  # how many times Eq. 7 fired
        self.draws = 0  # how many steps drew whether to revise
        self._params: list[tuple[Tensor, Tensor]] = []
        self._buffers: list[tuple[Tensor, Tensor]] = []
        self._targets: list[Tensor] | None = None  # this step's p(.; rev), from before_loss to extra_loss

    def setup(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._params = [(rp, p) for rp, p in zip(self.model.parameters(), model.parameters()) if p.requires_grad]
        self._buffers = []
        for rm, m in zip(self.model.modules(), model.modules()):
            if self.bn == "eval" and isinstance(m, nn.modules.batchnorm._BatchNorm) and not _frozen_bn(m):
                self._buffers += list(zip(rm.buffers(recurse=False), m.buffers(recurse=False)))
        self.synced = self.warmup.epochs == 0  # CURE^Eff re-syncs theta_rev to theta when its warm-up ends

    def rate(self, ctx: StepContext) -> float:
        """The revision probability r_t of this step."""
        return revision_rate(self.r, self.r_decay, self.warmup.progress(ctx))

    def before_loss(self, model: nn.Module, objective: Objective, x: Tensor, x_adv: Tensor | None, y: Tensor,
                    ctx: StepContext) -> None:
        if not self.synced and not self.warmup.active(ctx):
            self.model.load_state_dict(distributed.unwrap(model).state_dict())
            self.synced = True
        self._targets = None if self.gamma == 0 or self.warmup.active(ctx) else self.targets(x, x_adv)

    @torch.no_grad()
    def targets(self, x: Tensor, x_adv: Tensor | None) -> list[Tensor]:
        """p(x_nat; rev) and p(x_adv; rev), taken before the training forwards: theta_rev does not change within
        a step, and with no training graph alive yet their temporaries reuse freed memory (no page faults)."""
        inputs = [x] + ([x_adv] if x_adv is not None else [])
        self.model.train(self.bn == "train")
        try:
            return [F.softmax(self.model(batch).float(), dim=1) for batch in inputs]
        finally:
            self.model.eval()

    def consistency(self, out: Outputs, targets: list[Tensor]) -> Tensor:
        """L_CR (Eq. 8): batch-mean KL(p(.; rev) || p(.; theta)) on x_nat and x_adv, against :meth:`targets`."""
        logits = [out.logits_nat] + ([out.logits_adv] if out.logits_adv is not None else [])
        total = 0.0
        for target, step_logits in zip(targets, logits, strict=True):
            total = total + F.kl_div(F.log_softmax(step_logits.float(), dim=1), target, reduction="batchmean")
        return total

    def extra_loss(self, model: nn.Module, out: Outputs, x: Tensor, y: Tensor, ctx: StepContext) -> Tensor | None:
        if self.gamma == 0 or self.warmup.active(ctx):
            return None
        if self._targets is None:
            raise RuntimeError("Revision.before_loss computes the revision targets; call it before extra_loss")
        cr = self.consistency(out, self._targets)
        self._targets = None
        out.terms["cr"] = cr.detach()
        return self.gamma * cr

    @torch.no_grad()
    def revise(self, d: float | None = None) -> None:
        """Eq. 7: theta_rev <- d theta_rev + (1 - d) theta (BatchNorm statistics likewise under ``bn="eval"``,
        counters copied); ``d`` defaults to the configured decay."""
        d = self.d if d is None else d
        for rp, p in self._params:
            rp.mul_(d).add_(p.detach(), alpha=1.0 - d)
        for rb, b in self._buffers:
            if rb.is_floating_point():
                rb.mul_(d).add_(b, alpha=1.0 - d)
            else:
                rb.copy_(b)
        distributed.broadcast_([rb for rb, _ in self._buffers])  # rank 0's statistics when BN is per rank
        self.revisions += 1

    def after_step(self, model: nn.Module, ctx: StepContext) -> None:
        if self.warmup.active(ctx):
            return
        gen = ctx.generator
        draw = torch.rand((), generator=gen, device=gen.device)
        distributed.broadcast_([draw])  # every rank revises, or none (a no-op on one process)
        self.draws += 1
        decay = revision_decay(self.d, self.draws, self.d_ramp)
        if host_reads_free(draw.device):
            if float(draw) < self.rate(ctx):
                self.revise(decay)
            return
        # No host read: Eq. 7 is applied every step and kept where the draw (compared in fp64, as the host
        # branch compares) says so; the count of revisions becomes a device tensor.
        fire = draw.double() < self.rate(ctx)
        tensors = [t for t, _ in self._params + self._buffers]
        held = [t.clone() for t in tensors]
        self.revise(decay)  # counts itself as a revision: replaced by the draw's verdict below
        for t, before in zip(tensors, held):
            torch.where(fire, t, before, out=t)
        self.revisions = self.revisions - 1 + fire.long()

    def extra_models(self) -> dict[str, nn.Module]:
        return {"revision": self.model} if self.model is not None else {}

    def state_dict(self) -> dict[str, Any]:
        return {"model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                "synced": self.synced, "revisions": self.revisions, "draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.synced = bool(state["synced"])
        self.revisions, self.draws = int(state["revisions"]), int(state["draws"])

    def hparams(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "r": self.r, "d": self.d, "r_decay": self.r_decay, "d_ramp": self.d_ramp,
                "bn": self.bn}


def _check_alpha(rgp_alpha: float) -> None:
    if not 0.0 <= rgp_alpha <= 1.0:
        raise ValueError(f"rgp_alpha must lie in [0, 1] (RGP weight of the natural gradient), got {rgp_alpha}")


def _build(name: str, warmup: Warmup, p: float, rgp_alpha: float, gamma: float, r: float, d: float, r_decay: str,
           mask_scope: str, beta: float, attack: str, d_ramp: bool, revision_bn: str, mask_rule: str) -> Method:
    _check_alpha(rgp_alpha)
    return Method(name, CUREObjective(rgp_alpha, warmup, beta, attack),
                  [RGPMask(p, rgp_alpha, mask_scope, warmup, mask_rule),
                   Revision(gamma, r, d, r_decay, warmup, d_ramp, revision_bn)])


def _cure(p: float = RGP_P, rgp_alpha: float = RGP_ALPHA, gamma: float = 1.0, r: float = 0.2, d: float = 0.999,
          r_decay: str = "linear", mask_scope: str = "conv", beta: float = 1.0, attack: str = "alg1",
          d_ramp: bool = False, revision_bn: str = "eval", mask_rule: str = "paper") -> Method:
    """CURE with the paper's ResNet-18 CIFAR-10 values as defaults (Table 9). ``beta``, ``attack``, ``r_decay``,
    ``d_ramp``, ``revision_bn`` and ``mask_rule`` choose between the paper's text (the defaults) and the
    released code (preset ``cure-resnet18-cifar10-code``; the README's CURE table lists each)."""
    return _build("cure", Warmup(0), p, rgp_alpha, gamma, r, d, r_decay, mask_scope, beta, attack, d_ramp,
                  revision_bn, mask_rule)


def _cure_eff(p: float = RGP_P, rgp_alpha: float = RGP_ALPHA, gamma: float = 1.0, r: float = 0.2, d: float = 0.999,
              r_decay: str = "linear", mask_scope: str = "conv", beta: float = 1.0, attack: str = "alg1",
              d_ramp: bool = False, revision_bn: str = "eval", mask_rule: str = "paper",
              warmup_epochs: int | None = None) -> Method:
    """CURE^Eff: ``warmup_epochs`` of natural training (None = 10% of the run, >= 1), then CURE."""
    if warmup_epochs is not None and (not isinstance(warmup_epochs, int) or warmup_epochs < 0):
        raise ValueError(f"warmup_epochs must be a non-negative integer or null (auto), got {warmup_epochs!r}")
    return _build("cure-eff", Warmup(warmup_epochs), p, rgp_alpha, gamma, r, d, r_decay, mask_scope, beta, attack,
                  d_ramp, revision_bn, mask_rule)


METHODS = {
    "cure": (_cure, "CURE (Gowda et al. ICLR 2024): RGP mask + revision model; start from an ST model (--init)"),
    "cure-eff": (_cure_eff, "CURE^Eff: natural warm-up (default 10% of epochs) then CURE, no pre-trained model"),
}

_R18 = {"p": RGP_P, "rgp_alpha": RGP_ALPHA, "gamma": 1.0, "r": 0.2, "d": 0.999}
# How the released code (NeurAI-Lab/CURE) runs CURE where it differs from the paper's text (README table).
CODE_ARGS = {"beta": 5.0, "attack": "kl", "r_decay": "none", "d_ramp": True, "revision_bn": "train",
             "mask_rule": "code"}
# CURE Table 7: run-name suffix -> (RGP on, revision on, CURE arguments that turn them off); "" is CURE itself.
TABLE7_ABLATION = {
    "-p0-gamma0": (False, False, {"p": 0, "gamma": 0}),
    "-gamma0": (True, False, {"gamma": 0}),
    "-p0": (False, True, {"p": 0}),
    "": (True, True, {}),
}
_PAPER = "Table 9 (lr 0.1, wd 5e-3, 200 epochs: pass --epochs 200; start from an ST model with --init)"
_CODE = ("released code (its README: lr 0.1, wd 7e-4, 120 epochs: pass --epochs 120; --init an ST model; "
         "KL weight 5, KL attack, ramped decay, constant r, revision BatchNorm in train mode, rgp_soft mask)")

# Presets set the method's hyper-parameters, the architecture they belong to and the weight decay; not the
# dataset or the epochs, which would turn `--profile smoke` runs into CIFAR/200-epoch runs (pass them).
PRESETS = {
    "cure-resnet18-cifar10": ("cure", dict(_R18), {"model": "resnet18", "weight_decay": 5e-3},
                              f"CURE ResNet-18 CIFAR-10, {_PAPER}"),
    "cure-resnet18-cifar10-code": ("cure", {**_R18, **CODE_ARGS}, {"model": "resnet18", "weight_decay": 7e-4},
                                   f"CURE ResNet-18 CIFAR-10, {_CODE}"),
    "cure-resnet18-cifar100": ("cure", dict(_R18), {"model": "resnet18", "weight_decay": 5e-3},
                               f"CURE ResNet-18 CIFAR-100, {_PAPER}"),
    "cure-resnet18-svhn": ("cure", {**_R18, "rgp_alpha": 0.2}, {"model": "resnet18", "weight_decay": 5e-3},
                           f"CURE ResNet-18 SVHN, {_PAPER}"),
    "cure-wrn34-10-cifar10": ("cure", {**_R18, "p": 50, "rgp_alpha": 0.3, "gamma": 0.5},
                              {"model": "wrn34-10", "weight_decay": 5e-3}, f"CURE WRN-34-10 CIFAR-10, {_PAPER}"),
    "cure-wrn34-10-cifar100": ("cure", {**_R18, "p": 50, "rgp_alpha": 0.3, "gamma": 0.5},
                               {"model": "wrn34-10", "weight_decay": 5e-3}, f"CURE WRN-34-10 CIFAR-100, {_PAPER}"),
    "cure-preactresnet18-cifar10": ("cure", {**_R18, "p": 20, "rgp_alpha": 0.2},
                                    {"model": "preactresnet18", "weight_decay": 5e-3},
                                    f"CURE PreActResNet-18 CIFAR-10, {_PAPER}"),
    "cure-eff-resnet18-cifar10": ("cure-eff", dict(_R18), {"model": "resnet18", "weight_decay": 5e-3},
                                  "CURE^Eff ResNet-18 CIFAR-10 (App. B), Table 9 values; no --init needed"),
}
