"""CIFAR-style (32x32) classifiers with a uniform, layer-addressable structure.

Every model returned by :func:`build_model` exposes the same named parts as
attributes, in forward order::

    stem -> block1 -> ... -> blockN -> (global avg pool, flatten) -> head

``N`` is 4 for the ResNets and 3 for the WideResNets. ``head`` is exactly the
``nn.Linear`` classifier, and every entry of ``state_dict()`` has a key that
starts with one of these part names, so layer-wise analyses (per-block
perturbations, per-block gradient norms, freezing, ...) can address parameters
by part without per-architecture special cases.

Conventions:

* Inputs are images in ``[0, 1]``. Normalization, if any, is the first module
  of ``stem`` (:class:`Normalize`); its mean/std are non-persistent buffers, so
  checkpoints are independent of the normalization constants.
* Pre-activation networks (PreActResNet, WideResNet) end with a final
  BatchNorm + ReLU before pooling; that pair lives at the end of the *last*
  block (``blockN.bn`` / ``blockN.relu``), not in ``head``.
* ``width`` scales every channel count (rounded, at least 1) to build cheap
  CPU miniatures; ``width=1.0`` is the standard architecture.

Architectures follow the reference code used in the adversarial-training
literature: kuangliu/pytorch-cifar for ResNet-18/50/101, the AWP/RWP code's
PreActResNet-18 (1x1-conv shortcut without BN, applied to the pre-activated
input) and the TRADES/AWP WideResNet (without the unused ``sub_block1``).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MODEL_NAMES",
    "Normalize",
    "build_model",
    "block_names",
    "num_blocks",
    "block_of_param",
    "count_parameters",
]

MODEL_NAMES: tuple[str, ...] = (
    "resnet18",
    "resnet50",
    "resnet101",
    "preactresnet18",
    "wrn34-10",
    "wrn28-10",
)
"""Canonical model names; any ``wrn-D-K`` / ``wrnD-K`` with ``(D - 4) % 6 == 0`` also works."""

_WRN_PATTERN = re.compile(r"^wrn-?(\d+)-(\d+)$")
_PART_PATTERN = re.compile(r"^(stem|head|block\d+)(?:\.|$)")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile


# ---------------------------------------------------------------------------
# Small building blocks
# ---------------------------------------------------------------------------


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``; identity when mean and std are None.

    Lives inside the model so that attacks and analyses always operate in
    ``[0, 1]`` pixel space. The buffers are non-persistent: they follow
    ``.to(device)`` but are not part of ``state_dict()``.
    """

    def __init__(
        self,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("Normalize needs both mean and std, or neither")
        if mean is None or std is None:
            self.register_buffer("mean", None, persistent=False)
            self.register_buffer("std", None, persistent=False)
            return
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() != std_t.numel():
            raise ValueError(f"mean and std must have the same length, got {mean_t.numel()} and {std_t.numel()}")
        if bool((std_t <= 0).any()):
            raise ValueError(f"std must be positive, got {std_t.tolist()}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return x
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        if self.mean is None:
            return "identity"
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def _scale(channels: int, width: float) -> int:
    """Channel count scaled by the width multiplier (rounded, at least 1)."""
    return max(1, int(round(channels * width)))


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


def _final_bn_relu(blocks: list[nn.Module], channels: int) -> nn.Sequential:
    """Sequential of residual blocks followed by the pre-activation nets' final BN+ReLU."""
    named: list[tuple[str, nn.Module]] = [(str(i), b) for i, b in enumerate(blocks)]
    named += [("bn", nn.BatchNorm2d(channels)), ("relu", nn.ReLU())]
    return nn.Sequential(OrderedDict(named))


# ---------------------------------------------------------------------------
# Residual blocks
# ---------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Post-activation ResNet basic block (two 3x3 convs), kuangliu-style."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(_conv1x1(in_planes, planes, stride), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """Post-activation ResNet bottleneck block (1x1, 3x3, 1x1), kuangliu-style."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = _conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, out_planes)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(_conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation basic block as in the AWP/RWP code.

    The projection shortcut is a bare 1x1 conv (no BN) applied to the
    pre-activated input ``relu(bn1(x))``.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(_conv1x1(in_planes, planes, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class WideBasicBlock(nn.Module):
    """WideResNet basic block as in the TRADES/AWP code (pre-activation, no dropout).

    When the channel count changes, the pre-activation ``relu(bn1(x))`` feeds
    both the residual branch and the 1x1 projection shortcut.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, out_planes, stride)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = _conv3x3(out_planes, out_planes)
        self.equal_in_out = in_planes == out_planes
        self.conv_shortcut: nn.Module | None = None
        if not self.equal_in_out:
            self.conv_shortcut = _conv1x1(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(pre)
        return out + shortcut


# ---------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------


class _PartsNet(nn.Module):
    """Common skeleton: ``stem -> block1..blockN -> global avg pool -> head``."""

    arch: str
    num_classes: int
    width: float

    def _set_blocks(self, blocks: Sequence[nn.Module]) -> None:
        for i, block in enumerate(blocks, start=1):
            self.add_module(f"block{i}", block)
        self._num_blocks = len(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem(x)
        for i in range(1, self._num_blocks + 1):
            out = getattr(self, f"block{i}")(out)
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.head(out)


def _make_stage(
    block: Callable[[int, int, int], nn.Module], in_planes: int, planes: int, n: int, stride: int, expansion: int
) -> tuple[list[nn.Module], int]:
    """``n`` residual blocks, the first with ``stride``; returns blocks and output channels."""
    layers: list[nn.Module] = []
    for s in [stride] + [1] * (n - 1):
        layers.append(block(in_planes, planes, s))
        in_planes = planes * expansion
    return layers, in_planes


class ResNet(_PartsNet):
    """CIFAR ResNet (kuangliu): 3x3 stem conv + BN + ReLU, no max-pool, 4 stages."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: Sequence[int],
        num_classes: int,
        width: float,
        normalize: Normalize,
    ) -> None:
        super().__init__()
        base = _scale(64, width)
        self.stem = nn.Sequential(
            OrderedDict(
                [("norm", normalize), ("conv", _conv3x3(3, base)), ("bn", nn.BatchNorm2d(base)), ("relu", nn.ReLU())]
            )
        )
        in_planes, stages = base, []
        for i, (n, stride) in enumerate(zip(num_blocks, (1, 2, 2, 2))):
            layers, in_planes = _make_stage(block, in_planes, _scale(64 * 2**i, width), n, stride, block.expansion)
            stages.append(nn.Sequential(*layers))
        self._set_blocks(stages)
        self.head = nn.Linear(in_planes, num_classes)


class PreActResNet(_PartsNet):
    """PreActResNet (AWP/RWP code): bare 3x3 stem conv; final BN+ReLU ends ``block4``."""

    def __init__(self, num_blocks: Sequence[int], num_classes: int, width: float, normalize: Normalize) -> None:
        super().__init__()
        base = _scale(64, width)
        self.stem = nn.Sequential(OrderedDict([("norm", normalize), ("conv", _conv3x3(3, base))]))
        in_planes, stages = base, []
        for i, (n, stride) in enumerate(zip(num_blocks, (1, 2, 2, 2))):
            layers, in_planes = _make_stage(PreActBlock, in_planes, _scale(64 * 2**i, width), n, stride, 1)
            last = i == len(num_blocks) - 1
            stages.append(_final_bn_relu(layers, in_planes) if last else nn.Sequential(*layers))
        self._set_blocks(stages)
        self.head = nn.Linear(in_planes, num_classes)


class WideResNet(_PartsNet):
    """WideResNet-D-K (TRADES/AWP code): 3 stages of (D-4)/6 blocks; final BN+ReLU ends ``block3``."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int, width: float, normalize: Normalize) -> None:
        super().__init__()
        n = (depth - 4) // 6
        channels = [_scale(c, width) for c in (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)]
        self.stem = nn.Sequential(OrderedDict([("norm", normalize), ("conv", _conv3x3(3, channels[0]))]))
        in_planes, stages = channels[0], []
        for i, stride in enumerate((1, 2, 2)):
            layers, in_planes = _make_stage(WideBasicBlock, in_planes, channels[i + 1], n, stride, 1)
            stages.append(_final_bn_relu(layers, in_planes) if i == 2 else nn.Sequential(*layers))
        self._set_blocks(stages)
        self.head = nn.Linear(in_planes, num_classes)


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def _init_weights(model: nn.Module) -> None:
    """torchvision-style init: Kaiming-normal (fan_out, relu) convs, BN weight 1 / bias 0.

    Linear layers keep PyTorch's default init, as in torchvision.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _parse_wrn(name: str) -> tuple[int, int] | None:
    """``(depth, widen_factor)`` for ``wrnD-K`` / ``wrn-D-K`` names, else None."""
    match = _WRN_PATTERN.match(name)
    if match is None:
        return None
    depth, k = int(match.group(1)), int(match.group(2))
    if depth < 10 or (depth - 4) % 6 != 0 or k < 1:
        raise ValueError(f"invalid WideResNet {name!r}: need depth = 6n + 4 >= 10 and widen factor >= 1")
    return depth, k


def _construct(name: str, num_classes: int, width: float, normalize: Normalize) -> _PartsNet:
    """Instantiate the architecture for a canonical (lower-case) name."""
    if name == "resnet18":
        return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, width, normalize)
    if name == "resnet50":
        return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, width, normalize)
    if name == "resnet101":
        return ResNet(Bottleneck, (3, 4, 23, 3), num_classes, width, normalize)
    if name == "preactresnet18":
        return PreActResNet((2, 2, 2, 2), num_classes, width, normalize)
    wrn = _parse_wrn(name)
    if wrn is not None:
        return WideResNet(wrn[0], wrn[1], num_classes, width, normalize)
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)} (or wrn-D-K)")


def build_model(
    name: str,
    num_classes: int = 10,
    width: float = 1.0,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> nn.Module:
    """Build a CIFAR-style classifier taking ``[0, 1]`` images of shape (B, 3, 32, 32).

    ``width`` multiplies every channel count (CPU miniatures); ``mean``/``std``
    set the in-model :class:`Normalize` (identity when both are None).
    Initialization uses the global torch RNG, so it is reproducible under
    ``torch.manual_seed``. Raises ``ValueError`` for unknown names or bad arguments.
    """
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {type(name).__name__}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    arch = name.strip().lower()
    model = _construct(arch, num_classes, width, Normalize(mean, std))
    _init_weights(model)
    model.arch = arch
    model.num_classes = num_classes
    model.width = float(width)
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DataParallel/DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def num_blocks(model: nn.Module) -> int:
    """Number of residual stages ``N`` (attributes ``block1`` .. ``blockN``)."""
    model = _unwrap(model)
    if not isinstance(getattr(model, "stem", None), nn.Module) or not isinstance(getattr(model, "head", None), nn.Module):
        raise ValueError(f"{type(model).__name__} does not expose 'stem'/'head' parts; build it with build_model")
    n = 0
    while isinstance(getattr(model, f"block{n + 1}", None), nn.Module):
        n += 1
    return n


def block_names(model: nn.Module) -> list[str]:
    """Part names in forward order: ``["stem", "block1", ..., "blockN", "head"]``."""
    return ["stem", *(f"block{i}" for i in range(1, num_blocks(model) + 1)), "head"]


def block_of_param(name: str) -> str:
    """Part (``"stem"``, ``"blockK"`` or ``"head"``) owning a parameter/buffer name.

    Accepts ``state_dict()``/``named_parameters()`` names, also with
    ``module.``/``_orig_mod.`` wrapper prefixes. Raises ``ValueError`` otherwise.
    """
    stripped = name
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if stripped.startswith(prefix):
                stripped, changed = stripped[len(prefix) :], True
    match = _PART_PATTERN.match(stripped)
    if match is None:
        raise ValueError(f"parameter name {name!r} does not belong to stem/blockK/head")
    return match.group(1)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Total number of parameter elements (only ``requires_grad`` ones if ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
