"""Training methods as *objective + components*, run by the one shared trainer step.

An :class:`Objective` says which adversarial examples a method crafts and which loss it
minimizes (ST, PGD-AT, TRADES, ...). A :class:`Component` changes the step around that loss
(adversarial weight perturbation, a gradient mask, a revision model) through a few hooks,
so that e.g. TRADES-RWP is TRADES + the RWP component, not a copy of the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layerlab.attacks import ce_loss, eval_mode, kl_loss, pgd_perturb


@dataclass
class AttackSettings:
    """The training-time threat model: eps-ball, step size, number of PGD steps."""

    eps: float
    alpha: float
    steps: int
    norm: str = "linf"


@dataclass
class StepContext:
    """What a step may know about where it is in training; ``generator`` drives all its randomness."""

    epoch: int
    epochs: int
    step: int
    steps_per_epoch: int
    attack: AttackSettings
    generator: torch.Generator
    after_backward: list[Callable[[nn.Module], None]] = field(default_factory=list)

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1)."""
        return (self.epoch + self.step / max(1, self.steps_per_epoch)) / max(1, self.epochs)


@dataclass
class Outputs:
    """A step's loss and the forward passes it made (re-used by components instead of recomputed)."""

    loss: Tensor
    logits_nat: Tensor | None = None
    logits_adv: Tensor | None = None
    x_adv: Tensor | None = None
    terms: dict[str, Tensor] = field(default_factory=dict)

    @property
    def logits(self) -> Tensor:
        """The logits training accuracy is measured on (adversarial when there are any)."""
        return self.logits_adv if self.logits_adv is not None else self.logits_nat


class Objective:
    """What to attack and what to minimize. Subclasses override ``craft`` and ``loss``."""

    name = "objective"

    def craft(self, model: nn.Module, x: Tensor, y: Tensor, ctx: StepContext) -> Tensor | None:
        """Adversarial examples for this batch (None for natural training)."""
        return None

    def loss(self, model: nn.Module, x: Tensor, x_adv: Tensor | None, y: Tensor, ctx: StepContext) -> Outputs:
        """The training loss on (x, x_adv), with the logits it computed."""
        raise NotImplementedError

    def adv_loss(self, model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor) -> Tensor:
        """Per-example loss on adversarial examples, used by weight perturbation (AWP/RWP)."""
        return F.cross_entropy(model(x_adv), y, reduction="none")

    def hparams(self) -> dict[str, Any]:
        return {}


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


class Component:
    """A change to the step around the objective's loss. Every hook is optional (a no-op here)."""

    name = "component"

    def setup(self, model: nn.Module) -> None:
        """Called once before training (after the model is on its device)."""

    def before_loss(self, model: nn.Module, objective: Objective, x: Tensor, x_adv: Tensor | None,
                    y: Tensor, ctx: StepContext) -> None:
        """Called after crafting and before the training loss (e.g. perturb weights)."""

    def extra_loss(self, model: nn.Module, out: Outputs, x: Tensor, y: Tensor, ctx: StepContext) -> Tensor | None:
        """A term added to the loss (e.g. a consistency loss)."""
        return None

    def backward(self, model: nn.Module, out: Outputs, loss: Tensor, x: Tensor, y: Tensor,
                 ctx: StepContext) -> bool:
        """Compute gradients itself (return True), or leave it to ``loss.backward()`` (False)."""
        return False

    def after_backward(self, model: nn.Module, ctx: StepContext) -> None:
        """Called after gradients exist and before the optimizer step (e.g. mask gradients)."""

    def after_step(self, model: nn.Module, ctx: StepContext) -> None:
        """Called after the optimizer step (e.g. restore weights, update an EMA model)."""

    def extra_models(self) -> dict[str, nn.Module]:
        """Models besides the trained one worth evaluating (e.g. CURE's revision model)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def hparams(self) -> dict[str, Any]:
        return {}


class Method:
    """An objective with components; :meth:`train_step` is the one training step every method uses."""

    def __init__(self, name: str, objective: Objective, components: list[Component] | None = None):
        self.name = name
        self.objective = objective
        self.components = list(components or [])

    def setup(self, model: nn.Module) -> None:
        for c in self.components:
            c.setup(model)

    def train_step(self, model: nn.Module, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer,
                   ctx: StepContext) -> Outputs:
        """Craft, (perturb), compute the loss, backpropagate, (mask), step, (restore, revise)."""
        model.train()
        x_adv = self.objective.craft(model, x, y, ctx)
        for c in self.components:
            c.before_loss(model, self.objective, x, x_adv, y, ctx)
        out = self.objective.loss(model, x, x_adv, y, ctx)
        loss = out.loss
        for c in self.components:
            extra = c.extra_loss(model, out, x, y, ctx)
            if extra is not None:
                loss = loss + extra
        out.loss = loss
        optimizer.zero_grad(set_to_none=True)
        if not any(c.backward(model, out, loss, x, y, ctx) for c in self.components):
            loss.backward()
        for c in self.components:
            c.after_backward(model, ctx)
        for hook in ctx.after_backward:
            hook(model)
        optimizer.step()
        for c in self.components:
            c.after_step(model, ctx)
        return out

    def extra_models(self) -> dict[str, nn.Module]:
        models: dict[str, nn.Module] = {}
        for c in self.components:
            models.update(c.extra_models())
        return models

    def state_dict(self) -> dict[str, Any]:
        return {c.name: c.state_dict() for c in self.components}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for c in self.components:
            if c.name in state:
                c.load_state_dict(state[c.name])

    def hparams(self) -> dict[str, Any]:
        params = {"objective": self.objective.name, **self.objective.hparams()}
        for c in self.components:
            params.update({f"{c.name}.{k}": v for k, v in c.hparams().items()})
        return params


MethodFactory = Callable[..., Method]


def _st(**kw: Any) -> Method:
    return Method("st", Natural(**kw))


def _at(**kw: Any) -> Method:
    return Method("at", PGDAT(**kw))


def _trades(beta: float = 6.0) -> Method:
    return Method("trades", TRADES(beta=beta))


# name -> (factory, one-line description). New methods register here.
METHODS: dict[str, tuple[MethodFactory, str]] = {
    "st": (_st, "standard (natural) training"),
    "at": (_at, "Madry PGD adversarial training"),
    "trades": (_trades, "TRADES (Zhang et al. 2019), beta configurable"),
}

# preset name -> (method, method_args, config overrides, description). Hyper-parameters from the papers.
PRESETS: dict[str, tuple[str, dict[str, Any], dict[str, Any], str]] = {
    "trades-cifar10": ("trades", {"beta": 6.0}, {}, "TRADES, beta=6 (Zhang et al. 2019)"),
}


def build_method(name: str, args: dict[str, Any] | None = None) -> Method:
    """The method registered as ``name`` with hyper-parameters ``args``; unknown names list the valid ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    factory, _ = METHODS[name]
    try:
        return factory(**(args or {}))
    except TypeError as err:
        raise ValueError(f"bad hyper-parameters for method {name!r}: {err}") from None


def _parse_value(text: str) -> Any:
    """``KEY=VALUE`` values: JSON when it parses (numbers, booleans, lists), else the string."""
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def resolve_method(method: str, preset: str | None = None,
                   args: list[str] | tuple[str, ...] = ()) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(method name, hyper-parameters, config overrides) from a method, an optional preset and ``KEY=VALUE``
    arguments, which override the preset's values."""
    method_args: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)} (`layerlab presets`)")
        method, preset_args, overrides, _ = PRESETS[preset]
        method_args.update(preset_args)
    for item in args:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"method argument {item!r} is not KEY=VALUE (e.g. --arg beta=6)")
        method_args[key.strip()] = _parse_value(value.strip())
    build_method(method, method_args)  # validate names and hyper-parameters now, not after loading data
    return method, method_args, dict(overrides)
