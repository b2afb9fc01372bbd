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


@pytest.fixture(scope="session")
def analysis_run_root(tmp_path_factory, digits_splits) -> Path:
    """A run root with ST (2 epochs) and AT (3 epochs, per-epoch checkpoints, cka.json, lsc.csv): every
    explorer panel has something to draw."""
    from layerlab.analysis.cka import cka_run
    from layerlab.analysis.lsc import mu_grid, lsc_run
    from layerlab.train import train

    root = tmp_path_factory.mktemp("analysis-root")
    train(tiny_config(method="st", epochs=2), root / "ST", progress=False, splits=digits_splits)
    train(tiny_config(method="at", epochs=3, keep_every=1), root / "AT", progress=False, splits=digits_splits)
    cka_run(root / "AT", n=32, batch_size=16, steps=2, device="cpu", progress=False)
    lsc_run(root / "AT", [str(p) for p in sorted((root / "AT" / "checkpoints").glob("epoch-*.pt"))], n=32,
            mus=mu_grid(-0.5, 0.5, 5), directions=1, attack_steps=2, device="cpu", progress=False, plot=False)
    return root


def train_tiny_cnn(x: torch.Tensor, y: torch.Tensor) -> torch.nn.Module:
    """A small CNN fitted to (x, y) with Adam (~90% test accuracy on digits), in eval mode."""
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def invoke(*args: object):
    """Run the CLI in-process; stdout and stderr are kept apart."""
    from typer.testing import CliRunner

    from layerlab.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def refused(result) -> str:
    """The one error line of a refused command (exit status 2, nothing on stdout)."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == ""
    return lines[0]
