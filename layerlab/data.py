"""Data sets held in memory as uint8 tensors, with tensor-side augmentation.

Why in-memory tensors: the image sets used here (digits, CIFAR-10/100, SVHN) are tiny
(<= 200 MB as uint8), so keeping them on the training device and augmenting batches there
removes the DataLoader/worker overhead and makes every run reproducible from a single
``torch.Generator``.

Sources, in the order they are tried for ``cifar10`` / ``cifar100`` / ``svhn``:

1. torchvision's own layout under the data directory (``cifar-10-batches-py``,
   ``cifar-100-python``, ``train_32x32.mat``), also accepted one level down in
   ``DATA_DIR/<name>/``;
2. an image-folder tree ``DATA_DIR/<name>/{train,test}/<class>/*`` or ``DATA_DIR/{train,test}/...``;
3. with ``download=True``, torchvision downloads into the data directory.

Image-folder trees are decoded once and cached as ``.pt`` files (see :func:`resolve_cache_dir`).
``digits`` (scikit-learn's bundled 8x8 digits, upscaled to 32x32) needs no files at all.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DATASETS",
    "NUM_CLASSES",
    "DataNotFoundError",
    "ImageSet",
    "Splits",
    "augment",
    "eval_batches",
    "load_splits",
    "resolve_cache_dir",
    "resolve_data_dir",
    "train_batches",
]

DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "svhn")
"""Named data sets accepted by :func:`load_splits` (plus ``"folder:PATH"``)."""

IMAGE_SIZE = 32
CROP_PAD = 4
DIGITS_TEST_SIZE = 300
DIGITS_SPLIT_SEED = 20240601  # fixed, independent of ``seed``: the digits test set never changes
_CACHE_FORMAT = 1  # bump when the cached tensor layout changes

_TORCHVISION_MARKERS = {
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "svhn": "train_32x32.mat",
}
NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "svhn": 10}  # per named data set (DATASETS)


class DataNotFoundError(FileNotFoundError):
    """The requested data set is not on disk (and downloading was not requested)."""


# --------------------------------------------------------------------------------------
# containers
# --------------------------------------------------------------------------------------


@dataclass
class ImageSet:
    """One split held in memory: uint8 images ``N x 3 x H x W`` and int64 labels ``N``."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(
                f"images must be uint8 N x 3 x H x W, got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(f"labels must be int64 of shape N, got {self.labels.dtype} {tuple(self.labels.shape)}")
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> ImageSet:
        """Return a copy on ``device`` (no copy when already there)."""
        return ImageSet(self.images.to(device), self.labels.to(device))

    def subset(self, indices: Tensor) -> ImageSet:
        """Return the examples at ``indices`` (a 1-D index tensor)."""
        idx = indices.to(self.labels.device)
        return ImageSet(self.images[idx], self.labels[idx])


@dataclass
class Splits:
    """Train / optional validation / test splits plus what a model needs to know about them."""

    name: str
    train: ImageSet
    val: ImageSet | None
    test: ImageSet
    num_classes: int
    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    test_index: Tensor | None = None
    """Position of each ``test`` example in the full test split as stored; None when unknown."""
    stored_test_labels: Tensor | None = None
    """Labels of the full test split in its stored order; with ``test_index`` they line ``test`` up with files
    that hold the whole test set (the published CIFAR-10-C); None when unknown."""


# --------------------------------------------------------------------------------------
# directories
# --------------------------------------------------------------------------------------


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The data directory: the argument, else env ``LAYERLAB_DATA``, else ``None``."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get("LAYERLAB_DATA")
    return Path(env).expanduser() if env else None


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """The decode cache: the argument, else env ``LAYERLAB_CACHE``, else ``~/.cache/layerlab``."""
    if cache_dir is not None and str(cache_dir) != "":
        return Path(cache_dir).expanduser()
    env = os.environ.get("LAYERLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "layerlab"


# --------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------


def load_splits(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    train_size: int | None = None,
    test_size: int | None = None,
    val_size: int = 0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    cache_dir: str | None = None,
) -> Splits:
    """Load a data set by name and return seeded, class-balanced subsets on ``device``.

    ``name`` is one of :data:`DATASETS` or ``"folder:PATH"``. ``val_size`` examples are held out
    of the training split (disjoint from the train subset); ``train_size`` / ``test_size``
    select class-balanced subsets (``None`` = everything left). ``mean``/``std`` are always
    computed on the full training split so that the normalisation does not depend on subsetting.
    """
    key = name.strip()
    low = key.lower()
    if low == "digits":
        full_train, full_test, classes = _load_digits()
        label = "digits"
    elif low in _TORCHVISION_MARKERS:
        full_train, full_test, classes = _load_named(low, data_dir, download, cache_dir)
        label = low
    elif low.startswith("folder:"):
        root = Path(key[len("folder:"):]).expanduser().resolve()
        full_train, full_test, classes = _load_folder_tree(root, cache_dir)
        label = f"folder:{root}"
    else:
        raise ValueError(f"unknown data set {name!r}; expected one of {', '.join(DATASETS)} or 'folder:PATH'")

    mean, std = channel_stats(full_train.images)
    train, val, test_index = _select_subsets(full_train, full_test, train_size, test_size, val_size, seed)
    test = full_test.subset(test_index)
    device = torch.device(device)
    return Splits(
        name=label,
        train=train.to(device),
        val=None if val is None else val.to(device),
        test=test.to(device),
        num_classes=len(classes),
        class_names=list(classes),
        mean=mean,
        std=std,
        test_index=test_index,
        stored_test_labels=full_test.labels,
    )


# --------------------------------------------------------------------------------------
# subsets
# --------------------------------------------------------------------------------------


def _rng(seed: int, stream: int) -> torch.Generator:
    """A CPU generator for one purpose (``stream``) derived from the user seed."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + stream) % (2**63))


def balanced_quotas(counts: Sequence[int], n: int, generator: torch.Generator) -> list[int]:
    """Split ``n`` over classes as equally as possible given each class's available ``counts``.

    Water-filling: classes that run out give their share to the others; the remainder that
    cannot be split evenly goes to a seeded random choice of classes.
    """
    if n > sum(counts):
        raise ValueError(f"requested {n} examples but only {sum(counts)} are available")
    quotas = [0] * len(counts)
    open_classes = [c for c in range(len(counts)) if counts[c] > 0]
    left = n
    while left > 0:
        share = left // len(open_classes)
        if share == 0:  # fewer left than open classes: give one each to a random few
            order = torch.randperm(len(open_classes), generator=generator).tolist()
            for i in order[:left]:
                quotas[open_classes[i]] += 1
            break
        for c in open_classes:
            take = min(share, counts[c] - quotas[c])
            quotas[c] += take
            left -= take
        open_classes = [c for c in open_classes if quotas[c] < counts[c]]
    return quotas


def _class_permutations(labels: Tensor, generator: torch.Generator) -> list[Tensor]:
    """Per class, that class's example indices in a seeded random order."""
    labels = labels.cpu()
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    perms = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        perms.append(idx[torch.randperm(len(idx), generator=generator)])
    return perms


def _check_size(what: str, n: int, available: int, note: str = "") -> None:
    if n < 0 or n > available:
        raise ValueError(f"{what}={n} is out of range: only {available} examples are available{note}")


def _select_subsets(
    full_train: ImageSet,
    full_test: ImageSet,
    train_size: int | None,
    test_size: int | None,
    val_size: int,
    seed: int,
) -> tuple[ImageSet, ImageSet | None, Tensor]:
    """Seeded class-balanced train/val subsets (val disjoint from train) and the test subset's positions in
    ``full_test``, in the evaluation order (:func:`interleave_classes`).

    Within each class one seeded permutation is drawn: val takes from its end and train from
    its start, so for a given seed the train subset does not move when ``val_size`` changes
    (as long as they fit together).
    """
    n_train = len(full_train)
    _check_size("val_size", val_size, n_train, " in the training split")
    avail = n_train - val_size
    if train_size is not None:
        note = f" in the training split after holding out val_size={val_size}" if val_size else " in the training split"
        _check_size("train_size", train_size, avail, note)
    if test_size is not None:
        _check_size("test_size", test_size, len(full_test), " in the test split")

    gen = _rng(seed, 1)
    perms = _class_permutations(full_train.labels, gen)
    counts = [len(p) for p in perms]
    val_q = balanced_quotas(counts, val_size, gen)
    rest = [c - v for c, v in zip(counts, val_q)]
    train_q = rest if train_size is None else balanced_quotas(rest, train_size, gen)

    val_idx = _gather(perms, val_q, from_end=True)
    train_idx = _gather(perms, train_q, from_end=False)
    train = full_train if train_size is None and val_size == 0 else full_train.subset(train_idx)
    val = full_train.subset(val_idx) if val_size > 0 else None

    test_index = torch.arange(len(full_test))
    if test_size is not None and test_size != len(full_test):
        tgen = _rng(seed, 2)
        tperms = _class_permutations(full_test.labels, tgen)
        tq = balanced_quotas([len(p) for p in tperms], test_size, tgen)
        test_index = _gather(tperms, tq, from_end=False)
    if len(test_index):  # the same order for every seed
        test_index = test_index[interleave_classes(full_test.labels[test_index], _rng(0, 3))]
    return train, val, test_index


def interleave_classes(labels: Tensor, generator: torch.Generator) -> Tensor:
    """An order of ``labels``' indices that takes one example of each class in turn (seeded within a class), so
    every prefix is class-balanced: evaluations on the first N test images (per-epoch PGD, the attack suite,
    CKA, corruptions, minimum perturbation) then see every class, whatever order the files were stored in
    (an image-folder tree is sorted by class)."""
    perms = _class_permutations(labels, generator)
    rank = torch.empty(len(labels), dtype=torch.int64)
    for p in perms:
        rank[p] = torch.arange(len(p))
    cls = labels.cpu().long()
    return torch.argsort(rank * (int(cls.max()) + 1 if len(cls) else 1) + cls, stable=True)


def _gather(perms: list[Tensor], quotas: list[int], *, from_end: bool) -> Tensor:
    """Concatenate the first (or last) ``quotas[c]`` indices of each class, sorted."""
    parts = [p[len(p) - q:] if from_end else p[:q] for p, q in zip(perms, quotas)]
    if not parts:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat(parts).sort().values


# --------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------


def channel_stats(images: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images scaled to [0, 1]."""
    if len(images) == 0:
        raise ValueError("cannot compute statistics of an empty training split")
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].to(torch.float64).div_(255.0)
        total += x.sum(dim=(0, 2, 3)).cpu()
        total_sq += x.square().sum(dim=(0, 2, 3)).cpu()
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


# --------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------


def _load_digits() -> tuple[ImageSet, ImageSet, list[str]]:
    """scikit-learn's bundled 8x8 digits as 32x32 RGB uint8, with a fixed stratified test split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    grey = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # N x 1 x 8 x 8 in [0,1]
    up = F.interpolate(grey, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = up.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    full = ImageSet(images, labels)

    gen = torch.Generator().manual_seed(DIGITS_SPLIT_SEED)
    perms = _class_permutations(labels, gen)
    quotas = balanced_quotas([len(p) for p in perms], DIGITS_TEST_SIZE, gen)
    test_idx = _gather(perms, quotas, from_end=False)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[test_idx] = False
    train_idx = torch.nonzero(mask).flatten()
    return full.subset(train_idx), full.subset(test_idx), [str(i) for i in range(10)]


# --------------------------------------------------------------------------------------
# named data sets (cifar10 / cifar100 / svhn)
# --------------------------------------------------------------------------------------


def _load_named(
    name: str, data_dir: str | os.PathLike | None, download: bool, cache_dir: str | os.PathLike | None
) -> tuple[ImageSet, ImageSet, list[str]]:
    """Find ``name`` in the data directory (torchvision layout or image folders) or download it."""
    root = resolve_data_dir(data_dir)
    searched: list[str] = []
    if root is not None:
        for candidate in (root, root / name):
            marker = candidate / _TORCHVISION_MARKERS[name]
            searched.append(str(marker))
            if marker.exists():
                return _load_torchvision(name, candidate, download=False)
        for candidate in (root / name, root):
            searched.append(str(candidate / "{train,test}"))
            if (candidate / "train").is_dir() and (candidate / "test").is_dir():
                train, test, classes = _load_folder_tree(candidate, cache_dir)
                _check_num_classes(name, candidate, classes)
                return train, test, classes
    if download:
        target = root if root is not None else resolve_cache_dir(cache_dir) / "datasets"
        target.mkdir(parents=True, exist_ok=True)
        return _load_torchvision(name, target, download=True)
    where = "no data directory given" if root is None else f"searched {', '.join(searched)}"
    raise DataNotFoundError(
        f"{name} not found ({where}); fix: pass --download to fetch it, or --data-dir DIR "
        f"(or set LAYERLAB_DATA=DIR) to a directory holding {_TORCHVISION_MARKERS[name]}/ "
        f"or {name}/{{train,test}}/<class>/ images"
    )


def _check_num_classes(name: str, where: Path, classes: list[str]) -> None:
    if len(classes) != NUM_CLASSES[name]:
        raise ValueError(f"{where} looks like {name} but has {len(classes)} class folders, expected {NUM_CLASSES[name]}")


def _load_torchvision(name: str, root: Path, *, download: bool) -> tuple[ImageSet, ImageSet, list[str]]:
    """Load via torchvision's dataset classes (no decoding needed: they store raw arrays)."""
    import torchvision.datasets as tvd

    if name == "svhn":
        parts = [tvd.SVHN(str(root), split=s, download=download) for s in ("train", "test")]
        sets = [ImageSet(torch.as_tensor(d.data).contiguous(), torch.as_tensor(d.labels, dtype=torch.int64)) for d in parts]
        return sets[0], sets[1], [str(i) for i in range(10)]
    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    parts = [cls(str(root), train=t, download=download) for t in (True, False)]
    sets = [
        ImageSet(torch.as_tensor(d.data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(d.targets, dtype=torch.int64))
        for d in parts
    ]
    return sets[0], sets[1], list(parts[0].classes)


# --------------------------------------------------------------------------------------
# image-folder trees (decoded once, cached)
# --------------------------------------------------------------------------------------


def _load_folder_tree(root: Path, cache_dir: str | os.PathLike | None) -> tuple[ImageSet, ImageSet, list[str]]:
    """Load ``root/{train,test}/<class>/*``; class indices come from the sorted train folders."""
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataNotFoundError(
                f"{root / split} is not a directory; an image-folder data set needs {root}/train/<class>/ and "
                f"{root}/test/<class>/ (fix: --data-dir DIR / LAYERLAB_DATA, or --download for named data sets)"
            )
    classes, class_to_idx = _find_classes(root / "train")
    test_classes, _ = _find_classes(root / "test")
    extra = sorted(set(test_classes) - set(classes))
    if extra:
        raise ValueError(f"{root / 'test'} has classes missing from {root / 'train'}: {extra}")
    cache = resolve_cache_dir(cache_dir)
    train = _load_split_cached(root / "train", classes, class_to_idx, cache)
    test = _load_split_cached(root / "test", classes, class_to_idx, cache)
    return train, test, classes


def _find_classes(split_dir: Path) -> tuple[list[str], dict[str, int]]:
    """The sorted class folders of ``split_dir`` and their indices; none is an error naming the folder."""
    from torchvision.datasets.folder import find_classes

    try:
        return find_classes(str(split_dir))
    except FileNotFoundError:
        raise DataNotFoundError(f"{split_dir} has no class folders; an image-folder data set needs "
                                f"{split_dir}/<class>/*.jpg|png|... (one folder per class)") from None


def _list_split(split_dir: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """(path, label) for every image file under ``split_dir``, in a deterministic order."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    present = {c: i for c, i in class_to_idx.items() if (split_dir / c).is_dir()}
    samples = make_dataset(str(split_dir), present, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise DataNotFoundError(f"no images found under {split_dir} (expected {split_dir}/<class>/*.jpg|png|...)")
    return samples


def _fingerprint(split_dir: Path, classes: list[str], n_files: int) -> str:
    """Cache key: absolute path, class list, file count and latest mtime of the split folders."""
    dirs = [split_dir] + [split_dir / c for c in classes if (split_dir / c).is_dir()]
    latest = max(d.stat().st_mtime_ns for d in dirs)
    text = f"v{_CACHE_FORMAT}|{split_dir.resolve()}|{IMAGE_SIZE}|{n_files}|{latest}|{','.join(classes)}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _cache_path(cache: Path, split_dir: Path, key: str) -> Path:
    stem = "".join(ch if ch.isalnum() else "_" for ch in f"{split_dir.parent.name}_{split_dir.name}")
    return cache / f"{stem}-{key}.pt"


def _load_split_cached(split_dir: Path, classes: list[str], class_to_idx: dict[str, int], cache: Path) -> ImageSet:
    """Decode a split folder, or reuse its cached tensors when the fingerprint matches."""
    samples = _list_split(split_dir, class_to_idx)
    path = _cache_path(cache, split_dir, _fingerprint(split_dir, classes, len(samples)))
    if path.exists():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            return ImageSet(blob["images"], blob["labels"])
        except Exception as err:  # corrupt / foreign file: decode again and overwrite
            warnings.warn(f"ignoring unreadable cache {path}: {err}", stacklevel=2)
    images = decode_images([p for p, _ in samples])
    labels = torch.tensor([y for _, y in samples], dtype=torch.int64)
    _atomic_save({"images": images, "labels": labels}, path)
    return ImageSet(images, labels)


def _atomic_save(obj: dict[str, Tensor], path: Path) -> None:
    """``torch.save`` to a temp file in the same directory, then ``os.replace`` (best effort)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(obj, fh)
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache holds public data
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as err:
        warnings.warn(f"could not write decode cache {path}: {err}", stacklevel=3)


def decode_images(paths: Sequence[str], size: int = IMAGE_SIZE, chunk: int = 4096) -> Tensor:
    """Decode image files to one uint8 ``N x 3 x size x size`` tensor.

    JPEGs are decoded in batches with ``torchvision.io.decode_jpeg`` (fast path: ~60k CIFAR
    JPEGs in ~15 s on 2 cores); other formats go through ``decode_image``. If torchvision's
    decoders are unavailable (deprecated since 0.29) PIL is used instead. Images of another
    size are resized (bilinear, antialiased).
    """
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    for start in range(0, len(paths), chunk):
        batch = paths[start:start + chunk]
        for i, img in enumerate(_decode_chunk(batch)):
            out[start + i] = _to_size(img, size)
    return out


def _decode_chunk(paths: Sequence[str]) -> list[Tensor]:
    """Decode a list of files to uint8 ``3 x H x W`` RGB tensors (torchvision, else PIL)."""
    try:
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
    except ImportError:
        return [_decode_pil(p) for p in paths]
    with warnings.catch_warnings():  # torchvision 0.29 warns on every call that decoding moves to torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        raw = [read_file(str(p)) for p in paths]
        jpeg = [i for i, r in enumerate(raw) if r.numel() >= 3 and r[:3].tolist() == [0xFF, 0xD8, 0xFF]]
        decoded: list[Tensor | None] = [None] * len(raw)
        if jpeg:
            for i, img in zip(jpeg, decode_jpeg([raw[i] for i in jpeg], mode=ImageReadMode.RGB)):
                decoded[i] = img
        for i, r in enumerate(raw):
            if decoded[i] is None:
                decoded[i] = decode_image(r, mode=ImageReadMode.RGB)
    return decoded  # type: ignore[return-value]


def _decode_pil(path: str) -> Tensor:
    """Fallback decoder: PIL to uint8 ``3 x H x W``."""
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()


def _to_size(img: Tensor, size: int) -> Tensor:
    """Resize a uint8 ``3 x H x W`` image to ``size x size`` unless it already is."""
    if img.shape[-2:] == (size, size):
        return img
    from torchvision.transforms.v2.functional import resize

    return resize(img, [size, size], antialias=True)


# --------------------------------------------------------------------------------------
# augmentation and batching
# --------------------------------------------------------------------------------------


def _draw_crop_flip(n: int, generator: torch.Generator, pad: int = CROP_PAD) -> tuple[Tensor, Tensor, Tensor]:
    """Random crop offsets (rows, cols in ``[0, 2*pad]``) and flip flags for ``n`` images."""
    dev = generator.device
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
    flip = torch.randint(0, 2, (n,), generator=generator, device=dev).bool()
    return dy, dx, flip


def _apply_crop_flip(images: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, pad: int = CROP_PAD) -> Tensor:
    """Zero-pad by ``pad``, crop each image at its ``(dy, dx)`` and mirror it where ``flip``; float [0,1].

    Done with two ``gather`` calls so the whole batch is processed at once on its device.
    """
    n, c, h, w = images.shape
    dev = images.device
    dy, dx, flip = dy.to(dev), dx.to(dev), flip.to(dev)
    padded = F.pad(images, (pad, pad, pad, pad))  # zero padding, stays uint8
    rows = dy[:, None] + torch.arange(h, device=dev)  # n x h
    cols = torch.arange(w, device=dev).expand(n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]  # n x w
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pad))
    out = out.gather(3, cols[:, None, None, :].expand(n, c, h, w))
    return out.float().div_(255.0)


def augment(images_uint8: Tensor, generator: torch.Generator) -> Tensor:
    """Random crop (zero pad 4) + random horizontal flip of a uint8 batch; returns float in [0,1].

    Reproducible given the generator's state. The random draws are made on the generator's
    device (normally the images' device) and moved to the images.
    """
    dy, dx, flip = _draw_crop_flip(len(images_uint8), generator)
    return _apply_crop_flip(images_uint8, dy, dx, flip)


def to_float(images_uint8: Tensor) -> Tensor:
    """uint8 images to float32 in [0, 1]."""
    return images_uint8.float().div_(255.0)


def train_batches(
    data: ImageSet,
    batch_size: int,
    generator: torch.Generator,
    *,
    augment: bool = True,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[Tensor, Tensor]]:
    """One shuffled epoch of ``(float images in [0,1], labels)`` batches on the data's device.

    Sharding: the permutation (drawn from ``generator``) is the same on every rank; it is cut
    into global batches of ``batch_size * world_size`` and rank ``r`` takes positions
    ``r, r + world_size, ...`` of each global batch, so shards are disjoint and cover it.
    Augmentation parameters are drawn for the whole global batch, so every rank consumes the
    generator identically and stays in sync across epochs. With ``drop_last=False`` the final
    global batch may be short and split unevenly; a rank whose share is empty yields nothing
    for it — use ``drop_last=True`` under DDP so all ranks take the same number of steps.
    """
    if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"bad batching: batch_size={batch_size}, rank={rank}, world_size={world_size}")
    n = len(data)
    dev = data.labels.device
    perm = torch.randperm(n, generator=generator, device=generator.device).to(dev)
    step = batch_size * world_size
    for start in range(0, n, step):
        chunk = perm[start:start + step]
        if drop_last and len(chunk) < step:
            break
        if augment:
            params = _draw_crop_flip(len(chunk), generator)
        mine = slice(rank, None, world_size)
        idx = chunk[mine]
        if len(idx) == 0:
            continue
        images = data.images[idx]
        if augment:
            images = _apply_crop_flip(images, *(p[mine] for p in params))
        else:
            images = to_float(images)
        yield images, data.labels[idx]


def eval_batches(data: ImageSet, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The data in order, no augmentation, as ``(float images in [0,1], labels)`` batches."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, len(data), batch_size):
        yield to_float(data.images[start:start + batch_size]), data.labels[start:start + batch_size]
