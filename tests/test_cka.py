"""Tests for layerlab.analysis.cka (minibatch unbiased-HSIC linear CKA) and layerlab.plots.cka."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from layerlab.analysis.cka import (
    CKAAccumulator,
    FeatureRecorder,
    cka_matrix,
    gram,
    hsic1,
    hsic1_pairs,
    hsic1_self,
    resolve_layers,
)
from layerlab.data import ImageSet, eval_batches
from layerlab.models import build_model
from layerlab.plots.cka import plot_cka

WIDTH = 0.0625


# ---------------------------------------------------------------------------
# Independent references (numpy / explicit loops, no code shared with the module)
# ---------------------------------------------------------------------------


def hsic_u_loops(x: np.ndarray, y: np.ndarray) -> float:
    """HSIC_1 as the U-statistic over distinct 4-tuples (Song et al. 2012, Thm. 2), linear kernels."""
    n = len(x)
    k, l = x @ x.T, y @ y.T
    total = 0.0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += k[i, j] * (l[i, j] + l[q, r] - 2 * l[i, q])
    return total / (n * (n - 1) * (n - 2) * (n - 3))


def hsic_u_numpy(x: np.ndarray, y: np.ndarray) -> float:
    """HSIC_1 closed form with explicit matrices and ones-vectors."""
    n = len(x)
    k, l = x @ x.T, y @ y.T
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    one = np.ones(n)
    value = np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * one @ k @ l @ one
    return value / (n * (n - 3))


def minibatch_cka_numpy(xs: list[np.ndarray], ys: list[np.ndarray]) -> float:
    """Mean-over-batches unbiased CKA via :func:`hsic_u_numpy`."""
    xy = np.mean([hsic_u_numpy(x, y) for x, y in zip(xs, ys)])
    xx = np.mean([hsic_u_numpy(x, x) for x in xs])
    yy = np.mean([hsic_u_numpy(y, y) for y in ys])
    return xy / np.sqrt(xx * yy)


def full_batch_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. (2019) linear CKA: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)."""
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def accumulate(xs: list[np.ndarray], ys: list[np.ndarray]) -> float:
    """CKA of one row layer vs. one column layer via the module's accumulator."""
    acc = CKAAccumulator(1, 1)
    for x, y in zip(xs, ys):
        acc.update([torch.from_numpy(x)], [torch.from_numpy(y)])
    return float(acc.cka()[0, 0])


def random_batches(rng: np.random.Generator, sizes: list[int], dx: int = 5, dy: int = 4):
    """Correlated non-Gaussian features X (b x dx), Y (b x dy) per batch."""
    w = rng.normal(size=(dx, dy))
    xs = [rng.normal(size=(b, dx)) + 0.5 for b in sizes]
    ys = [np.tanh(x @ w) + 0.3 * rng.normal(size=(len(x), dy)) for x in xs]
    return xs, ys


def random_images(n: int, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return ImageSet(images, torch.randint(0, 10, (n,), generator=g))


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet18", num_classes=10, width=WIDTH).eval()


# ---------------------------------------------------------------------------
# Estimator
# ---------------------------------------------------------------------------


def test_unbiased_hsic_equals_u_statistic_loops():
    rng = np.random.default_rng(0)
    for n in (4, 7):
        x, y = rng.normal(size=(n, 3)), rng.normal(size=(n, 5)) + 1.0
        k, l = gram(torch.from_numpy(x)), gram(torch.from_numpy(y))
        assert hsic1(k, l) == pytest.approx(hsic_u_loops(x, y), rel=1e-10, abs=1e-12)
        assert hsic1(k, k) == pytest.approx(hsic_u_loops(x, x), rel=1e-10)
        assert float(hsic1_self(k[None])[0]) == pytest.approx(hsic_u_numpy(x, x), rel=1e-10)


def test_pairwise_hsic_matches_numpy_for_every_pair():
    rng = np.random.default_rng(1)
    feats = [rng.normal(size=(9, d)) for d in (2, 6, 3)]
    grams = torch.stack([gram(torch.from_numpy(f)) for f in feats])
    pairs = hsic1_pairs(grams, grams[:2]).numpy()
    expected = np.array([[hsic_u_numpy(a, b) for b in feats[:2]] for a in feats])
    np.testing.assert_allclose(pairs, expected, rtol=1e-10, atol=1e-12)


def test_one_batch_cka_matches_loop_formula():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(7, 4)), rng.normal(size=(7, 3))
    y[:, 0] += 2 * x[:, 0]
    loops = hsic_u_loops(x, y) / np.sqrt(hsic_u_loops(x, x) * hsic_u_loops(y, y))
    assert accumulate([x], [y]) == pytest.approx(loops, rel=1e-9)


def test_multi_batch_accumulation_matches_numpy_mean_of_batches():
    rng = np.random.default_rng(3)
    xs, ys = random_batches(rng, [6, 11, 4, 20])
    assert accumulate(xs, ys) == pytest.approx(minibatch_cka_numpy(xs, ys), rel=1e-10)


def test_minibatch_estimate_converges_to_population_and_full_batch_cka():
    rng = np.random.default_rng(4)
    a, sigma = rng.normal(size=(8, 6)), 1.5
    population = np.linalg.norm(a.T) ** 2 / (np.linalg.norm(np.eye(8)) * np.linalg.norm(a.T @ a + sigma**2 * np.eye(6)))
    x = rng.normal(size=(8000, 8))
    y = x @ a + sigma * rng.normal(size=(8000, 6))
    minibatch = accumulate(np.split(x, 40), np.split(y, 40))
    full = full_batch_linear_cka(x, y)
    assert full == pytest.approx(population, abs=0.02)
    assert minibatch == pytest.approx(population, abs=0.02)
    assert minibatch == pytest.approx(full, abs=0.02)
    few = accumulate(np.split(x[:400], 2), np.split(y[:400], 2))
    assert abs(minibatch - full) < abs(few - full) + 0.01


def test_invariance_to_orthogonal_transform_and_isotropic_scaling():
    rng = np.random.default_rng(5)
    xs, ys = random_batches(rng, [12, 12, 9], dx=6)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    base = accumulate(xs, ys)
    assert accumulate([3.7 * x @ q for x in xs], ys) == pytest.approx(base, rel=1e-10)
    assert accumulate(xs, [0.01 * y for y in ys]) == pytest.approx(base, rel=1e-10)
    assert 0.05 < base < 0.99  # a non-trivial value, so the invariance checks are meaningful


def test_cka_of_features_with_themselves_is_one():
    rng = np.random.default_rng(6)
    xs, _ = random_batches(rng, [8, 8, 5])
    assert accumulate(xs, xs) == pytest.approx(1.0, abs=1e-12)
    acc = CKAAccumulator(1, 1)
    for x in xs:
        acc.update([torch.from_numpy(x)])  # ys=None: columns are the rows
    assert acc.cka()[0, 0] == pytest.approx(1.0, abs=1e-12)


def test_accumulator_size_does_not_depend_on_number_of_examples():
    rng = np.random.default_rng(7)
    shapes = []
    for batches in (1, 12):
        acc = CKAAccumulator(3, 2)
        for _ in range(batches):
            acc.update([torch.from_numpy(rng.normal(size=(16, d))) for d in (4, 9, 2)],
                       [torch.from_numpy(rng.normal(size=(16, d))) for d in (3, 5)])
        shapes.append((acc.sum_xy.shape, acc.sum_xx.shape, acc.sum_yy.shape, acc.examples))
    assert shapes[0][:3] == shapes[1][:3] == ((3, 2), (3,), (2,))
    assert (shapes[0][3], shapes[1][3]) == (16, 192)


def test_small_batches_are_rejected():
    with pytest.raises(ValueError, match="at least 4"):
        hsic1(torch.eye(3), torch.eye(3))
    model, data = tiny_model(), random_images(16)
    with pytest.raises(ValueError, match="at least 4"):
        cka_matrix(model, None, data, mode="same-inputs", batch_size=3, progress=False)
    batches = [(torch.rand(8, 3, 32, 32), torch.zeros(8, dtype=torch.long)), (torch.rand(3, 3, 32, 32), None)]
    with pytest.raises(ValueError, match="at least 4"):
        cka_matrix(model, None, batches, mode="same-inputs", progress=False, n=None)


# ---------------------------------------------------------------------------
# Models: layers, hooks, comparisons
# ---------------------------------------------------------------------------


def test_resolve_layers_and_hooked_features_are_the_module_outputs():
    model = tiny_model()
    assert resolve_layers(model) == ["stem", "block1", "block2", "block3", "block4", "head"]
    convs = resolve_layers(model, "all-convs")
    assert len(convs) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) + 1 and convs[-1] == "head"
    units = resolve_layers(model, "residual-blocks")
    assert units[1:3] == ["block1.0", "block1.1"] and len(units) == 10
    with pytest.raises(ValueError, match="unknown layer set"):
        resolve_layers(model, "everything")
    with pytest.raises(ValueError, match="unknown module names"):
        resolve_layers(model, ["block9"])
    x = torch.rand(5, 3, 32, 32)
    with FeatureRecorder(model, ["stem", "block1.0.conv1", "head"]) as rec:
        stem, conv, head = rec.features(model, x)
    with torch.no_grad():
        torch.testing.assert_close(head, model(x))
        torch.testing.assert_close(stem, model.stem(x))
        torch.testing.assert_close(conv, model.block1[0].conv1(model.stem(x)))
    assert not model.stem._forward_hooks  # hooks removed on exit


def test_same_model_natural_inputs_has_unit_diagonal_and_is_symmetric():
    model, data = tiny_model(), random_images(24)
    res = cka_matrix(model, None, data, mode="same-inputs", n=24, batch_size=8, progress=False)
    assert res.rows == res.cols and res.matrix.shape == (6, 6) and res.n == 24
    np.testing.assert_allclose(np.diag(res.matrix), 1.0, atol=1e-10)
    np.testing.assert_allclose(res.matrix, res.matrix.T, atol=1e-10)
    assert res.settings["attack"] is None and res.settings["adversarial"] is False
    assert (res.matrix[np.triu_indices(6, 1)] < 0.999).all()


def test_model_pipeline_matches_independent_computation_on_hooked_features():
    model_a, model_b, data = tiny_model(0), tiny_model(1), random_images(12)
    res = cka_matrix(model_a, model_b, data, n=12, batch_size=6, layers=["block2", "head"], progress=False)
    assert res.settings["mode"] == "same-inputs" and res.matrix.shape == (2, 2)
    x = torch.stack([im.float() / 255 for im in data.images])
    with torch.no_grad():
        fa = [model_a.block2(model_a.block1(model_a.stem(x))).flatten(1).double().numpy(), model_a(x).double().numpy()]
        fb = [model_b.block2(model_b.block1(model_b.stem(x))).flatten(1).double().numpy(), model_b(x).double().numpy()]
    expected = [[minibatch_cka_numpy(np.split(a, 2), np.split(b, 2)) for b in fb] for a in fa]
    np.testing.assert_allclose(res.matrix, expected, rtol=1e-6)


def test_imageset_and_batch_iterable_give_the_same_matrix_and_remainders_are_kept():
    model, data = tiny_model(), random_images(10)
    res = cka_matrix(model, None, data, mode="same-inputs", n=None, batch_size=4, progress=False)
    assert res.n == 10 and res.settings["batches"] == 2  # 4 + 6: a remainder of 2 joins the last batch
    x, y = next(eval_batches(data, 10))
    batches = (b for b in [(x[:4], y[:4]), (x[4:], y[4:])])  # a lazy generator without len()
    again = cka_matrix(model, None, batches, mode="same-inputs", n=None, progress=False)
    np.testing.assert_allclose(res.matrix, again.matrix, atol=1e-12)


def test_nat_vs_adv_with_zero_eps_equals_natural_and_records_the_attack():
    model, data = tiny_model(), random_images(16)
    adv0 = cka_matrix(model, None, data, eps=0.0, steps=2, n=16, batch_size=8, progress=False)
    nat = cka_matrix(model, None, data, mode="same-inputs", n=16, batch_size=8, progress=False)
    np.testing.assert_allclose(adv0.matrix, nat.matrix, atol=1e-9)
    adv = cka_matrix(model, None, data, eps=8 / 255, alpha=2 / 255, steps=3, n=16, batch_size=8, progress=False)
    assert adv.settings["mode"] == "nat-vs-adv"
    assert adv.settings["attack"] == {"name": "pgd", "norm": "linf", "eps": 8 / 255, "alpha": 2 / 255, "steps": 3,
                                      "restarts": 1, "random_start": True, "loss": "ce", "crafted_on": "model_a",
                                      "seed": 0}
    assert adv.diagonal()["head"] < 0.9999  # the attack changed the representation
    with pytest.raises(ValueError, match="nat-vs-adv"):
        cka_matrix(model, None, data, mode="nat-vs-adv", adversarial=False, progress=False)
    with pytest.raises(ValueError, match="unknown CKA mode"):
        cka_matrix(model, None, data, mode="other", progress=False)


# ---------------------------------------------------------------------------
# Run directories, CLI, plot
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """A 1-epoch smoke AT run and ST run on the built-in digits data (short attacks keep it fast)."""
    from layerlab.config import make_config
    from layerlab.train import train

    root = tmp_path_factory.mktemp("cka_runs")
    dirs = {}
    for method in ("at", "st"):
        cfg = make_config("smoke", method=method, epochs=1, train_size=128, test_size=64, val_size=32,
                          eval_size=32, width=WIDTH, attack_steps=3, epoch_eval_steps=1, eval_steps=1,
                          device="cpu")
        train(cfg, root / method, progress=False)
        dirs[method] = root / method
    return dirs


def test_cli_writes_json_and_png_for_nat_vs_adv(smoke_runs):
    from layerlab.cli import app

    run = smoke_runs["at"]
    out = CliRunner().invoke(app, ["cka", "--run", str(run), "--n", "64", "--batch-size", "32", "--steps", "3",
                                   "--no-progress"])
    assert out.exit_code == 0, out.output
    data = json.loads((run / "cka.json").read_text())
    assert (run / "cka.png").stat().st_size > 5000
    assert data["rows"] == data["cols"] == ["stem", "block1", "block2", "block3", "block4", "head"]
    assert np.array(data["matrix"], dtype=float).shape == (6, 6) and data["n"] == 64
    assert data["mode"] == "nat-vs-adv" and data["attack"]["steps"] == 3 and data["checkpoint"] == "best"
    assert data["attack"]["eps"] == pytest.approx(8 / 255) and data["run"] == str(run)
    diag = {r: data["matrix"][i][i] for i, r in enumerate(data["rows"])}
    print("\nCKA diagonal, smoke AT model, natural vs PGD-3 adversarial (n=64):",
          {k: round(v, 4) for k, v in diag.items()})
    assert all(0.0 < v <= 1.0 + 1e-9 for v in diag.values())


def test_cli_two_runs_same_inputs_and_errors(smoke_runs, tmp_path):
    from layerlab.cli import app

    target = tmp_path / "ab" / "at_vs_st.json"
    out = CliRunner().invoke(app, ["cka", "--run", str(smoke_runs["at"]), "--other", str(smoke_runs["st"]),
                                   "--natural", "--n", "32", "--batch-size", "16", "--out", str(target),
                                   "--layers", "block1,head", "--no-progress"])
    assert out.exit_code == 0, out.output
    data = json.loads(target.read_text())
    assert data["mode"] == "same-inputs" and data["attack"] is None and data["other"] == str(smoke_runs["st"])
    assert data["rows"] == data["cols"] == ["block1", "head"] and target.with_suffix(".png").exists()
    bad = CliRunner().invoke(app, ["cka", "--run", str(smoke_runs["at"]), "--batch-size", "2", "--no-progress"])
    assert bad.exit_code == 2 and "at least 4" in bad.output


def test_plot_reads_only_the_json(tmp_path):
    src = tmp_path / "elsewhere" / "result.json"
    src.parent.mkdir()
    src.write_text(json.dumps({"matrix": [[1.0, 0.4, None], [0.3, 0.9, 0.2]], "rows": ["stem", "block1"],
                               "cols": ["stem", "block1", "head"], "n": 100, "mode": "nat-vs-adv",
                               "adversarial": True, "attack": {"steps": 10, "eps": 8 / 255},
                               "row_label": "natural inputs", "col_label": "adversarial inputs"}))
    png = plot_cka(src, tmp_path / "fig" / "cka.png")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shutil.rmtree(src.parent)
    with pytest.raises(FileNotFoundError):
        plot_cka(src, tmp_path / "again.png")
