"""layerlab: layer-wise analysis of adversarial training."""

from __future__ import annotations

import importlib
from typing import Any

# Submodules reachable as attributes without importing them (and torch, ipywidgets, ...) at `import layerlab`.
_LAZY = ("explore", "gallery")


def __getattr__(name: str) -> Any:
    """``layerlab.explore(ROOT)`` (the explorer app) and ``layerlab.gallery``, imported on first use."""
    if name in _LAZY:
        return importlib.import_module(f"layerlab.{name}")
    raise AttributeError(f"module 'layerlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
