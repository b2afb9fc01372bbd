"""No host synchronisation inside a training step beyond the trainer's one logging read per step.

Every way Python can read a tensor's value (``item``, ``cpu``, ``tolist``, ``numpy``, ``bool``, ``float``,
``int``, ``__index__``, ``nonzero``, boolean-mask indexing, ``masked_select``, ``torch.cuda.synchronize``)
is patched to count its calls. On a GPU each is a wait for the device. The tests run on the CPU with
:data:`layerlab.methods.base.HOST_READ_DEVICES` emptied, so the methods take the code path they take on
CUDA; that path must read nothing, and must give the CPU path's results.
"""

from __future__ import annotations

import collections
import contextlib
import math
from typing import Iterator

import pytest
import torch
from torch import nn

from benchmarks.method_cost import make_batch, make_model
from layerlab.analysis.layer_stats import GradStats
from layerlab.config import TrainConfig
from layerlab.data import ImageSet, Splits
from layerlab.methods import AttackSettings, StepContext, base, build_method
from layerlab.train import setup, train_epoch

CPU = torch.device("cpu")
READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero",
         "masked_select")


@contextlib.contextmanager
def count_host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[collections.Counter]:
    """Count every host read of a tensor's value made inside the block."""
    counts: collections.Counter = collections.Counter()

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    with monkeypatch.context() as m:
        for name in READS:
            m.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
        for name in ("nonzero", "masked_select"):
            m.setattr(torch, name, counting(f"torch.{name}", getattr(torch, name)))
        m.setattr(torch.cuda, "synchronize", counting("torch.cuda.synchronize", torch.cuda.synchronize))
        getitem = torch.Tensor.__getitem__

        def indexing(self, index):
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                counts["boolean-mask indexing"] += 1  # the result's shape depends on the values
            return getitem(self, index)

        m.setattr(torch.Tensor, "__getitem__", indexing)
        yield counts


@pytest.fixture
def device_path(monkeypatch):
    """Treat the CPU like an accelerator: every host read would be a synchronisation."""
    monkeypatch.setattr(base, "HOST_READ_DEVICES", frozenset())


# CURE with r = 0.5 revises on some steps and not on others; RWP's c_min values: none qualifies at once
# (the default 1.7 on a random model), some qualify and the selection shrinks, all qualify (inf).
METHODS = {"at": ("at", {}), "cure": ("cure", {"r": 0.5, "r_decay": "none"}), "awp": ("awp", {}),
           "rwp": ("rwp", {}), "rwp-some": ("rwp", {"c_min": 2.3, "steps": 4}),
           "rwp-all": ("rwp", {"c_min": math.inf, "steps": 3}), "awp-range": ("awp", {"loss_lo": 2.0, "loss_hi": 2.4}),
           "at-remove": ("at-remove", {"c_min": 2.3})}


def _steps(name: str, steps: int, monkeypatch, reads: bool = True):
    """``steps`` train_steps of method ``name`` on a fresh tiny model: (model, method, host reads)."""
    method_name, args = METHODS[name]
    model = make_model(0.0625, 0, CPU)
    method = build_method(method_name, args)
    method.setup(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, y = make_batch(12, 1, CPU)
    generator = torch.Generator().manual_seed(3)
    counts: collections.Counter = collections.Counter()
    for i in range(steps):
        ctx = StepContext(0, 1, i, steps, AttackSettings(8 / 255, 2 / 255, 2), generator)
        with count_host_reads(monkeypatch) as step_counts:
            method.train_step(model, x, y, opt, ctx)
        counts += step_counts
    return model, method, counts


@pytest.mark.parametrize("name", list(METHODS))
def test_a_training_step_reads_nothing_on_the_device_path(name, monkeypatch, device_path):
    _, _, counts = _steps(name, 3, monkeypatch)
    assert counts == {}, f"{name}: host reads inside train_step: {dict(counts)}"


@pytest.mark.parametrize("name,expected", [("cure", "__float__"), ("rwp", "__int__"),
                                           ("rwp-some", "boolean-mask indexing")])
def test_the_counter_sees_the_cpu_path_reads(name, expected, monkeypatch):
    """On the CPU the methods read freely (it costs nothing there); the counter must see those reads."""
    _, _, counts = _steps(name, 2, monkeypatch)
    assert counts[expected] > 0, dict(counts)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _component(method, kind: str):
    return next(c for c in method.components if c.name == kind)


@pytest.mark.parametrize("name", ["cure", "rwp", "rwp-all"])
def test_the_device_path_gives_the_cpu_path_results_bit_for_bit(name, monkeypatch):
    model_cpu, method_cpu, _ = _steps(name, 4, monkeypatch)
    with monkeypatch.context() as m:
        m.setattr(base, "HOST_READ_DEVICES", frozenset())
        model_dev, method_dev, _ = _steps(name, 4, monkeypatch)
    for key, value in _state(model_cpu).items():
        assert torch.equal(value, _state(model_dev)[key]), key
    if name == "cure":
        rev_cpu, rev_dev = _component(method_cpu, "revision"), _component(method_dev, "revision")
        assert 0 < rev_cpu.revisions < 4 and int(rev_dev.revisions) == rev_cpu.revisions
        for key, value in _state(rev_cpu.model).items():
            assert torch.equal(value, _state(rev_dev.model)[key]), key
    else:
        assert method_dev.components[0].stats() == method_cpu.components[0].stats()


def test_rwp_partial_selection_matches_the_cpu_path(monkeypatch):
    """Some examples qualify: the device path sums the selected losses with zeros in place of the others."""
    model_cpu, method_cpu, _ = _steps("rwp-some", 2, monkeypatch)
    with monkeypatch.context() as m:
        m.setattr(base, "HOST_READ_DEVICES", frozenset())
        model_dev, method_dev, _ = _steps("rwp-some", 2, monkeypatch)
    stats = method_cpu.components[0].stats()
    assert 0 < stats["qualified_first"] < 2 * 12 and method_dev.components[0].stats() == stats
    for key, value in _state(model_cpu).items():
        torch.testing.assert_close(_state(model_dev)[key], value, rtol=1e-5, atol=1e-6)


def _splits(n: int = 24) -> Splits:
    g = torch.Generator().manual_seed(0)
    train = ImageSet(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                     torch.randint(0, 10, (n,), generator=g))
    return Splits("synthetic", train, None, ImageSet(train.images[:4], train.labels[:4]), 10,
                  [str(i) for i in range(10)], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@pytest.mark.parametrize("method", ["at", "cure", "rwp"])
def test_the_trainer_reads_once_per_step(method, monkeypatch, device_path, tmp_path):
    """The whole epoch loop (batches, augmentation, step, the default gradient-statistics callback, logging):
    exactly one read per step, the loss and accuracy together."""
    cfg = TrainConfig(method=method, model="resnet18", width=0.0625, dataset="synthetic", batch_size=8,
                      attack_steps=1, epochs=1, device="cpu", seed=0)
    s = setup(cfg, _splits())
    callbacks = [GradStats()]
    callbacks[0].on_train_start(s.model, s.method, tmp_path, cfg, 0)
    with count_host_reads(monkeypatch) as counts:
        stats = train_epoch(s, 0, callbacks, progress=False)
    assert counts == {"tolist": 3}, dict(counts)  # 24 images in batches of 8
    assert math.isfinite(stats["train_loss"]) and 0 <= stats["train_acc"] <= 100
