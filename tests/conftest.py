"""Shared tiny fixtures: a small digits split loaded once, a tiny config factory, a trained ST run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from layerlab.config import TrainConfig, make_config
from layerlab.data import Splits, load_splits

# On a machine whose cores are busy, OpenMP threads spin-wait on each other and two threads run a
# tiny conv net ~10x slower than one; one thread keeps the suite fast and its timing predictable.
torch.set_num_threads(int(os.environ.get("LAYERLAB_TEST_THREADS", "1")))

# Every size small enough that one epoch of PGD-AT plus its evaluation takes about a second.
TINY: dict[str, Any] = dict(
    dataset="digits", width=0.0625, epochs=1, batch_size=32, train_size=64, val_size=32, test_size=32,
    eval_size=32, eval_batch_size=64, attack_steps=2, epoch_eval_steps=1, eval_steps=2, lr=0.05,
    device="cpu", seed=0,
)


def tiny_config(**overrides: Any) -> TrainConfig:
    """The smoke profile shrunk to TINY, with ``overrides`` applied."""
    return make_config("smoke", **{**TINY, **overrides})


@pytest.fixture(scope="session")
def tiny_cfg() -> Callable[..., TrainConfig]:
    """Factory for tiny configs (a fixture so test modules need not import conftest)."""
    return tiny_config


@pytest.fixture(scope="session")
def digits_splits() -> Splits:
    """The digits splits TINY describes (the same ones the CLI loads for a TINY config)."""
    cfg = tiny_config()
    return load_splits("digits", train_size=cfg.train_size, test_size=cfg.test_size, val_size=cfg.val_size,
                       seed=cfg.seed)


@pytest.fixture(scope="session")
def st_run(tmp_path_factory: pytest.TempPathFactory, digits_splits: Splits) -> Path:
    """A finished one-epoch ST run directory (read-only for tests: copy it before writing into it)."""
    from layerlab.train import train

    run_dir = tmp_path_factory.mktemp("st") / "ST"
    train(tiny_config(method="st"), run_dir, progress=False, splits=digits_splits)
    return run_dir


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and modification time of every file under ``root`` (to prove nothing was touched)."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def snapshot_files() -> Callable[[Path], dict[str, tuple[bytes, int]]]:
    """The :func:`snapshot` helper as a fixture."""
    return snapshot
