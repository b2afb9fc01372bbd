"""Objectives against direct transcriptions of the reference losses: TRADES (inner and outer) and MART."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerlab.methods import AttackSettings, StepContext, build_method
from layerlab.methods.objectives import MART, PGDAT, TRADES

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 3


def _model(seed: int = 0) -> nn.Module:
    """A toy conv net with BatchNorm in float64 (so that transcriptions agree to rounding)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10)).double()


def _batch(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0.1, 0.9] (the 0.001-noise start never leaves [0, 1]) and labels."""
    g = torch.Generator().manual_seed(seed)
    x = 0.1 + 0.8 * torch.rand(n, 3, 32, 32, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 10, (n,), generator=g)


def _ctx(seed: int = 5) -> StepContext:
    return StepContext(0, 1, 0, 1, AttackSettings(EPS, ALPHA, STEPS), torch.Generator().manual_seed(seed))


def _reference_inner(model: nn.Module, x: torch.Tensor, loss_fn, seed: int) -> torch.Tensor:
    """The TRADES/MART reference inner loop: x + 0.001 N(0,1), signed steps, clip to the ball and [0, 1]."""
    model.eval()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    x_adv = x.detach() + 0.001 * noise
    for _ in range(STEPS):
        x_adv.requires_grad_()
        (grad,) = torch.autograd.grad(loss_fn(model, x_adv), [x_adv])
        x_adv = x_adv.detach() + ALPHA * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0.0, 1.0)
    model.train()
    return x_adv


def _grads(model: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [p for p in model.parameters()]))


def test_trades_inner_matches_reference() -> None:
    # float32 as in practice: the inner KL is computed in float32 (attacks.kl_loss), and so close to the
    # start (x + 0.001 N(0,1)) its gradient is rounding-limited, so only a float32 transcription agrees.
    model, (x, _) = _model().float(), _batch()
    x = x.float()
    ours = TRADES().craft(model, x, None, _ctx(seed=5))
    ref = _reference_inner(copy.deepcopy(model), x, lambda m, xa: F.kl_div(
        F.log_softmax(m(xa), dim=1), F.softmax(m(x), dim=1), reduction="sum"), seed=5)
    assert model.training
    assert (ours - x).abs().max() <= EPS + 1e-6 and (ours - x).abs().max() > 0.5 * EPS
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)  # equal up to one float32 ulp of x


def test_trades_outer_loss_and_gradient_match_direct_formula() -> None:
    model, (x, y) = _model(), _batch()
    x_adv = (x + EPS * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(3),
                                              dtype=x.dtype))).clamp(0, 1)
    out = TRADES(beta=6.0).loss(model, x, x_adv, y, _ctx())
    direct = copy.deepcopy(model)
    logits_nat, logits_adv = direct(x), direct(x_adv)
    log_p_nat, log_p_adv = logits_nat.log_softmax(1), logits_adv.log_softmax(1)
    ce = -log_p_nat.gather(1, y[:, None]).mean()
    kl = (log_p_nat.exp() * (log_p_nat - log_p_adv)).sum(1).mean()
    expected = ce + 6.0 * kl
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.terms["kl"], kl, rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(model, out.loss), _grads(direct, expected)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # the per-example loss weight perturbation ascends averages to the same objective
    torch.testing.assert_close(TRADES(beta=6.0).adv_loss(model, x, x_adv, y).mean(), expected,
                               rtol=1e-12, atol=1e-12)


def _reference_mart_outer(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                          beta: float) -> torch.Tensor:
    """The outer loss of YisenWang/MART ``mart_loss``, transcribed."""
    kl = nn.KLDivLoss(reduction="none")
    batch_size = len(x)
    logits = model(x)
    logits_adv = model(x_adv)
    adv_probs = F.softmax(logits_adv, dim=1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(logits, dim=1)
    true_probs = torch.gather(nat_probs, 1, (y.unsqueeze(1)).long()).squeeze()
    loss_robust = (1.0 / batch_size) * torch.sum(
        torch.sum(kl(torch.log(adv_probs + 1e-12), nat_probs), dim=1) * (1.0000001 - true_probs))
    return loss_adv + float(beta) * loss_robust


@pytest.mark.parametrize("beta", [6.0, 5.0])
def test_mart_outer_loss_and_gradient_match_reference(beta: float) -> None:
    model, (x, y) = _model(), _batch()
    # make some examples misclassified on x_adv so both branches of the largest-wrong-class pick occur
    x_adv = (x + EPS * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(4),
                                              dtype=x.dtype))).clamp(0, 1)
    with torch.no_grad():
        pred = copy.deepcopy(model)(x_adv).argmax(1)
    y = torch.where(torch.arange(len(y)) % 2 == 0, pred, y)  # half the labels = the top class
    assert (pred == y).any() and (pred != y).any()
    out = MART(beta=beta).loss(model, x, x_adv, y, _ctx())
    ref_model = copy.deepcopy(model)
    expected = _reference_mart_outer(ref_model, x, x_adv, y, beta)
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(model, out.loss), _grads(ref_model, expected)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(MART(beta=beta).adv_loss(model, x, x_adv, y).mean(), expected,
                               rtol=1e-12, atol=1e-12)


def test_mart_inner_matches_reference_ce_pgd() -> None:
    model, (x, y) = _model(), _batch()
    ours = MART().craft(model, x, y, _ctx(seed=9))
    ref = _reference_inner(copy.deepcopy(model), x, lambda m, xa: F.cross_entropy(m(xa), y), seed=9)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-9)


def test_mart_uniform_start_option_and_validation() -> None:
    model, (x, y) = _model(), _batch()
    ctx_a, ctx_b = _ctx(seed=2), _ctx(seed=2)
    ours = MART(init="uniform").craft(model, x, y, ctx_a)
    at = PGDAT().craft(model, x, y, ctx_b)  # PGD-AT's uniform start with the same draws: the same attack
    assert torch.equal(ours, at)
    with pytest.raises(ValueError, match="normal"):
        MART(init="zeros")


def test_mart_registered_with_hparams() -> None:
    method = build_method("mart", {"beta": 5.0})
    assert method.hparams() == {"objective": "mart", "beta": 5.0, "init": "normal"}
