"""Block-wise freezing and re-initialization, as in CURE's layer-wise study (Section 3, Appendix G).

An *update spec* is written as the paper writes it: ``"23"`` (U-23) updates block2 and block3
and freezes everything else; digits 1..N name the residual blocks and N+1 the linear head
(the paper's "block 5" for ResNets). The stem convolution is updated together with block1,
since the paper's first block starts at the input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from layerlab.models import block_names, num_blocks



def paper_specs(n_blocks: int = 4) -> list[str]:
    """The layer-wise study's specs (CURE Fig. 2b): every single block and every contiguous run of 2..N-1
    residual blocks; for ResNets (N=4) exactly the paper's 1, 2, 3, 4, 12, 23, 34, 123, 234."""
    digits = "".join(str(i) for i in range(1, n_blocks + 1))
    return [digits[i:i + k] for k in range(1, max(2, n_blocks)) for i in range(n_blocks - k + 1)]


def valid_digits(n_blocks: int) -> list[str]:
    """The digits a spec may use for a model with ``n_blocks`` residual blocks (the head is N+1)."""
    return [str(i) for i in range(1, n_blocks + 2)]


def parse_spec(spec: str, n_blocks: int = 4) -> list[str]:
    """Turn ``"23"`` into ``["block2", "block3"]`` (``"5"`` into ``["head"]`` for N=4); reject bad specs.

    A spec is a non-empty string of distinct digits in 1..N+1, each written once.
    """
    digits = valid_digits(n_blocks)
    text = str(spec).strip()
    problem = None
    if not text:
        problem = "is empty"
    elif any(ch not in digits for ch in text):
        problem = "uses a character that is not a block number"
    elif len(set(text)) != len(text):
        problem = "repeats a block"
    if problem:
        raise ValueError(
            f"invalid block spec {spec!r}: it {problem}; use distinct digits from {''.join(digits)} "
            f"(1-{n_blocks} = residual blocks, {n_blocks + 1} = head), e.g. '23' or '234'"
        )
    return [f"block{d}" if int(d) <= n_blocks else "head" for d in sorted(text)]


def parse_specs(specs: str, n_blocks: int = 4) -> list[str]:
    """A comma-separated list of specs, or ``"all"`` for the paper's set; each spec validated."""
    items = paper_specs(n_blocks) if specs.strip() == "all" else [s.strip() for s in specs.split(",")]
    for item in items:
        parse_spec(item, n_blocks)
    return items


def updated_parts(spec: str, n_blocks: int) -> list[str]:
    """Named parts whose parameters are trained under ``spec`` (the stem follows block1)."""
    parts = parse_spec(spec, n_blocks)
    return (["stem"] if "block1" in parts else []) + parts


def _freeze_bn_stats(module: nn.Module, _inputs: object) -> None:
    """Forward pre-hook: a frozen BatchNorm always normalizes with its stored (ST) statistics."""
    module.training = False


def reinit_(module: nn.Module, generator: torch.Generator | None = None, reset_bn: bool = False) -> None:
    """Re-initialize in place: convs Kaiming-normal (fan_out, ReLU), linear N(0, 0.01) with zero bias,
    BatchNorm reset to identity with fresh statistics only when ``reset_bn``."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01, generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and reset_bn:
            m.reset_parameters()


@dataclass
class BlockReport:
    """Trainable and total parameter counts of one named part."""

    part: str
    trainable: int
    total: int


FROZEN_BN = ("fixed", "adapt")


def apply_update_spec(model: nn.Module, spec: str, *, reinit: bool = True, reset_bn: bool = False,
                      seed: int = 0, train_stem: bool = False, frozen_bn: str = "fixed") -> list[BlockReport]:
    """Freeze every part outside ``spec`` (weights, and with ``frozen_bn="fixed"`` BatchNorm statistics) and
    re-initialize the updated parts unless ``reinit`` is False (``--no-reinit`` fine-tunes, CURE Fig. 11).

    ``train_stem`` keeps the stem trainable (not re-initialized) whatever the spec, and ``frozen_bn="adapt"``
    lets frozen BatchNorm layers keep updating their running statistics in training mode: both as the
    released code's freeze study runs. Returns per-part trainable/total parameter counts.
    """
    if frozen_bn not in FROZEN_BN:
        raise ValueError(f"unknown frozen_bn {frozen_bn!r}; choose one of {list(FROZEN_BN)}")
    n = num_blocks(model)
    trained = set(updated_parts(spec, n))
    generator = torch.Generator().manual_seed(seed)
    for part in block_names(model):
        module = getattr(model, part)
        keep = part in trained or (train_stem and part == "stem")
        if part in trained and reinit:
            reinit_(module, generator=generator, reset_bn=reset_bn)
        for p in module.parameters():
            p.requires_grad_(keep)
        if not keep and frozen_bn == "fixed":
            for m in module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.register_forward_pre_hook(_freeze_bn_stats)
    return block_report(model)


def block_report(model: nn.Module) -> list[BlockReport]:
    """Trainable/total parameter count of each named part."""
    rows = []
    for part in block_names(model):
        params = list(getattr(model, part).parameters())
        rows.append(BlockReport(part, sum(p.numel() for p in params if p.requires_grad),
                                sum(p.numel() for p in params)))
    return rows


def trainable_parts(model: nn.Module) -> list[str]:
    """Names of the parts with at least one trainable parameter."""
    return [r.part for r in block_report(model) if r.trainable > 0]
