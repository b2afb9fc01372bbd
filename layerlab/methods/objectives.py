"""Training objectives: which adversarial examples a method crafts and which loss it minimizes."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from layerlab.attacks import ce_loss, eval_mode, kl_loss, pgd_perturb
from layerlab.methods.base import Method, Objective, Outputs


class Natural(Objective):
    """Standard training (ST): cross-entropy on clean inputs."""

    name = "st"

    def loss(self, model, x, x_adv, y, ctx):
        logits = model(x)
        return Outputs(F.cross_entropy(logits, y), logits_nat=logits)

    def adv_loss(self, model, x, x_adv, y):
        return F.cross_entropy(model(x), y, reduction="none")


class PGDAT(Objective):
    """Madry et al. (2018) PGD adversarial training: CE on PGD examples (uniform random start)."""

    name = "at"

    def craft(self, model, x, y, ctx):
        a = ctx.attack
        with eval_mode(model):
            return pgd_perturb(model, x, ce_loss(y), eps=a.eps, alpha=a.alpha, steps=a.steps, norm=a.norm,
                               init="uniform", generator=ctx.generator)

    def loss(self, model, x, x_adv, y, ctx):
        logits = model(x_adv)
        return Outputs(F.cross_entropy(logits, y), logits_adv=logits, x_adv=x_adv)


def trades_kl(logits_nat: Tensor, logits_adv: Tensor) -> Tensor:
    """Batch-mean KL(p(x_nat) || p(x_adv)), gradients flowing through both sides (TRADES' outer term)."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1), reduction="batchmean")


class TRADES(Objective):
    """Zhang et al. (2019): CE(x_nat) + beta * KL(p(x_nat) || p(x_adv)); inner max of the KL from 0.001*N(0,1)."""

    name = "trades"

    def __init__(self, beta: float = 6.0):
        self.beta = beta

    def craft(self, model, x, y, ctx):
        a = ctx.attack
        with eval_mode(model):
            with torch.no_grad():
                clean = model(x)
            return pgd_perturb(model, x, kl_loss(clean), eps=a.eps, alpha=a.alpha, steps=a.steps, norm=a.norm,
                               init="normal", generator=ctx.generator)

    def loss(self, model, x, x_adv, y, ctx):
        logits_nat, logits_adv = model(x), model(x_adv)  # two passes: BatchNorm sees each batch alone
        ce = F.cross_entropy(logits_nat, y)
        kl = trades_kl(logits_nat, logits_adv)
        return Outputs(ce + self.beta * kl, logits_nat, logits_adv, x_adv, {"ce_nat": ce, "kl": kl})

    def adv_loss(self, model, x, x_adv, y):
        logits_nat, logits_adv = model(x), model(x_adv)
        kl = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits_nat, 1), reduction="none").sum(1)
        return F.cross_entropy(logits_nat, y, reduction="none") + self.beta * kl

    def hparams(self):
        return {"beta": self.beta}



def _st() -> Method:
    return Method("st", Natural())


def _at() -> Method:
    return Method("at", PGDAT())


def _trades(beta: float = 6.0) -> Method:
    return Method("trades", TRADES(beta=beta))


METHODS = {
    "st": (_st, "standard (natural) training"),
    "at": (_at, "Madry PGD adversarial training"),
    "trades": (_trades, "TRADES (Zhang et al. 2019), beta configurable"),
}

PRESETS = {
    "trades-cifar10": ("trades", {"beta": 6.0}, {}, "TRADES, beta=6 (Zhang et al. 2019)"),
}
