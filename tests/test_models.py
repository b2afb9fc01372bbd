"""Tests for layerlab.models: architectures, named parts, normalization, width scaling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerlab.models import (
    MODEL_NAMES,
    Normalize,
    block_names,
    block_of_param,
    build_model,
    count_parameters,
    num_blocks,
)

SMALL = 0.125  # width used for every forward pass: keeps the whole file fast on CPU
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)

# Independent parameter counts at 10 classes, full width (kuangliu/pytorch-cifar,
# AWP PreActResNet-18, TRADES/AWP WideResNet without the unused sub_block1).
REFERENCE_COUNTS = {
    "resnet18": 11_173_962,
    "preactresnet18": 11_172_170,
    "wrn34-10": 46_160_474,
    "wrn28-10": 36_479_194,
    "resnet50": 23_520_842,
    "resnet101": 42_512_970,
}
EXPECTED_BLOCKS = {
    "resnet18": 4,
    "resnet50": 4,
    "resnet101": 4,
    "preactresnet18": 4,
    "wrn34-10": 3,
    "wrn28-10": 3,
}


@pytest.fixture(scope="module", params=MODEL_NAMES)
def small_model(request: pytest.FixtureRequest) -> nn.Module:
    """One seeded miniature of each architecture, shared by the structural tests."""
    torch.manual_seed(0)
    return build_model(request.param, num_classes=7, width=SMALL)


def _images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# --- parameter counts -------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REFERENCE_COUNTS))
def test_full_width_parameter_count(name: str) -> None:
    model = build_model(name, num_classes=10, width=1.0)
    assert count_parameters(model) == REFERENCE_COUNTS[name]


def test_reference_names_cover_model_names() -> None:
    assert set(REFERENCE_COUNTS) == set(MODEL_NAMES) == set(EXPECTED_BLOCKS)


def test_count_parameters_trainable_only() -> None:
    model = build_model("resnet18", width=SMALL)
    total = count_parameters(model)
    for p in model.stem.parameters():
        p.requires_grad_(False)
    frozen = count_parameters(model.stem)
    assert frozen > 0
    assert count_parameters(model, trainable_only=True) == total - frozen
    assert count_parameters(model) == total


# --- forward / structure ------------------------------------------------------


def test_forward_shape_and_gradients_reach_every_parameter(small_model: nn.Module) -> None:
    small_model.train()
    out = small_model(_images())
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in small_model.named_parameters() if p.grad is None]
    assert missing == []  # no unused modules (e.g. TRADES' dead sub_block1)
    small_model.zero_grad(set_to_none=True)


def test_attributes(small_model: nn.Module) -> None:
    assert small_model.arch in MODEL_NAMES
    assert small_model.num_classes == 7
    assert small_model.width == SMALL


def test_part_names(small_model: nn.Module) -> None:
    n = EXPECTED_BLOCKS[small_model.arch]
    assert num_blocks(small_model) == n
    names = block_names(small_model)
    assert names == ["stem", *[f"block{i}" for i in range(1, n + 1)], "head"]
    for part in names:
        assert isinstance(getattr(small_model, part), nn.Module)
    assert type(small_model.head) is nn.Linear
    assert small_model.head.out_features == 7
    assert isinstance(small_model.stem[0], Normalize)


def test_state_dict_keys_are_prefixed_by_parts(small_model: nn.Module) -> None:
    parts = block_names(small_model)
    keys = list(small_model.state_dict())
    assert keys
    for key in keys:
        assert key.split(".", 1)[0] in parts, key
        assert block_of_param(key) == key.split(".", 1)[0]
    # every part owns something, and only head owns the classifier
    assert {block_of_param(k) for k in keys} == set(parts)
    assert [k for k in keys if block_of_param(k) == "head"] == ["head.weight", "head.bias"]


def test_block_of_param_on_named_parameters(small_model: nn.Module) -> None:
    for name, param in small_model.named_parameters():
        part = block_of_param(name)
        assert part in block_names(small_model)
        assert any(p is param for p in getattr(small_model, part).parameters())


def test_final_bn_lives_in_last_block() -> None:
    for name in ("preactresnet18", "wrn28-10"):
        model = build_model(name, width=SMALL)
        last = getattr(model, f"block{num_blocks(model)}")
        assert isinstance(last.bn, nn.BatchNorm2d)
        assert last.bn.num_features == model.head.in_features


def test_block_of_param_prefixes_and_errors() -> None:
    assert block_of_param("stem.conv.weight") == "stem"
    assert block_of_param("block12.0.conv1.weight") == "block12"
    assert block_of_param("module.block2.1.bn1.running_mean") == "block2"
    assert block_of_param("_orig_mod.head.bias") == "head"
    for bad in ("fc.weight", "blocks.0.weight", "stemx.weight", "block.weight", ""):
        with pytest.raises(ValueError):
            block_of_param(bad)


def test_part_helpers_unwrap_data_parallel() -> None:
    model = build_model("wrn28-10", width=SMALL)
    assert block_names(nn.DataParallel(model)) == block_names(model)


def test_part_helpers_reject_foreign_models() -> None:
    with pytest.raises(ValueError):
        num_blocks(nn.Linear(2, 2))


# --- names --------------------------------------------------------------------


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError) as info:
        build_model("vgg16")
    message = str(info.value)
    assert "\n" not in message
    for name in MODEL_NAMES:
        assert name in message


@pytest.mark.parametrize("bad", ["wrn-33-10", "wrn4-2", "wrn-16-0"])
def test_invalid_wrn_names(bad: str) -> None:
    with pytest.raises(ValueError):
        build_model(bad)


@pytest.mark.parametrize("bad", [{"width": 0.0}, {"width": -1.0}, {"num_classes": 0}])
def test_invalid_arguments(bad: dict) -> None:
    with pytest.raises(ValueError):
        build_model("resnet18", **bad)


def test_generic_wrn_name() -> None:
    model = build_model("wrn-16-4", num_classes=3, width=SMALL)
    assert model.arch == "wrn-16-4"
    assert num_blocks(model) == 3
    assert len(model.block1) == 2  # (16 - 4) / 6 blocks per stage
    assert model.head.in_features == round(64 * 4 * SMALL)
    assert model(_images()).shape == (2, 3)
    assert len(build_model("wrn34-10", width=SMALL).block1) == 5


def test_name_is_case_insensitive() -> None:
    assert build_model("ResNet18", width=SMALL).arch == "resnet18"


# --- width ----------------------------------------------------------------------


def test_width_scales_channels() -> None:
    model = build_model("resnet18", width=0.25)
    assert model.stem.conv.out_channels == 16
    assert model.head.in_features == 128
    model = build_model("resnet50", width=0.25)
    assert model.stem.conv.out_channels == 16
    assert model.head.in_features == 512  # 4 * round(512 * 0.25)
    model = build_model("wrn34-10", width=SMALL)
    assert model.stem.conv.out_channels == 2
    assert model.head.in_features == 80


def test_width_scales_parameter_count_quadratically() -> None:
    full = count_parameters(build_model("preactresnet18", width=1.0))
    half = count_parameters(build_model("preactresnet18", width=0.5))
    assert 0.24 < half / full < 0.26


def test_tiny_width_keeps_at_least_one_channel() -> None:
    model = build_model("resnet18", width=1e-3)
    assert model.stem.conv.out_channels == 1
    assert model(_images()).shape == (2, 10)


# --- init -----------------------------------------------------------------------


def test_init_is_deterministic_under_seed() -> None:
    torch.manual_seed(123)
    a = build_model("wrn28-10", width=SMALL).state_dict()
    torch.manual_seed(123)
    b = build_model("wrn28-10", width=SMALL).state_dict()
    torch.manual_seed(124)
    c = build_model("wrn28-10", width=SMALL).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["stem.conv.weight"], c["stem.conv.weight"])


def test_kaiming_init() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", width=1.0)
    conv = model.block3[0].conv1  # 128 -> 256, 3x3: fan_out = 256 * 9
    expected_std = (2.0 / (256 * 9)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.02)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


# --- normalization ------------------------------------------------------------


def test_normalize_identity_and_not_persistent() -> None:
    ident = Normalize()
    x = _images()
    assert torch.equal(ident(x), x)
    norm = Normalize(CIFAR_MEAN, CIFAR_STD)
    assert dict(norm.state_dict()) == {}
    assert {n for n, _ in norm.named_buffers()} == {"mean", "std"}
    expected = (x - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    assert torch.allclose(norm(x), expected)


@pytest.mark.parametrize("kwargs", [{"mean": (0.5, 0.5, 0.5)}, {"mean": (0.5,) * 3, "std": (1.0, 0.0, 1.0)}])
def test_normalize_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Normalize(**kwargs)


@pytest.mark.parametrize("name", ["resnet18", "preactresnet18", "wrn28-10"])
def test_in_model_normalization_matches_normalized_input(name: str) -> None:
    torch.manual_seed(0)
    with_norm = build_model(name, width=SMALL, mean=CIFAR_MEAN, std=CIFAR_STD).eval()
    plain = build_model(name, width=SMALL).eval()
    assert with_norm.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(with_norm.state_dict())  # mean/std are not in the checkpoint

    x = _images()
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = plain((x - mean) / std)
        got = with_norm(x)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(got, plain(x), atol=1e-3)
