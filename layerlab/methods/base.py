"""The method framework: objectives, components, and the one training step every method uses.

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


# Devices whose tensors Python may read (``float(t)``, ``bool(t)``, ``t.item()``, boolean indexing) without
# waiting for queued work: the CPU, where the values already exist when the call returns. On every other
# device (CUDA, ...) a read blocks the host until the device has caught up, so methods keep their
# data-dependent decisions on the device there (see :func:`host_reads_free`).
HOST_READ_DEVICES = frozenset({"cpu"})


def host_reads_free(device: torch.device) -> bool:
    """True where reading a tensor's value into Python costs no device synchronisation (:data:`HOST_READ_DEVICES`).

    Code that branches on a tensor's value takes its host branch only here; elsewhere it computes both
    outcomes and selects on the device (``torch.where``), so a training step queues work without waiting."""
    return device.type in HOST_READ_DEVICES


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
    shard: tuple[int, int] = (0, 1)  # (rank, world size) under DDP: attacks draw random starts for the global batch

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

    def epoch_stats(self) -> dict[str, float]:
        """Numbers of the epoch being trained that belong in its ``metrics.jsonl`` row (read after its last step)."""
        return {}

    def hparams(self) -> dict[str, Any]:
        return {}


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

    def epoch_stats(self) -> dict[str, float]:
        """The objective's numbers of the epoch just trained (see :meth:`Objective.epoch_stats`)."""
        return self.objective.epoch_stats()

    def hparams(self) -> dict[str, Any]:
        params = {"objective": self.objective.name, **self.objective.hparams()}
        for c in self.components:
            params.update({f"{c.name}.{k}": v for k, v in c.hparams().items()})
        return params


