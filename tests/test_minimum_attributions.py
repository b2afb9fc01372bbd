"""Tests for layerlab.analysis.minimum (minimum L-inf perturbation) and layerlab.analysis.attributions."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import train_tiny_cnn
import torch

from layerlab.analysis import attributions as A
from layerlab.analysis import minimum as M
from layerlab.config import make_config
from layerlab.data import load_splits, to_float



@pytest.fixture(scope="module")
def tiny():
    """A small CNN trained to ~90% on digits, and 8 test images it classifies correctly."""
    s = load_splits("digits", train_size=600, test_size=200, val_size=0)
    x, y = to_float(s.train.images), s.train.labels
    model = train_tiny_cnn(x, y)
    xt, yt = to_float(s.test.images), s.test.labels
    ok = torch.nonzero(model(xt).argmax(1) == yt).flatten()[:8]
    return model, xt[ok], yt[ok], xt, yt


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """Two run directories: a one-epoch smoke ST run and a copy of it under another name."""
    from layerlab.train import train

    root = tmp_path_factory.mktemp("runs")
    train(make_config("smoke", method="st", epochs=1, train_size=128, test_size=64, width=0.0625, device="cpu"),
          root / "ST", progress=False)
    shutil.copytree(root / "ST", root / "AT")
    return [root / "ST", root / "AT"]


# ----------------------------------------------------------------------------- minimum perturbation


def test_bisection_is_tight_and_valid(tiny):
    model, x, y, _, _ = tiny
    eps, x_adv, found = M.bisection_min_eps(model, x, y, eps_max=64 / 255, iters=10, steps=30)
    assert found.all() and (eps > 0).all()
    assert M.flips(model, x_adv, y).all()  # the returned perturbation flips the label
    assert (M.linf(x, x_adv) <= eps + 1e-6).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    assert not M.flips(model, M.pgd_at(model, x, y, 0.9 * eps, steps=30), y).any()  # 0.9 x eps does not


def test_fmn_agrees_with_bisection(tiny):
    pytest.importorskip("foolbox")
    model, x, y, _, _ = tiny
    eps_f, adv_f, ok = M.fmn_min_eps(model, x, y, steps=50)
    eps_b, _, _ = M.bisection_min_eps(model, x, y, eps_max=64 / 255, iters=10, steps=30)
    assert ok.all() and M.flips(model, adv_f, y).all()
    assert torch.allclose(M.linf(x, adv_f), eps_f)
    ratio = eps_f / eps_b  # two different estimators of the same minimum
    assert ((ratio > 0.8) & (ratio < 1.25)).all(), ratio


def test_minimum_perturbation_takes_the_smaller_and_handles_misclassified(tiny):
    pytest.importorskip("foolbox")
    model, x, y, xt, yt = tiny
    wrong = torch.nonzero(model(xt).argmax(1) != yt).flatten()[:1]
    xs, ys = torch.cat([x[:3], xt[wrong]]), torch.cat([y[:3], yt[wrong]])
    res = M.minimum_perturbation(model, xs, ys, eps_max=64 / 255, iters=10, steps=30, fmn_steps=50)
    assert res["found"].all() and (res["adv_pred"][:3] != ys[:3]).all()
    assert torch.allclose(res["eps"], M.linf(xs, res["x_adv"]))
    both = torch.stack([res["eps_fmn"][:3], res["eps_bisection"][:3]])
    assert (res["eps"][:3] <= both.min(0).values + 1e-6).all()
    assert res["eps"][3] == 0 and res["orig_pred"][3] != ys[3]
    only = M.minimum_perturbation(model, xs[:2], ys[:2], method="bisection", eps_max=64 / 255, iters=8, steps=20)
    assert only["source"] == ["bisection", "bisection"] and torch.isnan(only["eps_fmn"]).all()
    with pytest.raises(ValueError, match="bisection"):
        M.minimum_perturbation(model, xs, ys, method="deepfool")


def test_minpert_cli_writes_json_npz_and_grid(run_dirs, tmp_path):
    from typer.testing import CliRunner

    from layerlab.cli import app
    from layerlab.plots.robustness import plot_minpert

    out = tmp_path / "analysis"
    result = CliRunner().invoke(app, ["minpert", "--runs", str(run_dirs[0]), str(run_dirs[1]), "--n", "3",
                                      "--out", str(out), "--method", "bisection", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "minpert.json").read_text())
    arrays = np.load(out / "minpert.npz")
    assert [m["name"] for m in info["models"]] == ["ST", "AT"] and len(info["indices"]) == 3
    assert arrays["clean"].shape == (3, 3, 32, 32) and arrays["adv_1"].shape == (3, 3, 32, 32)
    for i, model in enumerate(info["models"]):
        for j, entry in enumerate(model["images"]):
            assert {"index", "label", "orig_pred", "adv_pred", "eps", "eps_255", "source"} <= set(entry)
            if entry["eps"] is not None:
                assert np.abs(arrays[f"adv_{i}"][j] - arrays["clean"][j]).max() <= entry["eps"] + 1e-6
                assert entry["adv_pred"] != entry["label"]
    assert info["models"][0]["images"] == info["models"][1]["images"]  # same weights, same answers
    (out / "minpert.png").unlink()
    assert plot_minpert(out / "minpert.json", out / "minpert.png").stat().st_size > 0  # redrawn from files


# ----------------------------------------------------------------------------- attributions


def test_saliency_is_abs_input_gradient(tiny):
    model, x, y, _, _ = tiny
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg).gather(1, y[:, None]).sum(), xg)
    assert torch.allclose(A.saliency(model, x, y), grad.abs(), atol=1e-7)


def test_integrated_gradients_completeness(tiny):
    model, x, y, _, _ = tiny
    ig, _ = A.integrated_gradients(model, x, y, steps=64)
    with torch.no_grad():
        gap = model(x).gather(1, y[:, None])[:, 0] - model(torch.zeros_like(x)).gather(1, y[:, None])[:, 0]
    assert torch.allclose(ig.flatten(1).sum(1), gap, rtol=0.01, atol=0.01)


def test_layer_attributions_completeness_and_stats(tiny):
    model, x, y, _, _ = tiny
    with torch.no_grad():
        gap = model(x).gather(1, y[:, None])[:, 0] - model(torch.zeros_like(x)).gather(1, y[:, None])[:, 0]
    layers = A.layer_attributions(model, x, y, steps=64, layers=["0", "1"])
    for a in layers.values():  # layer IG is complete at every layer: sums to f(x) - f(baseline)
        assert torch.allclose(a.flatten(1).sum(1), gap, rtol=0.01, atol=0.01)
    gxa = A.layer_attributions(model, x, y, method="gxa", layers=["1"])["1"]
    act = model[1](model[0](x)).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(model[3](model[2](act)).gather(1, y[:, None]).sum(), act)
    assert torch.allclose(gxa, g * act.detach(), atol=1e-6)
    stats = A.block_stats(layers)
    assert sum(s["share"] for s in stats.values()) == pytest.approx(1.0)
    assert stats["1"]["signed_sum"] == pytest.approx(float(gap.mean()), rel=0.01)
    with pytest.raises(ValueError, match="lig"):
        A.layer_attributions(model, x, y, method="deeplift", layers=["1"])


def test_attributions_cli_writes_json_npz_and_plots(run_dirs, tmp_path):
    from typer.testing import CliRunner

    from layerlab.cli import app
    from layerlab.plots.robustness import plot_attributions, plot_block_attributions

    out = tmp_path / "attr"
    result = CliRunner().invoke(app, ["attributions", "--runs", str(run_dirs[0]), str(run_dirs[1]), "--n", "2",
                                      "--out", str(out), "--ig-steps", "16", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "attributions.json").read_text())
    arrays = np.load(out / "attributions.npz")
    assert info["block_order"] == ["stem", "block1", "block2", "block3", "block4"]
    assert arrays["clean"].shape == (2, 3, 32, 32) and arrays["ig_0"].shape == (2, 32, 32)
    for model in info["models"]:
        blocks = model["blocks"]
        assert sum(b["share"] for b in blocks.values()) == pytest.approx(1.0)
        # block4 feeds pooling + a linear head, so its layer IG is exact: equals f(x) - f(black)
        assert blocks["block4"]["signed_sum"] == pytest.approx(model["logit_gap_to_baseline"], abs=1e-4)
        assert model["ig_completeness_abs_error"] >= 0 and 0 < model["ig_top10_share"] <= 1
    for name in ("attributions.png", "attributions_blocks.png"):
        (out / name).unlink()
    assert plot_attributions(out / "attributions.json", out / "attributions.png").stat().st_size > 0
    assert plot_block_attributions(out / "attributions.json", out / "attributions_blocks.png").stat().st_size > 0
