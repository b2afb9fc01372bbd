"""Tests for LSC weight-loss landscapes and removal rates (layerlab.analysis.lsc) and their plots."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from layerlab.analysis.lsc import (
    DEFAULT_EDGES,
    LSC_COLUMNS,
    REMOVAL_COLUMNS,
    epoch_checkpoints,
    filter_normalized_direction,
    landscape,
    mu_grid,
    parse_edges,
    per_example_loss,
    resolve_checkpoints,
    lsc_run,
    split_groups,
)
from layerlab.config import make_config
from layerlab.models import build_model
from layerlab.train import train


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("resnet18", num_classes=10, width=0.0625).eval()


def test_filter_normalized_direction_matches_filter_norms():
    model = tiny_model()
    d = filter_normalized_direction(model, torch.Generator().manual_seed(3))
    again = filter_normalized_direction(model, torch.Generator().manual_seed(3))
    for name, w in model.named_parameters():
        assert d[name].shape == w.shape and torch.equal(d[name], again[name])
        if w.dim() <= 1:  # biases and BatchNorm parameters: no movement
            assert bool((d[name] == 0).all())
        else:  # every conv filter / linear row has the norm of the weight's filter
            for i in range(w.shape[0]):
                assert d[name][i].norm().item() == pytest.approx(w[i].norm().item(), rel=1e-5)
            assert not torch.allclose(d[name], w)


def test_split_groups_partition_and_edges():
    losses = torch.tensor([0.0, 0.49, 0.5, 0.99, 1.0, 2.999, 3.0, 7.5, 2.2, 1.7])
    groups = split_groups(losses, DEFAULT_EDGES)
    assert sum(len(g) for g in groups) == len(losses)
    assert [g.label for g in groups][:2] == ["[0.0,0.5)", "[0.5,1.0)"] and groups[-1].label == "[3.0,inf)"
    for g in groups:
        assert bool(((losses[g.members] >= g.lo) & (losses[g.members] < g.hi)).all())
    counts = {g.label: len(g) for g in groups}
    assert counts == {"[0.0,0.5)": 2, "[0.5,1.0)": 2, "[1.0,1.5)": 1, "[1.5,2.0)": 1, "[2.0,2.5)": 1,
                      "[2.5,3.0)": 1, "[3.0,inf)": 2}
    random = torch.rand(500) * 5
    assert sum(len(g) for g in split_groups(random)) == 500


def test_parse_edges_and_grid():
    assert parse_edges("0,0.5,1") == (0.0, 0.5, 1.0, math.inf)
    assert parse_edges([0, 1, math.inf]) == (0.0, 1.0, math.inf)
    with pytest.raises(ValueError):
        parse_edges("1,0.5")
    grid = mu_grid(-1, 1, 21)
    assert len(grid) == 21 and grid[10] == 0.0 and grid[0] == -1.0 and grid[-1] == 1.0


def test_landscape_matches_independent_evaluation():
    model = tiny_model(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 3, 32, 32, generator=g), torch.randint(0, 10, (40,), generator=g)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = per_example_loss(model, x, y, batch_size=16)
    groups = split_groups(losses, (0.0, 2.3, 2.35, math.inf))
    mus = [-0.5, 0.0, 0.25]
    values = landscape(model, x, y, groups, mus, directions=2, seed=5, batch_size=16)
    assert values.shape == (2, 3, 3)
    # the weights (and BN statistics) are untouched afterwards
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    for j, grp in enumerate(groups):
        if len(grp) == 0:
            assert bool(values[:, :, j].isnan().all())
            continue
        xs, ys = x[grp.members], y[grp.members]
        with torch.no_grad():  # g_j(0): the direct mean loss of the group at w
            direct = F.cross_entropy(model(xs), ys).item()
        assert values[:, 1, j].tolist() == pytest.approx([direct, direct], rel=1e-5)
        for k in range(2):  # g_j(mu) at w + mu d with an independently evaluated perturbed model
            d = filter_normalized_direction(weights, torch.Generator().manual_seed(5 * 1_000_003 + k))
            for m, mu in enumerate(mus):
                moved = {n: w + mu * d[n] for n, w in weights.items()}
                with torch.no_grad():
                    logits = functional_call(model, {**moved, **buffers}, (xs,))
                assert values[k, m, j].item() == pytest.approx(F.cross_entropy(logits, ys).item(), rel=1e-4)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("lsc") / "run"
    cfg = make_config("smoke", width=0.0625, epochs=2, train_size=48, test_size=16, val_size=16, eval_size=16,
                      batch_size=16, attack_steps=1, epoch_eval_steps=0, grad_stats=False, keep_every=1)
    train(cfg, out, progress=False, stop_after=2)
    return out


def test_trainer_keeps_epoch_checkpoints(run_dir):
    assert [p.name for p in epoch_checkpoints(run_dir)] == ["epoch-1.pt", "epoch-2.pt"]
    labels = resolve_checkpoints(run_dir, ["best", "last", str(run_dir / "checkpoints" / "epoch-1.pt")])
    assert [label for label, _ in labels] == ["best", "last", "epoch-1"]
    with pytest.raises(FileNotFoundError):
        resolve_checkpoints(run_dir, ["nope.pt"])


def test_run_lsc_writes_csvs_and_plots(run_dir, tmp_path):
    from layerlab.plots.lsc import plot_lsc, plot_removal_rate

    paths = lsc_run(run_dir, ["best", "last"], n=32, mus=[-0.2, 0.0, 0.2], directions=2, attack_steps=2,
                    batch_size=16, out=tmp_path, progress=False)
    lsc = pd.read_csv(paths["lsc"])
    assert tuple(lsc.columns) == LSC_COLUMNS
    assert set(lsc["checkpoint"]) == {"best", "last"} and set(lsc["direction"]) == {0, 1}
    for (_, _, _), part in lsc.groupby(["checkpoint", "direction", "mu"]):
        assert part["n_examples"].sum() == 32  # the groups partition the examples
    assert bool((lsc["loss"] >= 0).all())
    removal = pd.read_csv(paths["removal_rate"])
    assert tuple(removal.columns) == REMOVAL_COLUMNS
    assert list(removal["checkpoint"]) == ["epoch-1", "epoch-2"] and list(removal["epoch"]) == [1, 2]
    assert bool(((removal["removal_rate"] >= 0) & (removal["removal_rate"] <= 1)).all())
    # the figures are drawn from the CSVs alone
    (tmp_path / "copy").mkdir()
    for key in ("lsc", "removal_rate"):
        (tmp_path / "copy" / f"{key}.csv").write_text(paths[key].read_text())
    for png in (plot_lsc(tmp_path / "copy" / "lsc.csv", tmp_path / "copy" / "a.png"),
                plot_removal_rate(tmp_path / "copy" / "removal_rate.csv", tmp_path / "copy" / "b.png"),
                paths["lsc_plot"], paths["removal_rate_plot"]):
        assert png.read_bytes()[:4] == b"\x89PNG"


def test_lsc_command(run_dir, tmp_path):
    from typer.testing import CliRunner

    from layerlab.cli import app

    result = CliRunner().invoke(app, ["lsc", "--run", str(run_dir), "--checkpoints", "last", "--n", "16",
                                      "--points", "3", "--directions", "1", "--attack-steps", "1",
                                      "--edges", "0,2,2.5", "--out", str(tmp_path), "--no-progress"])
    assert result.exit_code == 0, result.output
    lsc = pd.read_csv(tmp_path / "lsc.csv")
    assert set(lsc["mu"]) == {-1.0, 0.0, 1.0} and set(lsc["group"]) <= {"[0.0,2.0)", "[2.0,2.5)", "[2.5,inf)"}
    assert (tmp_path / "lsc.png").exists() and (tmp_path / "removal_rate.png").exists()
