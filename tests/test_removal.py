"""AT without the examples below the LSC value (RWP appendix): the loss, the removal rate, a training run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerlab.config import make_config
from layerlab.methods import AttackSettings, StepContext, build_method
from layerlab.methods.objectives import PGDAT
from layerlab.methods.removal import LSCRemovalAT
from layerlab.runs import read_jsonl
from layerlab.train import train


def _mlp() -> nn.Module:
    """No BatchNorm: forwarding the kept examples alone equals masking the whole batch."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4)).double()


def _batch(n: int = 16, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g, dtype=torch.float64) * 3, torch.randint(0, 4, (n,), generator=g)


def _ctx(epoch: int = 0, step: int = 0) -> StepContext:
    return StepContext(epoch, 2, step, 2, AttackSettings(8 / 255, 2 / 255, 2), torch.Generator().manual_seed(0))


def _losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def test_the_loss_and_its_gradient_are_the_mean_over_the_kept_examples_alone() -> None:
    model, (x_adv, y) = _mlp(), _batch()
    ordered = _losses(model, x_adv, y).sort().values
    c_min = float(ordered[5] + ordered[6]) / 2  # 6 removed, 10 kept
    out = LSCRemovalAT(c_min).loss(model, x_adv, x_adv, y, _ctx())
    grads = torch.autograd.grad(out.loss, list(model.parameters()))

    kept = _losses(model, x_adv, y) >= c_min
    assert int(kept.sum()) == 10 and float(out.terms["kept"]) == 10
    expected = F.cross_entropy(model(x_adv[kept]), y[kept])  # an independent computation on the kept ones only
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=0.0)
    for g, e in zip(grads, torch.autograd.grad(expected, list(model.parameters()))):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-15)


def test_c_min_zero_is_pgd_at_and_a_batch_with_nothing_kept_takes_a_zero_step() -> None:
    model, (x_adv, y) = _mlp(), _batch()
    at = PGDAT().loss(model, x_adv, x_adv, y, _ctx()).loss
    torch.testing.assert_close(LSCRemovalAT(0.0).loss(model, x_adv, x_adv, y, _ctx()).loss, at, rtol=1e-12, atol=0.0)
    nothing = LSCRemovalAT(1e6).loss(model, x_adv, x_adv, y, _ctx()).loss
    assert float(nothing.detach()) == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in torch.autograd.grad(nothing, list(model.parameters())))


def test_the_removal_rate_counts_each_epoch_on_its_own() -> None:
    model = _mlp()
    objective = LSCRemovalAT(1.0)
    assert objective.epoch_stats() == {}
    batches = [_batch(16, 3), _batch(8, 4)]
    for step, (x, y) in enumerate(batches):
        objective.loss(model, x, x, y, _ctx(0, step))
    removed = sum(int((_losses(model, x, y) < 1.0).sum()) for x, y in batches)
    assert 0 < removed < 24
    assert objective.epoch_stats() == {"removal_rate": removed / 24, "removed": removed}
    x, y = batches[1]
    objective.loss(model, x, x, y, _ctx(1, 0))  # a new epoch starts its own count
    again = int((_losses(model, x, y) < 1.0).sum())
    assert objective.epoch_stats() == {"removal_rate": again / 8, "removed": again}


def test_bad_c_min_is_rejected() -> None:
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match="c_min"):
            build_method("at-remove", {"c_min": bad})


def test_a_training_run_writes_the_removal_rate_of_every_epoch(tmp_path) -> None:
    cfg = make_config("tiny", method="at-remove", method_args={"c_min": 1.0}, epochs=2, train_size=64, val_size=16,
                      test_size=16, eval_size=16, epoch_eval_steps=1, eval_steps=1, keep_every=0, grad_stats=False,
                      device="cpu")
    train(cfg, tmp_path / "run", progress=False)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["removal_rate"] <= 1.0 and r["removed"] == round(r["removal_rate"] * 64)
