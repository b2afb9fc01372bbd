"""Tests for layerlab.analysis.corruptions: the 15 CIFAR-10-C corruptions and the `corruptions` command."""

from __future__ import annotations

import colorsys

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from layerlab.analysis import corruptions as C
from layerlab.config import make_config
from layerlab.data import load_splits

# By the reference's parameters these are not monotone in severity: glass blur trades blur for
# displacement iterations, frost lowers the image weight while raising the frost weight, and
# elastic transform's affine jitter shrinks as its displacement grows.
NOT_MONOTONE = {"glass_blur", "frost", "elastic_transform"}
RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow", "frost", "fog",
          "elastic_transform"}



@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """12 colour images with edges: digits painted in a random foreground/background colour pair."""
    s = load_splits("digits", train_size=10, test_size=100, val_size=0)
    g = torch.Generator().manual_seed(0)
    d = s.test.images[:12, :1].float() / 255
    fg, bg = torch.rand(12, 3, 1, 1, generator=g), torch.rand(12, 3, 1, 1, generator=g)
    return ((d * fg + (1 - d) * bg) * 255).round().to(torch.uint8)


def change(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> float:
    out = C.corrupt(images, name, severity, seed)
    return float((out.float() - images.float()).abs().mean() / 255)


def test_registry_groups():
    assert len(C.CORRUPTIONS) == 15 and set(C.GROUPS) == {"noise", "blur", "weather", "digital"}
    assert C.check_names(["noise", "contrast", "gaussian_noise"]) == [
        "gaussian_noise", "shot_noise", "impulse_noise", "contrast"]
    assert C.check_names(["all"]) == list(C.CORRUPTIONS)
    with pytest.raises(ValueError, match="gaussian_noise"):
        C.check_names(["gaussian"])
    with pytest.raises(ValueError, match="severity"):
        C.corrupt(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "contrast", 6)
    with pytest.raises(ValueError, match="uint8"):
        C.corrupt(torch.zeros(1, 3, 32, 32), "contrast", 1)


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_shape_dtype_range_severity_and_seed(images, name):
    out = C.corrupt(images, name, 5, seed=0)
    assert out.dtype == torch.uint8 and out.shape == images.shape and out.device == images.device
    changes = [change(images, name, s) for s in C.SEVERITIES]
    assert min(changes) > 0, changes
    if name not in NOT_MONOTONE:
        assert all(b >= a - 1e-3 for a, b in zip(changes, changes[1:])), changes
        assert changes[-1] > 1.2 * changes[0], changes
    assert torch.equal(out, C.corrupt(images, name, 5, seed=0))  # deterministic under a seed
    other = C.corrupt(images, name, 5, seed=1)
    assert (not torch.equal(out, other)) == (name in RANDOM)
    arr = C.corrupt(images.numpy(), name, 2, seed=3)  # numpy input works too
    assert torch.equal(arr, C.corrupt(images, name, 2, seed=3))


def test_brightness_matches_colorsys(images):
    x = images[:3].permute(0, 2, 3, 1).reshape(-1, 3).numpy() / 255.0
    for severity, c in zip((1, 5), (0.05, 0.3)):
        expected = []
        for r, g, b in x:
            h, s, v = colorsys.rgb_to_hsv(r, g, b)
            expected.append(colorsys.hsv_to_rgb(h, s, min(v + c, 1.0)))
        expected = np.rint(np.array(expected) * 255)
        ours = C.corrupt(images[:3], "brightness", severity).permute(0, 2, 3, 1).reshape(-1, 3).numpy()
        assert np.abs(ours - expected).max() <= 1


def test_brightness_lifts_black_to_grey():
    black = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    assert (C.corrupt(black, "brightness", 5) == round(0.3 * 255)).all()


def test_contrast_matches_torch(images):
    x = images.float() / 255
    for severity, c in zip(C.SEVERITIES, (0.75, 0.5, 0.4, 0.3, 0.15)):
        mean = x.mean(dim=(2, 3), keepdim=True)
        expected = ((x - mean) * c + mean).clamp(0, 1).mul(255).round()
        assert (C.corrupt(images, "contrast", severity).float() - expected).abs().max() <= 1


def test_gaussian_noise_statistics():
    grey = torch.full((64, 3, 32, 32), 128, dtype=torch.uint8)  # mid-grey: no clipping at these scales
    for severity, c in zip(C.SEVERITIES, (0.04, 0.06, 0.08, 0.09, 0.10)):
        noise = (C.corrupt(grey, "gaussian_noise", severity).double() - 128) / 255
        assert abs(float(noise.mean())) < 0.002
        assert float(noise.std()) == pytest.approx(c, rel=0.03)


def test_shot_and_impulse_noise_statistics():
    grey = torch.full((32, 3, 32, 32), 128, dtype=torch.uint8)
    shot = C.corrupt(grey, "shot_noise", 5).double()
    assert float(shot.mean()) == pytest.approx(128, abs=1.0)  # Poisson noise is unbiased
    assert float(((shot - 128) / 255).std()) == pytest.approx(np.sqrt(128 / 255 / 50), rel=0.05)
    imp = C.corrupt(grey, "impulse_noise", 5)
    changed = imp != 128
    assert set(imp[changed].unique().tolist()) <= {0, 255}
    assert float(changed.double().mean()) == pytest.approx(0.07, abs=0.006)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision.io's JPEG codec is deprecated, still exact
def test_jpeg_matches_torchvision(images):
    from torchvision.io import decode_jpeg, encode_jpeg

    for severity, q in zip(C.SEVERITIES, (80, 65, 58, 50, 40)):
        expected = torch.stack([decode_jpeg(encode_jpeg(im, quality=q)) for im in images])
        ours = C.corrupt(images, "jpeg_compression", severity)
        assert (ours.float() - expected.float()).abs().mean() <= 0.5


def test_zoom_matches_scipy():
    x = np.random.default_rng(0).random((3, 32, 32, 3))
    for f in (1.0, 1.07, 1.25, 2.25):
        ch = int(np.ceil(32 / f))
        top = (32 - ch) // 2
        ref = ndimage.zoom(x[:, top:top + ch, top:top + ch], (1, f, f, 1), order=1)
        t = (ref.shape[1] - 32) // 2
        assert np.allclose(C._clipped_zoom(x, f), ref[:, t:t + 32, t:t + 32], atol=1e-12)


def test_motion_blur_kernel_along_rows():
    x = np.random.default_rng(1).random((2, 8, 10))
    radius, sigma = 3, 1.5
    out = C.motion_blur_batch(x, radius, sigma, np.zeros(2))  # angle 0: blur along +x, edge repeated
    w = np.exp(-np.arange(7) ** 2 / (2 * sigma**2))
    w /= w.sum()
    expected = np.zeros_like(x)
    for i in range(7):
        expected += w[i] * x[:, :, np.minimum(np.arange(10) + i, 9)]
    assert np.allclose(out, expected)
    down = C.motion_blur_batch(x, radius, sigma, np.full(2, 90.0))  # angle 90: along +y
    expected = np.zeros_like(x)
    for i in range(7):
        expected += w[i] * x[:, np.minimum(np.arange(8) + i, 7), :]
    assert np.allclose(down, expected)


def test_defocus_kernel():
    for radius, alias in ((0.3, 0.4), (1, 0.2), (1.5, 0.1)):
        k = C._disk_kernel(radius, alias)
        assert k.sum() == pytest.approx(1.0) and np.allclose(k, k.T) and np.allclose(k, k[::-1, ::-1])
    g = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * 0.4**2))
    g /= g.sum()
    assert np.allclose(C._disk_kernel(0.3, 0.4), np.outer(g, g))  # a point disk: just the 3x3 Gaussian


def test_plasma_and_frost_texture_ranges():
    rng = np.random.default_rng(0)
    p = C.plasma_fractal(3, 32, 3.0, rng)
    assert p.shape == (3, 32, 32) and np.allclose(p.min(axis=(1, 2)), 0) and np.allclose(p.max(axis=(1, 2)), 1)
    f = C.frost_texture(4, 32, 32, rng)
    assert f.shape == (4, 32, 32, 3) and f.min() >= 0 and f.max() <= 1 and 0.3 < f.mean() < 0.6
    assert (f[..., 2] >= f[..., 0]).all()  # bluish white


def test_corruptions_cli_writes_csv_and_plot(tmp_path):
    from typer.testing import CliRunner

    from layerlab.attacks import accuracy
    from layerlab.cli import app
    from layerlab.data import to_float
    from layerlab.evaluation import load_run
    from layerlab.plots.robustness import plot_corruption_groups, plot_corruptions
    from layerlab.train import train

    run = tmp_path / "st"
    train(make_config("smoke", method="st", epochs=1, train_size=128, test_size=64, width=0.0625, device="cpu"),
          run, progress=False)
    result = CliRunner().invoke(app, ["corruptions", "--run", str(run), "--n", "16", "--severities", "1,3",
                                      "--types", "noise,contrast", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    df = pd.read_csv(run / "corruptions.csv")
    assert list(df.columns) == ["type", "group", "severity", "accuracy", "n", "source"]
    assert (df["source"] == "generated").all()
    assert len(df) == 1 + 4 * 2 and (df["n"] == 16).all() and df["accuracy"].between(0, 100).all()
    assert set(df["group"]) == {"clean", "noise", "digital"}
    model, _, splits = load_run(run, device="cpu")
    imgs, labels = splits.test.images[:16], splits.test.labels[:16]
    row = df[(df["type"] == "contrast") & (df["severity"] == 3)].iloc[0]
    direct = 100.0 * accuracy(model, to_float(C.corrupt(imgs, "contrast", 3, seed=0)), labels) / 16
    assert row["accuracy"] == pytest.approx(direct)
    assert df[df["type"] == "clean"].iloc[0]["accuracy"] == pytest.approx(
        100.0 * accuracy(model, to_float(imgs), labels) / 16)
    (run / "corruptions.png").unlink()
    assert plot_corruptions(run / "corruptions.csv", run / "corruptions.png").stat().st_size > 0  # from CSV alone
    both = plot_corruption_groups({"a": run / "corruptions.csv", "b": run / "corruptions.csv"}, tmp_path / "g.png")
    assert both.stat().st_size > 0
    bad = CliRunner().invoke(app, ["corruptions", "--run", str(run), "--severities", "7", "--device", "cpu"])
    assert bad.exit_code == 2 and "severities" in bad.output
