"""Evaluating any model (layerlab.benchmark, ``layerlab benchmark``) and reading the published CIFAR-10-C files."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from layerlab import runs
from layerlab.analysis import corruptions as C
from layerlab.benchmark import benchmark
from layerlab.data import load_splits
from layerlab.evaluation import evaluate_run, load_run

from conftest import invoke, refused

ATTACKS = ["natural", "pgd3"]
N = 32
TYPES = ["contrast", "jpeg_compression"]  # deterministic corruptions: generating them per image or per set agrees


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_cfg) -> Path:
    """An ST run tested on the whole digits test set of 300 (as ``benchmark`` is), trained just enough that at eps
    2/255 natural and PGD accuracy differ and neither is 0 or 100 (so equal numbers mean something)."""
    from layerlab.train import train

    run = tmp_path_factory.mktemp("bench") / "ST"
    train(tiny_cfg(method="st", test_size=300, epochs=4, train_size=512, eps=2 / 255, lr=0.1), run, progress=False)
    return run


@pytest.fixture(scope="module")
def nets(full_run, tmp_path_factory) -> Path:
    """A file of model functions: the run's architecture with and without its normalization, and misfits."""
    meta = runs.load_checkpoint(full_run / "checkpoints" / "best.pt")["meta"]
    path = tmp_path_factory.mktemp("user") / "nets.py"
    path.write_text(
        "from layerlab.models import build_model\n\n"
        f"MEAN, STD = {tuple(meta['mean'])}, {tuple(meta['std'])}\n\n"
        "def make_net():\n"
        f"    return build_model('{meta['model']}', num_classes=10, width={meta['width']}, mean=MEAN, std=STD)\n\n"
        "def make_raw():\n"
        f"    return build_model('{meta['model']}', num_classes=10, width={meta['width']})\n\n"
        "def make_wide():\n"
        f"    return build_model('{meta['model']}', num_classes=10, width={2 * meta['width']})\n\n"
        "def make_100():\n"
        f"    return build_model('{meta['model']}', num_classes=100, width={meta['width']})\n\n"
        "NOT_A_MODEL = 3\n")
    return path


def summary(report: dict) -> dict:
    """Every number of an eval.json report that depends on the model and the images."""
    return {"results": {k: (v["accuracy"], v["correct"]) for k, v in report["results"].items()},
            "worst_case": report["worst_case"], "metrics": report["metrics"], "n": report["n"]}


# ----------------------------------------------------------------------------- any model


def test_a_module_function_model_gives_the_numbers_of_the_same_weights_as_a_run(full_run, nets):
    cfg = load_run(full_run, device="cpu")[1]
    as_run = evaluate_run(full_run, ATTACKS, n=N, device="cpu", write=False)
    weights = full_run / "checkpoints" / "best.pt"  # a layerlab checkpoint: the state_dict under "model"
    kw = dict(weights=weights, n=N, attacks=ATTACKS, eps=cfg.eps, step=cfg.alpha, device="cpu")
    as_model = benchmark(f"{nets}:make_net", "digits", **kw)
    assert 0 < as_model["results"]["pgd3"]["accuracy"] < as_model["results"]["natural"]["accuracy"] < 100
    assert summary(as_model) == summary(as_run)
    assert as_model["checks"]["passed"] and as_model["model"] == f"{nets}:make_net"
    # the same network without its own normalization, normalized by the data set's statistics: the same numbers
    normalized = benchmark(f"{nets}:make_raw", "digits", normalize="dataset", **kw)
    assert summary(normalized) == summary(as_run)
    meta = runs.load_checkpoint(weights)["meta"]
    assert normalized["normalize"] == {"mean": list(meta["mean"]), "std": list(meta["std"])}
    # a plain state_dict saved with a DataParallel prefix, passed with an nn.Module: the same numbers
    plain = nets.parent / "plain.pt"
    state = runs.load_checkpoint(weights)["model"]
    torch.save({f"module.{k}": v for k, v in state.items()}, plain)
    model = load_run(full_run, device="cpu")[0]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    module = benchmark(model, "digits", **{**kw, "weights": plain})
    assert summary(module) == summary(as_run)


def test_the_cli_takes_a_module_of_the_working_directory_and_writes_eval_json(full_run, nets, tmp_path, monkeypatch):
    monkeypatch.chdir(nets.parent)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the command puts the working directory on it
    monkeypatch.delitem(sys.modules, "nets", raising=False)
    out = tmp_path / "out"
    args = ["benchmark", "--model", "nets:make_net", "--weights", full_run / "checkpoints" / "best.pt", "--dataset",
            "digits", "--out", out, "--attacks", ",".join(ATTACKS), "--n", N, "--eps", "2", "--device", "cpu"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    report = runs.read_json(out / "eval.json")
    assert summary(report) == summary(evaluate_run(full_run, ATTACKS, n=N, device="cpu", write=False))
    assert report["dataset"] == "digits" and report["weights"].endswith("best.pt") and report["normalize"] is None
    assert "corruptions" not in report and f"wrote {out / 'eval.json'}" in result.stdout
    line = refused(invoke(*args))  # the output exists
    assert "eval.json exists" in line and "--overwrite" in line
    assert invoke(*args, "--overwrite").exit_code == 0


def test_bad_models_weights_and_outputs_are_refused_in_one_line_before_any_work(full_run, nets, tmp_path):
    weights = full_run / "checkpoints" / "best.pt"
    out = tmp_path / "out"
    base = ["--dataset", "digits", "--out", out, "--n", "4", "--device", "cpu"]
    assert "cannot import 'no_such_module'" in refused(invoke("benchmark", "--model", "no_such_module:f", *base))
    assert "has no attribute 'nothing'" in refused(invoke("benchmark", "--model", f"{nets}:nothing", *base))
    assert "does not exist" in refused(invoke("benchmark", "--model", f"{nets.parent / 'none.py'}:f", *base))
    assert "not a torch.nn.Module" in refused(invoke("benchmark", "--model", f"{nets}:NOT_A_MODEL", *base))
    assert "use module:function" in refused(invoke("benchmark", "--model", "make_net", *base))
    assert "torchvision has no model" in refused(invoke("benchmark", "--model", "torchvision:no_such_net", *base))
    line = refused(invoke("benchmark", "--model", f"{nets}:make_wide", "--weights", weights, *base))
    assert "does not fit" in line and "of another shape" in line and "missing" not in line
    extra = tmp_path / "extra.pt"
    state = runs.load_checkpoint(weights)["model"]
    torch.save({**{k: v for k, v in state.items() if not k.startswith("head.")}, "fc.weight": torch.zeros(1)}, extra)
    line = refused(invoke("benchmark", "--model", f"{nets}:make_net", "--weights", extra, *base))
    assert "2 missing (head.weight, head.bias)" in line and "1 unexpected (fc.weight)" in line
    pickled = tmp_path / "pickled.pt"
    torch.save(load_run(full_run, device="cpu")[0], pickled)
    assert "weights_only=True" in refused(invoke("benchmark", "--model", f"{nets}:make_net", "--weights", pickled,
                                                 *base))
    line = refused(invoke("benchmark", "--model", f"{nets}:make_100", *base))
    assert "is (2, 100), expected (2, 10)" in line
    assert "3 means" in refused(invoke("benchmark", "--model", f"{nets}:make_net", "--normalize", "0.5/0.5", *base))
    assert "unknown attack" in refused(invoke("benchmark", "--model", f"{nets}:make_net", "--attacks", "pgdx", *base))
    assert "unknown corruption" in refused(invoke("benchmark", "--model", f"{nets}:make_net", "--corruptions", "rain",
                                                  *base))
    assert not out.exists()
    out.write_text("")
    assert "is a file" in refused(invoke("benchmark", "--model", f"{nets}:make_net", *base))


def test_timm_without_timm_names_the_install(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else find_spec(name, *a))
    with pytest.raises(RuntimeError, match="pip install timm"):
        benchmark("timm:resnet18", "digits", weights="w.pt", n=2, attacks=["natural"], device="cpu")


def test_torchvision_models_are_built_for_the_data_sets_classes_and_need_weights(tmp_path):
    import torchvision

    with pytest.raises(ValueError, match="built untrained; pass its --weights"):
        benchmark("torchvision:resnet18", "digits", n=4, attacks=["natural"], device="cpu")
    model = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    report = benchmark("torchvision:resnet18", "digits", weights=tmp_path / "w.pt", n=4, attacks=["natural"],
                       device="cpu", out=tmp_path / "out")
    assert report["n"] == 4 and report["model"] == "torchvision:resnet18"
    assert summary(report) == summary(benchmark(model, "digits", n=4, attacks=["natural"], device="cpu"))


# ----------------------------------------------------------------------------- published CIFAR-10-C


def write_published(root: Path, order: torch.Tensor) -> Path:
    """A published-layout directory for the digits test set, its images in ``order`` (positions in the stored
    test set): each file is those images corrupted by :func:`corrupt` at severities 1-5, stacked, and labels.npy
    their labels five times."""
    splits = load_splits("digits")
    images = torch.empty_like(splits.test.images)
    images[splits.test_index] = splits.test.images  # the stored order
    images, labels = images[order], splits.stored_test_labels[order]
    root.mkdir(parents=True)
    for name in TYPES:
        stacked = torch.cat([C.corrupt(images, name, s) for s in C.SEVERITIES])
        np.save(root / f"{name}.npy", stacked.permute(0, 2, 3, 1).numpy())
    np.save(root / "labels.npy", np.tile(labels.numpy().astype(np.uint8), 5))
    return root


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """Published files in the stored order of the test set."""
    return write_published(tmp_path_factory.mktemp("c10c") / "CIFAR-10-C", torch.arange(300))


@pytest.fixture(scope="module")
def published_by_class(tmp_path_factory) -> Path:
    """Published files in another order that keeps each class's images in the stored order (as an image-folder
    copy of a data set stores them class by class)."""
    labels = load_splits("digits").stored_test_labels
    return write_published(tmp_path_factory.mktemp("c10c") / "by-class", torch.argsort(labels, stable=True))


@pytest.mark.parametrize("how", ["in the stored order", "by class and order within class"])
def test_published_files_line_up_with_a_test_subset(how, published, published_by_class, digits_splits):
    n = 12
    root = published if how == "in the stored order" else published_by_class
    files = C.PublishedCorruptions(root, TYPES, digits_splits.test_index[:n], digits_splits.stored_test_labels)
    assert files.total == 300 and files.source == f"published files at {root} (matched {how})"
    for name in TYPES:
        for severity in (1, 4):
            assert torch.equal(files.images(name, severity), C.corrupt(digits_splits.test.images[:n], name, severity))


def test_corruptions_of_a_run_read_from_published_files_match_the_generated_ones(full_run, published, tmp_path):
    run = tmp_path / "ST"
    shutil.copytree(full_run, run)
    args = ["corruptions", "--run", run, "--n", N, "--types", ",".join(TYPES), "--severities", "1,3",
            "--device", "cpu"]
    assert invoke(*args).exit_code == 0
    generated = pd.read_csv(run / "corruptions.csv")
    assert (generated["source"] == "generated").all()
    assert invoke(*args, "--cifar10c", published).exit_code == 0
    read = pd.read_csv(run / "corruptions.csv")
    assert (read["source"] == f"published files at {published} (matched in the stored order)").all()
    assert read.drop(columns="source").equals(generated.drop(columns="source")) and len(read) == 1 + 2 * 2


def test_benchmark_reads_published_files_and_says_so(full_run, nets, published_by_class, tmp_path):
    kw = dict(weights=full_run / "checkpoints" / "best.pt", n=N, attacks=["natural"], severities=[2, 5],
              device="cpu")
    root = published_by_class
    read = benchmark(f"{nets}:make_net", "digits", cifar10c=root, corruptions=TYPES, out=tmp_path / "a", **kw)
    made = benchmark(f"{nets}:make_net", "digits", corruptions=TYPES, out=tmp_path / "b", **kw)
    assert read["corruptions"]["source"] == f"published files at {root} (matched by class and order within class)"
    assert made["corruptions"]["source"] == "generated"
    assert read["corruptions"]["mean"] == made["corruptions"]["mean"]
    assert read["corruptions"]["clean"] == read["results"]["natural"]["accuracy"]
    assert runs.read_json(tmp_path / "a" / "eval.json")["corruptions"] == read["corruptions"]
    csv = pd.read_csv(tmp_path / "a" / "corruptions.csv")
    assert set(csv["type"]) == {"clean", *TYPES} and (tmp_path / "a" / "corruptions.png").stat().st_size > 0
    # a directory alone means all 15 corruptions, and this one has only two
    with pytest.raises(FileNotFoundError, match=r"has no gaussian_noise.npy \(present: contrast, jpeg_compression\)"):
        benchmark(f"{nets}:make_net", "digits", cifar10c=root, **kw)


def test_a_wrong_published_directory_is_refused_in_one_line(st_run, published, tmp_path):
    run = tmp_path / "ST"
    shutil.copytree(st_run, run)
    bad = tmp_path / "bad"
    shutil.copytree(published, bad)
    args = ["corruptions", "--run", run, "--n", "8", "--types", "contrast", "--device", "cpu", "--cifar10c", bad]
    (bad / "labels.npy").unlink()
    assert "has no labels.npy" in refused(invoke(*args))
    labels = np.load(published / "labels.npy")
    np.save(bad / "labels.npy", labels[:-5])
    assert "expected 5 x 300 integer labels" in refused(invoke(*args))
    changed = labels.copy()
    changed[300] = (changed[300] + 1) % 10  # severity 2's first label
    np.save(bad / "labels.npy", changed)
    assert "does not repeat the same 300 labels" in refused(invoke(*args))
    other = labels.copy()
    other[::300] = (other[::300] + 1) % 10
    np.save(bad / "labels.npy", other)
    assert "other class counts" in refused(invoke(*args))
    np.save(bad / "labels.npy", labels)
    np.save(bad / "contrast.npy", np.load(published / "contrast.npy")[:, :16, :16])
    assert "expected uint8 (1500, 32, 32, 3)" in refused(invoke(*args))
    assert "not a directory" in refused(invoke(*args[:-1], tmp_path / "none"))
    assert not (run / "corruptions.csv").exists()


def test_a_bad_model_spec_is_refused_before_the_data_loads(monkeypatch):
    import layerlab.benchmark as B

    def no_data(*args, **kwargs):
        raise AssertionError("the data was loaded before the model spec was checked")

    monkeypatch.setattr(B, "load_splits", no_data)
    with pytest.raises(ValueError, match="no_such_module"):
        B.benchmark("no_such_module:f", "cifar10")
