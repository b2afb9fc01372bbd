"""Tests for layerlab.data: loading, subsets, augmentation, batching, errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from layerlab.data import (
    interleave_classes,
    DATASETS,
    DataNotFoundError,
    ImageSet,
    augment,
    eval_batches,
    load_splits,
    resolve_data_dir,
    train_batches,
)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep tests independent of the caller's LAYERLAB_DATA and away from the user cache."""
    monkeypatch.setenv("LAYERLAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def digits():
    return load_splits("digits")


def _toy(n: int = 37, num_classes: int = 4, size: int = 8) -> ImageSet:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    return ImageSet(images, torch.arange(n, dtype=torch.int64) % num_classes)


# ------------------------------------------------------------------------------- digits


def test_datasets_constant():
    assert DATASETS == ("digits", "cifar10", "cifar100", "svhn")


def test_digits_offline_shapes_and_ranges(digits):
    s = digits
    assert s.name == "digits" and s.num_classes == 10 and s.class_names == [str(i) for i in range(10)]
    assert len(s.train) == 1497 and len(s.test) == 300 and s.val is None
    for part in (s.train, s.test):
        assert part.images.dtype == torch.uint8 and part.images.shape[1:] == (3, 32, 32)
        assert part.labels.dtype == torch.int64
        assert set(part.labels.tolist()) == set(range(10))
        assert torch.equal(part.images[:, 0], part.images[:, 1]) and torch.equal(part.images[:, 0], part.images[:, 2])
    assert s.train.images.max() == 255 and s.train.images.min() == 0
    assert torch.bincount(s.test.labels).tolist() == [30] * 10  # stratified test split
    assert all(0 < m < 1 for m in s.mean) and all(0 < v < 1 for v in s.std)


def test_digits_test_split_fixed_across_seeds_and_disjoint_from_train(digits):
    other = load_splits("digits", seed=123)
    assert torch.equal(other.test.images, digits.test.images)
    assert torch.equal(other.test.labels, digits.test.labels)
    assert other.mean == digits.mean
    # no test image is also a train image (the digits set has few exact duplicates, so compare hashes loosely)
    train_keys = {bytes(x.numpy()) for x in digits.train.images[:, 0]}
    overlap = sum(bytes(x.numpy()) in train_keys for x in digits.test.images[:, 0])
    assert overlap <= 3


def test_mean_std_match_full_train(digits):
    x = digits.train.images.double() / 255
    assert torch.allclose(torch.tensor(digits.mean, dtype=torch.float64), x.mean(dim=(0, 2, 3)))
    assert torch.allclose(torch.tensor(digits.std, dtype=torch.float64), x.std(dim=(0, 2, 3), unbiased=False))
    sub = load_splits("digits", train_size=100)
    assert sub.mean == digits.mean  # stats come from the FULL train split


# ------------------------------------------------------------------------------- subsets


def test_subsets_balanced_seeded_disjoint():
    a = load_splits("digits", train_size=503, val_size=107, test_size=45, seed=7)
    b = load_splits("digits", train_size=503, val_size=107, test_size=45, seed=7)
    c = load_splits("digits", train_size=503, val_size=107, test_size=45, seed=8)
    assert (len(a.train), len(a.val), len(a.test)) == (503, 107, 45)
    for part, n in ((a.train, 503), (a.val, 107), (a.test, 45)):
        counts = torch.bincount(part.labels, minlength=10)
        assert counts.sum() == n and counts.max() - counts.min() <= 1
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.val.labels, b.val.labels)
    assert torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.train.images, c.train.images)
    # exact disjointness of train/val is checked on unique data below


def test_val_is_disjoint_by_index_on_unique_data(monkeypatch):
    """Use a data set with unique images so disjointness can be checked exactly."""
    from layerlab import data as D

    full = _toy(n=203, num_classes=5)
    full.images[:, 0, 0, :4] = torch.arange(203).unsqueeze(1).repeat(1, 4).to(torch.uint8)  # tag
    test = _toy(n=50, num_classes=5)
    train, val, _ = D._select_subsets(full, test, 100, 20, 60, seed=3)
    tags = lambda s: set(s.images[:, 0, 0, 0].tolist())  # noqa: E731
    assert len(tags(train)) == 100 and len(tags(val)) == 60 and tags(train).isdisjoint(tags(val))
    # train subset does not move when val_size changes (val comes from the other end)
    train2, _, _ = D._select_subsets(full, test, 100, None, 30, seed=3)
    assert torch.equal(train.images, train2.images)
    # None train_size = everything not in val
    train3, val3, _ = D._select_subsets(full, test, None, None, 60, seed=3)
    assert len(train3) == 143 and tags(train3).isdisjoint(tags(val3))


@pytest.mark.parametrize("test_size", [None, 40])
def test_test_index_places_each_test_image_in_the_stored_test_split(test_size):
    from layerlab import data as D

    full, splits = D._load_digits()[1], load_splits("digits", test_size=test_size, seed=5)
    assert torch.equal(splits.stored_test_labels, full.labels)
    assert len(splits.test_index) == len(splits.test) == (test_size or len(full))
    assert torch.equal(full.images[splits.test_index], splits.test.images)
    assert torch.equal(splits.stored_test_labels[splits.test_index], splits.test.labels)


def test_unbalanced_classes_water_fill():
    from layerlab.data import balanced_quotas

    q = balanced_quotas([2, 50, 50], 30, torch.Generator().manual_seed(0))
    assert q == [2, 14, 14]
    q = balanced_quotas([10, 10, 10], 4, torch.Generator().manual_seed(0))
    assert sorted(q) == [1, 1, 2]


@pytest.mark.parametrize(
    "kwargs, available",
    [({"train_size": 1498}, "1497"), ({"test_size": 301}, "300"), ({"val_size": 1500}, "1497"),
     ({"train_size": 1400, "val_size": 100}, "1397")],
)
def test_too_large_size_raises(kwargs, available):
    with pytest.raises(ValueError, match=available):
        load_splits("digits", **kwargs)


def test_unknown_name():
    with pytest.raises(ValueError, match="folder:PATH"):
        load_splits("mnist")


# ------------------------------------------------------------------------------- augment


def test_augment_range_shape_and_reproducible():
    x = _toy(n=16, size=32).images
    out = augment(x, torch.Generator().manual_seed(5))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(out, augment(x, torch.Generator().manual_seed(6)))


def test_augment_is_a_valid_crop_or_flip_of_padded_input():
    x = _toy(n=64, size=32).images
    out = augment(x, torch.Generator().manual_seed(1))
    padded = F.pad(x, (4, 4, 4, 4)).float() / 255
    seen = set()
    for i in range(len(x)):
        matches = [
            (dy, dx, fl)
            for dy in range(9)
            for dx in range(9)
            for fl in (False, True)
            if torch.equal(out[i], (lambda c: c.flip(-1) if fl else c)(padded[i, :, dy:dy + 32, dx:dx + 32]))
        ]
        assert matches, f"image {i} is not a crop/flip of its padded input"
        seen.update(matches)
    assert any(fl for _, _, fl in seen) and any(not fl for _, _, fl in seen)
    assert len({(dy, dx) for dy, dx, _ in seen}) > 10


def test_augment_matches_independent_crop_for_known_offsets():
    """Recompute the draws from the same generator state and crop with pad + slicing."""
    x = _toy(n=8, size=32).images
    out = augment(x, torch.Generator().manual_seed(42))
    g = torch.Generator().manual_seed(42)
    dy = torch.randint(0, 9, (8,), generator=g)
    dx = torch.randint(0, 9, (8,), generator=g)
    flip = torch.randint(0, 2, (8,), generator=g).bool()
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(8):
        crop = padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        if flip[i]:
            crop = crop.flip(-1)
        assert torch.equal(out[i], crop.float() / 255)


# ------------------------------------------------------------------------------- batching


def _tags(n: int) -> ImageSet:
    """Images whose first pixel encodes their index (n <= 256)."""
    images = torch.zeros(n, 3, 8, 8, dtype=torch.uint8)
    images[:, :, :, :] = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1)
    return ImageSet(images, torch.arange(n, dtype=torch.int64))


def test_train_batches_cover_epoch_once():
    data = _tags(103)
    batches = list(train_batches(data, 10, torch.Generator().manual_seed(0), augment=False))
    assert [len(y) for _, y in batches] == [10] * 10 + [3]
    labels = torch.cat([y for _, y in batches])
    assert sorted(labels.tolist()) == list(range(103))
    assert labels.tolist() != list(range(103))  # shuffled
    for x, y in batches:  # images travel with their labels
        assert torch.equal((x[:, 0, 0, 0] * 255).round().long(), y)
        assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    dropped = list(train_batches(data, 10, torch.Generator().manual_seed(0), augment=False, drop_last=True))
    assert len(dropped) == 10


def test_train_batches_with_augment_reproducible():
    data = _toy(n=50, size=32)
    run = lambda: list(train_batches(data, 16, torch.Generator().manual_seed(3)))  # noqa: E731
    a, b = run(), run()
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert sum(len(y) for _, y in a) == 50


@pytest.mark.parametrize("n", [103, 96, 81])
def test_train_batches_shards_disjoint_and_cover(n):
    data = _tags(n)
    world = 3
    per_rank = [
        list(train_batches(data, 8, torch.Generator().manual_seed(9), rank=r, world_size=world))
        for r in range(world)
    ]
    single = list(train_batches(data, 8 * world, torch.Generator().manual_seed(9)))
    for step, (_, global_y) in enumerate(single):
        shards = [per_rank[r][step][1] for r in range(world) if step < len(per_rank[r])]
        got = torch.cat(shards).tolist()
        assert len(got) == len(set(got)) and set(got) == set(global_y.tolist())
    all_labels = torch.cat([y for batches in per_rank for _, y in batches]).tolist()
    assert sorted(all_labels) == list(range(n))


def test_eval_batches_in_order():
    data = _tags(25)
    batches = list(eval_batches(data, 10))
    assert [len(y) for _, y in batches] == [10, 10, 5]
    assert torch.cat([y for _, y in batches]).tolist() == list(range(25))
    x = torch.cat([x for x, _ in batches])
    assert torch.equal(x, data.images.float() / 255)


def test_imageset_to_and_validation():
    data = _toy()
    moved = data.to("cpu")
    assert len(moved) == len(data) and moved.images.device.type == "cpu"
    with pytest.raises(ValueError):
        ImageSet(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_and_generator():
    s = load_splits("digits", train_size=64, device="cuda")
    assert s.train.images.is_cuda and s.test.labels.is_cuda
    g = torch.Generator(device="cuda").manual_seed(0)
    x, y = next(train_batches(s.train, 32, g))
    assert x.is_cuda and y.is_cuda


# ------------------------------------------------------------------------------- missing data


def test_missing_data_error_names_dir_and_fixes(tmp_path):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    with pytest.raises(DataNotFoundError) as info:
        load_splits("cifar10", empty)
    msg = str(info.value)
    assert str(empty) in msg and "--download" in msg and "--data-dir" in msg and "LAYERLAB_DATA" in msg
    assert "\n" not in msg
    assert isinstance(info.value, FileNotFoundError)


def test_missing_data_dir_unset(monkeypatch):
    monkeypatch.delenv("LAYERLAB_DATA", raising=False)
    assert resolve_data_dir(None) is None
    with pytest.raises(DataNotFoundError, match="--download"):
        load_splits("svhn")


def test_resolve_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERLAB_DATA", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert resolve_data_dir(tmp_path / "x") == tmp_path / "x"


# ------------------------------------------------------------------------------- folder:PATH


def _write_tree(root: Path, counts: dict[str, dict[str, int]], size: int = 32) -> None:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split, per_class in counts.items():
        for ci, (cls, n) in enumerate(sorted(per_class.items())):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=gen)
                arr[0, 0] = torch.tensor([ci * 20, i, 7], dtype=torch.uint8)  # tag class + index
                Image.fromarray(arr.numpy()).save(d / f"{i:03d}.png")


def test_folder_tree_png(tmp_path):
    root = tmp_path / "tiny"
    _write_tree(root, {"train": {"cat": 6, "ant": 5, "bee": 4}, "test": {"cat": 2, "ant": 2, "bee": 2}})
    s = load_splits(f"folder:{root}", cache_dir=str(tmp_path / "c"))
    assert s.name == f"folder:{root.resolve()}"
    assert s.class_names == ["ant", "bee", "cat"] and s.num_classes == 3
    assert (len(s.train), len(s.test)) == (15, 6)
    assert s.train.images.shape == (15, 3, 32, 32) and s.train.images.dtype == torch.uint8
    # labels match folder names: pixel tag encodes the class index (sorted order)
    assert torch.equal(s.train.images[:, 0, 0, 0].long() // 20, s.train.labels)
    assert torch.bincount(s.train.labels).tolist() == [5, 4, 6]
    # pixel-exact PNG round trip
    from PIL import Image
    import numpy as np

    ref = torch.from_numpy(np.array(Image.open(root / "train" / "ant" / "000.png"))).permute(2, 0, 1)
    assert torch.equal(s.train.images[0], ref)
    # second load comes from the cache and is identical
    cached = list((tmp_path / "c").glob("*.pt"))
    assert len(cached) == 2
    again = load_splits(f"folder:{root}", cache_dir=str(tmp_path / "c"))
    assert torch.equal(again.train.images, s.train.images) and torch.equal(again.test.labels, s.test.labels)
    # adding a file changes the fingerprint -> fresh decode
    _write_tree(tmp_path / "more", {"train": {"ant": 1}})
    os.replace(tmp_path / "more" / "train" / "ant" / "000.png", root / "train" / "ant" / "099.png")
    grown = load_splits(f"folder:{root}", cache_dir=str(tmp_path / "c"))
    assert len(grown.train) == 16


def test_folder_tree_resizes_and_missing_split(tmp_path):
    root = tmp_path / "big"
    _write_tree(root, {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}}, size=48)
    s = load_splits(f"folder:{root}")
    assert s.train.images.shape == (4, 3, 32, 32)
    with pytest.raises(DataNotFoundError, match="test"):
        (root / "test" / "a" / "000.png").unlink()
        (root / "test" / "b" / "000.png").unlink()
        for d in ("a", "b"):
            (root / "test" / d).rmdir()
        (root / "test").rmdir()
        load_splits(f"folder:{root}")


def test_named_dataset_from_image_folder_layout(tmp_path):
    """cifar10 under DATA_DIR/cifar10/{train,test}/<class>/ (class count checked)."""
    classes = {f"c{i}": 1 for i in range(10)}
    _write_tree(tmp_path / "cifar10", {"train": classes, "test": classes})
    s = load_splits("cifar10", tmp_path, cache_dir=str(tmp_path / "c"))
    assert s.num_classes == 10 and len(s.train) == 10
    s2 = load_splits("cifar10", tmp_path / "cifar10", cache_dir=str(tmp_path / "c"))  # DATA_DIR is the folder
    assert torch.equal(s2.train.images, s.train.images)
    _write_tree(tmp_path / "bad" / "cifar10", {"train": {"a": 1}, "test": {"a": 1}})
    with pytest.raises(ValueError, match="10"):
        load_splits("cifar10", tmp_path / "bad", cache_dir=str(tmp_path / "c"))


# ------------------------------------------------------------------------------- real CIFAR-10

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture
def real_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Use the caller's LAYERLAB_CACHE (or ~/.cache/layerlab) so the full decode is paid once."""
    if "LAYERLAB_CACHE" in _ORIGINAL_ENV:
        monkeypatch.setenv("LAYERLAB_CACHE", _ORIGINAL_ENV["LAYERLAB_CACHE"])
    else:
        monkeypatch.delenv("LAYERLAB_CACHE", raising=False)


_ORIGINAL_ENV = {k: v for k, v in os.environ.items() if k.startswith("LAYERLAB_")}


@pytest.mark.cifar
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.skipif(not os.environ.get("LAYERLAB_DATA"), reason="set LAYERLAB_DATA to the CIFAR-10 data directory")
def test_real_cifar10(real_cache):
    s = load_splits("cifar10", train_size=200, test_size=100, val_size=50, seed=1)
    assert s.name == "cifar10" and s.num_classes == 10 and s.class_names == CIFAR_CLASSES
    assert (len(s.train), len(s.val), len(s.test)) == (200, 50, 100)
    assert s.train.images.shape == (200, 3, 32, 32) and s.train.images.dtype == torch.uint8
    assert torch.bincount(s.train.labels, minlength=10).tolist() == [20] * 10
    assert torch.bincount(s.test.labels, minlength=10).tolist() == [10] * 10
    assert abs(s.mean[0] - 0.4914) < 0.01 and abs(s.std[2] - 0.2616) < 0.01
    # labels match folder names: an image from <class>/ decodes to the same pixels under that label
    root = Path(os.environ["LAYERLAB_DATA"]) / "cifar10" / "test"
    from torchvision.io import ImageReadMode, decode_image

    full = load_splits("cifar10")
    assert len(full.train) == 50000 and len(full.test) == 10000
    for cls in ("bird", "truck"):
        ref = decode_image(str(root / cls / "0000.jpg"), mode=ImageReadMode.RGB)
        hits = (full.test.images == ref).flatten(1).all(1).nonzero().flatten()
        assert len(hits) >= 1 and full.test.labels[hits[0]] == CIFAR_CLASSES.index(cls)


def test_interleave_classes_makes_every_prefix_balanced():
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 4)  # stored sorted by class, as an image-folder tree is
    order = interleave_classes(labels, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(12))  # a permutation: the same examples
    assert labels[order].tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 2, 0]  # one per class in turn, leftovers last
    again = interleave_classes(labels, torch.Generator().manual_seed(0))
    other = interleave_classes(labels, torch.Generator().manual_seed(1))
    assert torch.equal(order, again) and not torch.equal(order, other)  # seeded within each class


def test_class_sorted_folder_tree_gives_a_balanced_test_prefix(tmp_path):
    """The first N test images (what per-epoch PGD and the analyses evaluate) cover every class."""
    root = tmp_path / "tree"
    _write_tree(root, {"train": {"a": 3, "b": 3, "c": 3}, "test": {"a": 4, "b": 4, "c": 4}}, size=8)
    for test_size in (None, 9):
        s = load_splits(f"folder:{root}", cache_dir=str(tmp_path / "c"), test_size=test_size)
        assert torch.bincount(s.test.labels[:3], minlength=3).tolist() == [1, 1, 1]
        assert torch.bincount(s.test.labels[:6], minlength=3).tolist() == [2, 2, 2]
        # labels still belong to their images (the pixel tag encodes the class)
        assert torch.equal(s.test.images[:, 0, 0, 0].long() // 20, s.test.labels)
