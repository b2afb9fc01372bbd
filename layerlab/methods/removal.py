"""Adversarial training without the examples that meet the Loss Stationary Condition (RWP, Yu et al. 2022, appendix).

RWP's LSC value ``c_min`` splits a batch's adversarial examples into those whose loss is already small
(``loss < c_min``) and the rest. RWP perturbs the weights on the small-loss examples; the alternative its appendix
(Fig. 4) trains is to drop them from training altogether, and it reports the fraction dropped (the *removal rate*)
over training. Here that is PGD-AT whose loss is the mean cross-entropy over the examples with adversarial loss
``>= c_min`` only; the released RWP code has no script for it, so the normalization (a mean over the kept examples)
is this implementation's choice. Every epoch's ``metrics.jsonl`` row carries ``removal_rate`` (fraction of the
epoch's training examples dropped) and ``removed``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layerlab import distributed
from layerlab.methods.base import Method, Outputs, StepContext
from layerlab.methods.objectives import PGDAT
from layerlab.methods.perturbation import C_MIN


class LSCRemovalAT(PGDAT):
    """PGD-AT on the examples whose adversarial loss is at least ``c_min``; the others are dropped from the step.

    The loss is the mean CE over the kept examples of the (global) batch, so the kept examples weigh as a batch of
    their own; a batch with none kept takes a zero step. Under DDP the kept count is summed over the ranks and each
    rank's sum is scaled so that DDP's gradient average is the global mean. The attack is PGD-AT's (inherited).
    """

    name = "at-remove"

    def __init__(self, c_min: float = C_MIN):
        if math.isnan(c_min) or c_min < 0:
            raise ValueError(f"c_min must be a loss value >= 0 (0 removes nothing), got {c_min}")
        self.c_min = float(c_min)
        self._epoch: int | None = None
        self._counts: Tensor | None = None  # (kept, seen) in the current epoch, summed over ranks, on the device

    def loss(self, model: nn.Module, x: Tensor, x_adv: Tensor | None, y: Tensor, ctx: StepContext) -> Outputs:
        if ctx.epoch != self._epoch:
            self._epoch, self._counts = ctx.epoch, None
        logits = model(x_adv)
        losses = F.cross_entropy(logits, y, reduction="none")
        keep = losses.detach() >= self.c_min
        counts = torch.stack([keep.sum(), torch.tensor(len(y), device=keep.device)]).double()
        distributed.all_reduce_sum_([counts])  # the global batch's counts (no host read)
        scale = distributed.world_size() / counts[0].clamp_min(1.0)
        loss = (losses * keep).sum() * scale.to(losses.dtype)
        self._counts = counts if self._counts is None else self._counts + counts
        return Outputs(loss, logits_adv=logits, x_adv=x_adv, terms={"kept": counts[0]})

    def epoch_stats(self) -> dict[str, float]:
        if self._counts is None:
            return {}
        kept, seen = self._counts.tolist()
        return {"removal_rate": (seen - kept) / max(1.0, seen), "removed": int(seen - kept)}

    def hparams(self) -> dict[str, Any]:
        return {"c_min": self.c_min}


def _at_remove(c_min: float = C_MIN) -> Method:
    return Method("at-remove", LSCRemovalAT(c_min))


METHODS = {
    "at-remove": (_at_remove, f"PGD-AT without the examples whose adversarial loss is below c_min={C_MIN:g} "
                              "(RWP appendix: removal instead of weight perturbation)"),
}

PRESETS: dict[str, tuple[str, dict[str, Any], dict[str, Any], str]] = {}
