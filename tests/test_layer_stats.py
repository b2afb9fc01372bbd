"""Tests for the per-layer gradient statistics callback (layerlab.analysis.layer_stats) and its plots."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from layerlab import runs
from layerlab.analysis.layer_stats import (
    STATS_FILE,
    GradStats,
    block_gradients,
    phase_of_epochs,
    read_layer_stats,
    updated_by_phase,
)
from layerlab.config import make_config
from layerlab.methods import AttackSettings, Component, Method, StepContext, build_method
from layerlab.methods.objectives import Natural
from layerlab.models import block_of_param, build_model
from layerlab.train import train

REQUIRED = {"epoch", "param", "block", "grad_mean_abs", "updated_fraction"}


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("resnet18", num_classes=10, width=0.0625)


def batch(seed: int = 0, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


class RestoreMask(Component):
    """Keeps the entries of a fixed random mask at their pre-step value (as CURE's restore does)."""

    name = "restore-mask"

    def __init__(self, fraction: float = 0.3, zero_grad: bool = False):
        self.fraction, self.zero_grad = fraction, zero_grad
        self.masks: dict[str, torch.Tensor] = {}
        self.saved: dict[str, torch.Tensor] = {}

    def setup(self, model):
        g = torch.Generator().manual_seed(7)
        self.masks = {n: torch.rand(p.shape, generator=g) < self.fraction for n, p in model.named_parameters()}

    def after_backward(self, model, ctx):
        for n, p in model.named_parameters():
            self.saved[n] = p.detach().clone()
            if self.zero_grad:
                p.grad[self.masks[n]] = 0

    def after_step(self, model, ctx):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p[self.masks[n]] = self.saved[n][self.masks[n]]


def run_steps(model, method, optimizer, callback, steps: int = 1, record=None, first_step: int = 0):
    """``steps`` training steps (numbered from ``first_step``) with the callback hooked in as train_epoch does."""
    attack = AttackSettings(8 / 255, 2 / 255, 1)
    for step in range(first_step, first_step + steps):
        x, y = batch(step)
        hooks = [callback.after_backward] + ([record] if record else [])
        ctx = StepContext(0, 1, step, steps, attack, torch.Generator().manual_seed(step), hooks)
        callback.before_step(model)
        method.train_step(model, x, y, optimizer, ctx)
        callback.after_step(model)


def start(model, method, tmp_path):
    cb = GradStats()
    method.setup(model)
    cb.on_train_start(model, method, tmp_path, None, 0)
    return cb


def test_single_step_matches_independent_computation(tmp_path):
    model = tiny_model()
    method = build_method("at")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    cb = start(model, method, tmp_path)
    before = copy.deepcopy(model.state_dict())
    grads = {}
    run_steps(model, method, optimizer, cb, record=lambda m: grads.update(
        {n: p.grad.detach().clone() for n, p in m.named_parameters()}))
    rows = {r["param"]: r for r in cb.epoch_stats(1)}
    assert set(rows) == {n for n, _ in model.named_parameters()}
    after = model.state_dict()
    for name, g in grads.items():
        r = rows[name]
        assert r["steps"] == 1 and r["block"] == block_of_param(name) and r["numel"] == g.numel()
        assert r["grad_mean_abs"] == pytest.approx(g.abs().double().mean().item(), rel=1e-5)
        expected = (after[name] != before[name]).double().mean().item()
        assert r["updated_fraction"] == pytest.approx(expected, abs=1e-12)


def test_plain_sgd_updates_every_entry(tmp_path):
    model = tiny_model(1)
    method = Method("st", Natural())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cb = start(model, method, tmp_path)
    grads = {}
    run_steps(model, method, optimizer, cb, record=lambda m: grads.update(
        {n: p.grad.detach().clone() for n, p in m.named_parameters()}))
    rows = {r["param"]: r for r in cb.epoch_stats(1)}
    full = [n for n, g in grads.items() if bool((g != 0).all())]
    assert len(full) >= 0.8 * len(grads)  # nearly every tensor has an all-nonzero gradient
    for name in full:
        assert rows[name]["updated_fraction"] == 1.0


@pytest.mark.parametrize("zero_grad", [False, True])
def test_masked_entries_are_not_counted_as_updated(tmp_path, zero_grad):
    model = tiny_model(2)
    mask = RestoreMask(0.3, zero_grad=zero_grad)
    method = Method("masked", Natural(), [mask])
    # weight decay moves every nonzero entry, so only the mask can keep an entry fixed
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    cb = start(model, method, tmp_path)
    abs_sum = {n: 0.0 for n, _ in model.named_parameters()}

    def record(m):
        for n, p in m.named_parameters():
            abs_sum[n] += p.grad.abs().double().sum().item()
            if zero_grad:  # the gradient the optimizer sees is the masked one
                assert bool((p.grad[mask.masks[n]] == 0).all())

    moved = {n: 0 for n, _ in model.named_parameters()}  # entries that changed, counted independently
    ever = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    for step in range(2):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        run_steps(model, method, optimizer, cb, steps=1, record=record, first_step=step)
        for n, p in model.named_parameters():
            assert bool((p.detach()[mask.masks[n]] == before[n][mask.masks[n]]).all())  # masked: kept
            moved[n] += int((p.detach() != before[n]).sum())
            ever[n] |= p.detach() != before[n]
    rows = {r["param"]: r for r in cb.epoch_stats(1)}
    for name, p in model.named_parameters():
        assert rows[name]["steps"] == 2
        assert rows[name]["grad_mean_abs"] == pytest.approx(abs_sum[name] / (2 * p.numel()), rel=1e-5)
        assert rows[name]["updated_fraction"] == pytest.approx(moved[name] / (2 * p.numel()), abs=1e-12)
        assert rows[name]["updated_once_fraction"] == pytest.approx(ever[name].double().mean().item(), abs=1e-12)
        # the same entries are kept every step: at least once is no more than every step
        assert rows[name]["updated_once_fraction"] <= 1 - mask.masks[name].double().mean().item() + 1e-12
        if p.dim() > 1:  # weight decay moves nearly every unmasked entry (an update below one ulp may not)
            unmasked = 1 - mask.masks[name].double().mean().item()
            assert unmasked - 1e-3 <= rows[name]["updated_fraction"] <= unmasked + 1e-12


class MovingMask(RestoreMask):
    """A restore mask drawn afresh every step: each step keeps the same share of entries, but other ones."""

    name = "moving-mask"

    def after_backward(self, model, ctx):
        g = torch.Generator().manual_seed(100 + ctx.step)
        self.masks = {n: torch.rand(p.shape, generator=g) < self.fraction for n, p in model.named_parameters()}
        super().after_backward(model, ctx)


def test_updated_at_least_once_tells_a_moving_mask_from_a_fixed_one(tmp_path):
    """Both masks keep 30% of the entries per step; over 4 steps the fixed one leaves those 30% untouched while
    the moving one leaves about 0.3^4 of them (the per-step share cannot tell them apart)."""
    once = {}
    for mask in (RestoreMask(0.3), MovingMask(0.3)):
        model = tiny_model(4)
        method = Method(mask.name, Natural(), [mask])
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        cb = start(model, method, tmp_path)
        run_steps(model, method, optimizer, cb, steps=4)
        rows = [r for r in cb.epoch_stats(1) if len(r["shape"]) > 1]
        per_step = sum(r["updated_fraction"] * r["numel"] for r in rows) / sum(r["numel"] for r in rows)
        assert per_step == pytest.approx(0.7, abs=0.02)
        once[mask.name] = sum(r["updated_once_fraction"] * r["numel"] for r in rows) / sum(r["numel"] for r in rows)
    assert once["restore-mask"] == pytest.approx(0.7, abs=0.02)
    assert once["moving-mask"] == pytest.approx(1 - 0.3 ** 4, abs=0.02)


def test_accumulators_reset_after_each_epoch(tmp_path):
    model = tiny_model(3)
    method = Method("st", Natural())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # nothing moves
    cb = start(model, method, tmp_path)
    run_steps(model, method, optimizer, cb, steps=2)
    first = cb.epoch_stats(1)
    assert all(r["updated_fraction"] == r["updated_once_fraction"] == 0.0 and r["steps"] == 2 for r in first)
    run_steps(model, method, optimizer, cb, steps=1)
    second = cb.epoch_stats(2)
    assert all(r["steps"] == 1 and r["epoch"] == 2 for r in second)


def tiny_cfg(**overrides):
    settings = {"width": 0.0625, "epochs": 2, "train_size": 32, "test_size": 16, "val_size": 16, "eval_size": 16,
                "batch_size": 16, "attack_steps": 1, "epoch_eval_steps": 0}
    return make_config("smoke", **{**settings, **overrides})


def test_trainer_writes_layer_stats_by_default(tmp_path):
    cfg = tiny_cfg(update="4")
    train(cfg, tmp_path / "run", progress=False, stop_after=2)
    rows = runs.read_jsonl(tmp_path / "run" / STATS_FILE)
    assert rows and all(REQUIRED <= set(r) for r in rows)
    assert sorted({r["epoch"] for r in rows}) == [1, 2]
    # only trainable tensors (update spec "4": block4) are recorded, each once per epoch
    assert {r["block"] for r in rows} == {"block4"}
    per_epoch = [r["param"] for r in rows if r["epoch"] == 1]
    assert len(per_epoch) == len(set(per_epoch)) == len([r for r in rows if r["epoch"] == 2])
    assert all(r["steps"] == 2 and r["grad_mean_abs"] > 0 and 0 < r["updated_fraction"] <= 1 for r in rows)


def synthetic_stats(path, epochs: int = 6, once: bool = True):
    """A layer_stats.jsonl with known values: two conv tensors in two blocks plus a BN bias (``once``: with the
    share updated at least once per epoch)."""
    tensors = [("stem.conv.weight", "stem", [4, 3, 3, 3]), ("block1.0.conv1.weight", "block1", [4, 4, 3, 3]),
               ("block1.0.bn1.bias", "block1", [4])]
    with open(path, "w") as fh:
        for e in range(1, epochs + 1):
            for i, (name, block, shape) in enumerate(tensors):
                numel = 1
                for s in shape:
                    numel *= s
                row = {"epoch": e, "param": name, "block": block, "shape": shape, "numel": numel, "steps": 5,
                       "grad_mean_abs": 0.1 * (i + 1) / e, "updated_fraction": 1.0 - 0.1 * e * (i + 1) / epochs}
                if once:
                    row["updated_once_fraction"] = 1.0 - 0.05 * e * (i + 1) / epochs
                fh.write(json.dumps(row) + "\n")


def test_aggregations_and_phases(tmp_path):
    synthetic_stats(tmp_path / STATS_FILE)
    stats = read_layer_stats(tmp_path)
    blocks = block_gradients(stats)
    b1 = blocks[(blocks["epoch"] == 2) & (blocks["block"] == "block1")]["grad_mean_abs"].item()
    assert b1 == pytest.approx((144 * 0.2 / 2 + 4 * 0.3 / 2) / 148)  # numel-weighted mean over the block
    assert phase_of_epochs([1, 2, 3, 4, 5, 6]) == {1: "initial", 2: "initial", 3: "middle", 4: "middle",
                                                   5: "final", 6: "final"}
    assert phase_of_epochs([3, 7]) == {3: "initial", 7: "final"}
    phased = updated_by_phase(stats)
    assert set(phased["param"]) == {"stem.conv.weight", "block1.0.conv1.weight"}  # weights only
    final = phased[(phased["param"] == "stem.conv.weight") & (phased["phase"] == "final")]["updated_percent"]
    assert final.item() == pytest.approx(100 * (1 - 0.1 * 5.5 / 6))
    once = updated_by_phase(stats, view="once_per_epoch")
    final = once[(once["param"] == "stem.conv.weight") & (once["phase"] == "final")]["updated_percent"]
    assert final.item() == pytest.approx(100 * (1 - 0.05 * 5.5 / 6))
    with pytest.raises(ValueError, match="choose one of"):
        updated_by_phase(stats, view="sometimes")


def test_updated_view_needs_the_recorded_column(tmp_path, monkeypatch):
    """Layer stats recorded before ``updated_once_fraction`` existed: the per-step view is drawn alone, and
    asking for the other one names the fix."""
    from layerlab.plots import layer_stats as plots

    synthetic_stats(tmp_path / STATS_FILE, once=False)
    stats = read_layer_stats(tmp_path)
    with pytest.raises(ValueError, match="retrain the run"):
        updated_by_phase(stats, view="once_per_epoch")
    shown = []  # panels of each figure written
    monkeypatch.setattr(plots, "save", lambda fig, path: shown.append(len(fig.axes)) or path)
    plots.plot_updated_by_phase(stats, tmp_path / "old.png", label="CURE")
    synthetic_stats(tmp_path / STATS_FILE)
    plots.plot_updated_by_phase(read_layer_stats(tmp_path), tmp_path / "new.png", label="CURE")
    assert shown == [1, 2]


def test_plot_grads_from_jsonl_only(tmp_path):
    from typer.testing import CliRunner

    from layerlab.cli import app

    synthetic_stats(tmp_path / STATS_FILE)
    result = CliRunner().invoke(app, ["plot", "grads", "--run", str(tmp_path), "--out", str(tmp_path / "fig")])
    assert result.exit_code == 0, result.output
    for name in ("grads_per_block.png", "updated_per_layer.png"):
        assert (tmp_path / "fig" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grad_stats_off_writes_nothing(tmp_path):
    train(tiny_cfg(grad_stats=False, epochs=1), tmp_path / "run", progress=False, stop_after=1)
    assert (tmp_path / "run" / "metrics.jsonl").exists()
    assert not (tmp_path / "run" / STATS_FILE).exists()
