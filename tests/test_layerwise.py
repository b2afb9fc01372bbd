"""Tests for layerlab.layerwise: update specs, freezing, re-initialization, frozen BatchNorm, and a real U-23 run."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from layerlab import runs
from layerlab.layerwise import (
    apply_update_spec,
    paper_specs,
    block_report,
    parse_spec,
    parse_specs,
    trainable_parts,
    updated_parts,
)
from layerlab.models import block_of_param, build_model, num_blocks


def _resnet(seed: int = 0) -> nn.Module:
    """A tiny ResNet-18 with a fixed initialization."""
    torch.manual_seed(seed)
    return build_model("resnet18", num_classes=10, width=0.0625)


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bns(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# ------------------------------------------------------------------------------- specs


@pytest.mark.parametrize("spec, parts", [
    ("23", ["block2", "block3"]),
    ("32", ["block2", "block3"]),
    ("1", ["block1"]),
    ("4", ["block4"]),
    ("5", ["head"]),
    ("234", ["block2", "block3", "block4"]),
    ("12345", ["block1", "block2", "block3", "block4", "head"]),
    (" 34 ", ["block3", "block4"]),
])
def test_parse_spec_valid(spec, parts):
    assert parse_spec(spec) == parts


@pytest.mark.parametrize("spec, why", [
    ("6", "not a block number"), ("22", "repeats"), ("", "empty"), ("2a", "not a block number"),
    ("0", "not a block number"), ("-1", "not a block number"),
])
def test_parse_spec_invalid_lists_valid_digits(spec, why):
    with pytest.raises(ValueError) as info:
        parse_spec(spec)
    msg = str(info.value)
    assert repr(spec) in msg and why in msg
    assert "12345" in msg and "5 = head" in msg


def test_wrn_has_three_blocks_and_head_is_four():
    model = build_model("wrn16-2", num_classes=10, width=0.0625)
    assert num_blocks(model) == 3
    assert parse_spec("4", 3) == ["head"]
    assert parse_spec("123", 3) == ["block1", "block2", "block3"]
    with pytest.raises(ValueError, match="1234"):
        parse_spec("5", 3)
    apply_update_spec(model, "4")
    assert trainable_parts(model) == ["head"]
    with pytest.raises(ValueError, match="invalid block spec '5'"):
        apply_update_spec(build_model("wrn16-2", num_classes=10, width=0.0625), "5")


def test_parse_specs_all_is_the_papers_nine():
    assert parse_specs("all") == ["1", "2", "3", "4", "12", "23", "34", "123", "234"]
    assert parse_specs(" all ") == paper_specs(4)
    assert parse_specs("all", n_blocks=3) == ["1", "2", "3", "12", "23"]  # WRN: never the head
    assert parse_specs("23, 4,5") == ["23", "4", "5"]
    with pytest.raises(ValueError, match="'6'"):
        parse_specs("23,6")
    with pytest.raises(ValueError, match="empty"):
        parse_specs("23,")


def test_updated_parts_stem_follows_block1():
    assert updated_parts("1", 4) == ["stem", "block1"]
    assert updated_parts("12", 4) == ["stem", "block1", "block2"]
    assert updated_parts("23", 4) == ["block2", "block3"]


# ------------------------------------------------------------------------------- freezing


@pytest.mark.parametrize("spec, parts", [
    ("23", ["block2", "block3"]), ("1", ["stem", "block1"]), ("5", ["head"]), ("4", ["block4"]),
])
def test_trainable_parts_and_requires_grad(spec, parts):
    model = _resnet()
    report = apply_update_spec(model, spec)
    assert trainable_parts(model) == parts
    for name, p in model.named_parameters():
        assert p.requires_grad == (block_of_param(name) in parts), name
    by_part = {r.part: r for r in report}
    assert [r.part for r in report] == ["stem", "block1", "block2", "block3", "block4", "head"]
    for part, row in by_part.items():
        total = sum(p.numel() for p in getattr(model, part).parameters())
        assert row.total == total
        assert row.trainable == (total if part in parts else 0)
    assert report == block_report(model)


def test_reinit_changes_updated_blocks_and_keeps_frozen_ones():
    model = _resnet()
    before = _clone_state(model)
    apply_update_spec(model, "23", reinit=True, seed=3)
    after = model.state_dict()
    changed_convs = 0
    for key, old in before.items():
        part = block_of_param(key)
        if part not in ("block2", "block3"):
            assert torch.equal(after[key], old), key
        elif key.endswith(".weight") and old.dim() == 4:  # a conv of an updated block: drawn anew
            assert not torch.equal(after[key], old), key
            changed_convs += 1
        else:  # BatchNorm of an updated block: kept unless reset_bn
            assert torch.equal(after[key], old), key
    assert changed_convs >= 4
    # Kaiming-normal (fan_out, ReLU): std = sqrt(2 / (out_channels * k * k)), checked on the largest conv.
    conv = max((m for m in model.block3.modules() if isinstance(m, nn.Conv2d)), key=lambda m: m.weight.numel())
    fan_out = conv.weight.shape[0] * conv.weight.shape[2] * conv.weight.shape[3]
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.15)


def test_reinit_is_seeded():
    a, b, c = _resnet(), _resnet(), _resnet()
    apply_update_spec(a, "23", seed=1)
    apply_update_spec(b, "23", seed=1)
    apply_update_spec(c, "23", seed=2)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    conv = [n for n, p in a.block2.named_parameters() if p.dim() == 4][0]
    assert not torch.equal(a.block2.get_parameter(conv), c.block2.get_parameter(conv))


def test_head_reinit_is_small_normal_with_zero_bias():
    model = _resnet()
    apply_update_spec(model, "5", seed=0)
    w, b = model.head.weight, model.head.bias
    assert torch.count_nonzero(b) == 0
    assert w.std().item() == pytest.approx(0.01, rel=0.2)


def test_no_reinit_keeps_every_weight():
    model = _resnet()
    before = _clone_state(model)
    apply_update_spec(model, "23", reinit=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert trainable_parts(model) == ["block2", "block3"]


def _perturb_bns(model: nn.Module) -> None:
    """Give every BatchNorm non-default affine parameters and running statistics."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for bn in _bns(model):
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=gen) + 0.5)
            bn.bias.copy_(torch.rand(bn.bias.shape, generator=gen))
            bn.running_mean.copy_(torch.rand(bn.running_mean.shape, generator=gen))
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) + 0.5)


@pytest.mark.parametrize("reset_bn", [False, True])
def test_reset_bn_flag(reset_bn):
    model = _resnet()
    _perturb_bns(model)
    before = _clone_state(model)
    apply_update_spec(model, "23", reset_bn=reset_bn)
    for part in ("block2", "block3"):
        for bn in _bns(getattr(model, part)):
            if reset_bn:
                assert torch.equal(bn.weight, torch.ones_like(bn.weight))
                assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
                assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
                assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
            else:
                assert not torch.equal(bn.weight, torch.ones_like(bn.weight))
    for key, old in before.items():  # frozen parts never change, whatever reset_bn says
        if block_of_param(key) not in ("block2", "block3"):
            assert torch.equal(model.state_dict()[key], old), key


def test_frozen_batchnorm_statistics_stay_fixed_in_train_mode():
    model = _resnet()
    _perturb_bns(model)
    apply_update_spec(model, "23", reinit=False)
    before = _clone_state(model)
    model.train()
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for _ in range(3):
            model(x)
    after = model.state_dict()
    for key, old in before.items():
        if "running_" in key or "num_batches_tracked" in key:
            if block_of_param(key) in ("block2", "block3"):
                assert not torch.equal(after[key], old), key  # updated blocks keep learning statistics
            else:
                assert torch.equal(after[key], old), key
    # A frozen part computes in train mode exactly what it computes in eval mode (stored statistics).
    model.train()
    out_train = model.stem(x)
    model.eval()
    out_eval = model.stem(x)
    assert torch.equal(out_train, out_eval)
    model.train()
    assert model.block2.training  # model.train() still reaches the updated blocks


def test_released_code_variant_trains_the_stem_and_adapts_frozen_statistics():
    model = _resnet()
    _perturb_bns(model)
    stem_before = _clone_state(model.stem)
    apply_update_spec(model, "23", reinit=True, train_stem=True, frozen_bn="adapt")
    assert all(p.requires_grad for p in model.stem.parameters())  # trainable, though block1 is frozen
    assert all(torch.equal(v, stem_before[k]) for k, v in model.stem.state_dict().items())  # not re-initialized
    assert not any(p.requires_grad for p in model.block1.parameters())
    assert not any(p.requires_grad for p in model.head.parameters())
    before = _clone_state(model)
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    moved = {block_of_param(k) for k, v in model.state_dict().items()
             if "running_mean" in k and not torch.equal(v, before[k])}
    assert {"stem", "block1", "block4"} <= moved  # frozen blocks' statistics follow the batches
    with pytest.raises(ValueError, match="frozen_bn"):
        apply_update_spec(_resnet(), "23", frozen_bn="train")


# ------------------------------------------------------------------------------- a real run


def test_u23_training_changes_exactly_the_updated_blocks(st_run, digits_splits, tiny_cfg, tmp_path, monkeypatch):
    from layerlab.train import train

    init = st_run / "checkpoints" / "best.pt"
    loaded: list[str] = []
    real_load = runs.load_checkpoint
    monkeypatch.setattr(runs, "load_checkpoint", lambda path: loaded.append(str(path)) or real_load(path))
    cfg = tiny_cfg(method="at", update="23", init=str(init))
    summary = train(cfg, tmp_path / "U-23", progress=False, splits=digits_splits)

    assert summary["trainable"] == ["block2", "block3"]
    assert loaded.count(str(init)) == 1  # the init checkpoint is read once, for the model being trained
    start = torch.load(init, weights_only=True)["model"]
    last = torch.load(tmp_path / "U-23" / "checkpoints" / "last.pt", weights_only=True)
    end = last["model"]
    assert start.keys() == end.keys()
    for key in start:
        part = block_of_param(key)
        if part in ("stem", "block1", "block4", "head"):
            assert torch.equal(start[key], end[key]), key  # bit-for-bit, BatchNorm statistics included
        elif key.endswith(".weight") and start[key].dim() == 4:
            assert not torch.equal(start[key], end[key]), key
    n_trainable = sum(1 for k in start if block_of_param(k) in ("block2", "block3")
                      and not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert len(last["optimizer"]["param_groups"][0]["params"]) == n_trainable
    assert last["meta"]["update"] == "23"
    config = runs.read_json(tmp_path / "U-23" / "config.json")
    trainable = {b["part"]: b["trainable"] for b in config["blocks"]}
    assert [p for p, n in trainable.items() if n] == ["block2", "block3"]
