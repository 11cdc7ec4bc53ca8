"""Synthetic source for capacity planning: class-structured features with no images and no model.

A data set `synthetic-c<classes>-train<N>-test<M>[-s<seed>]` (any sizes, named in
a space) and backbones `synthetic_<dim>`. Every row i of a split has a label and
a latent vector z_i = mu[label] + eps_i in R^LATENT_DIM, drawn from
`default_rng([seed, split, block])` per block of BLOCK_ROWS rows, so any row
range is produced alone, in any order, with the same bits. Backbone `synthetic_<d>`
embeds z_i as A_d z_i + NOISE * e_i (A_d fixed by d), so two synthetic backbones
see the same images: adapters between them have something to learn.

For a real backbone the same data set yields 64 px noise images (class-tinted,
made on access), which exercises the real extraction path at any size.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from ._datasets import ImageSet
from ._registry import BackboneCfg, DatasetCfg, register_backbone, register_dataset_family

LATENT_DIM = 64
BLOCK_ROWS = 4096  # rows drawn from one generator: the unit of determinism
NOISE = 0.5  # per-backbone noise (the latent's class spread is 1)
CLASS_SCALE = 0.5  # spread of the class means (top-1 well below 100 at tens of classes)
IMAGE_SIZE = 64
DIMS = (64, 128, 256, 384, 512, 768, 1024, 1280, 1536, 2048)
SPLITS = ("train", "test")
_NAME = re.compile(r"synthetic-c(?P<classes>\d+)-train(?P<train>\d+)-test(?P<test>\d+)(?:-s(?P<seed>\d+))?")
PATTERN = "synthetic-c<classes>-train<N>-test<M>[-s<seed>]"


def dataset_name(*, classes: int, train: int, test: int, seed: int = 0) -> str:
    """The registry name of a synthetic data set with these sizes."""
    return f"synthetic-c{classes}-train{train}-test{test}" + (f"-s{seed}" if seed else "")


def params(name: str) -> dict[str, int]:
    """{classes, train, test, seed} of a synthetic data set name (ValueError if it is not one)."""
    m = _NAME.fullmatch(name)
    if m is None:
        raise ValueError(f"{name!r} is not a synthetic data set name ({PATTERN})")
    out = {k: int(v) for k, v in m.groupdict(default="0").items()}
    if out["classes"] < 2 or out["train"] < 1 or out["test"] < 1:
        raise ValueError(f"{name!r}: needs >= 2 classes and >= 1 row per split")
    return out


def _cfg(match: re.Match[str]) -> DatasetCfg:
    p = params(match.group(0))
    return DatasetCfg(
        match.group(0), SPLITS, offline=True, num_classes=p["classes"], resolution=IMAGE_SIZE,
        description=f"synthetic: {p['train']:,} train / {p['test']:,} test rows, {p['classes']} classes, seed {p['seed']}",
    )


def _split_rows(name: str, split: str) -> int:
    return params(name)[split]


@lru_cache(maxsize=8)
def _class_means(classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 0]).normal(size=(classes, LATENT_DIM)) * CLASS_SCALE


@lru_cache(maxsize=16)
def _projection(dim: int) -> np.ndarray:
    return (np.random.default_rng([dim, 1]).normal(size=(dim, LATENT_DIM)) / np.sqrt(LATENT_DIM)).astype(np.float32)


def _block(name: str, split: str, block: int) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
    """Labels, latents and the generator (for the backbone noise) of one block of rows."""
    p = params(name)
    n = p[split]
    rows = min(BLOCK_ROWS, n - block * BLOCK_ROWS)
    rng = np.random.default_rng([p["seed"], SPLITS.index(split), block])
    y = rng.permutation((np.arange(rows) + block * BLOCK_ROWS) % p["classes"])  # balanced classes
    z = _class_means(p["classes"], p["seed"])[y] + rng.normal(size=(rows, LATENT_DIM))
    return y.astype(np.int64), z.astype(np.float32), rng


def labels(name: str, split: str, start: int, stop: int) -> np.ndarray:
    """Labels of rows [start, stop) of a synthetic split."""
    return _rows(name, split, start, stop, dim=None)[1]


def features(name: str, split: str, dim: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(x float32 [stop - start, dim], y int64) of backbone `synthetic_<dim>` on rows [start, stop)."""
    x, y = _rows(name, split, start, stop, dim=dim)
    assert x is not None
    return x, y


def _rows(name: str, split: str, start: int, stop: int, dim: int | None) -> tuple[np.ndarray | None, np.ndarray]:
    n = _split_rows(name, split)
    if not 0 <= start <= stop <= n:
        raise ValueError(f"rows [{start}, {stop}) out of range for {name}/{split} ({n} rows)")
    xs, ys = [], []
    for block in range(start // BLOCK_ROWS, (stop - 1) // BLOCK_ROWS + 1 if stop > start else 0):
        y, z, _ = _block(name, split, block)
        lo = max(start - block * BLOCK_ROWS, 0)
        hi = min(stop - block * BLOCK_ROWS, len(y))
        ys.append(y[lo:hi])
        if dim is not None:
            noise = np.random.default_rng([dim, 2, SPLITS.index(split), block, params(name)["seed"]])
            x = z @ _projection(dim).T + NOISE * noise.normal(size=(len(y), dim)).astype(np.float32)
            xs.append(x[lo:hi])
    y_all = np.concatenate(ys) if ys else np.empty(0, np.int64)
    if dim is None:
        return None, y_all
    return (np.concatenate(xs) if xs else np.empty((0, dim), np.float32)), y_all


class NoiseImages(Sequence[np.ndarray]):
    """64 px RGB noise images of a synthetic split, made on access (uint8 HxWx3), tinted by class."""

    def __init__(self, name: str, split: str) -> None:
        self.name, self.split = name, split
        self.n = _split_rows(name, split)
        self.labels = labels(name, split, 0, self.n)
        self.tints = np.random.default_rng([params(name)["seed"], 3]).integers(0, 256, size=(params(name)["classes"], 3))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        rng = np.random.default_rng([params(self.name)["seed"], 4, SPLITS.index(self.split), int(i)])
        noise = rng.integers(0, 128, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
        return ((noise + self.tints[self.labels[i]]) // 2 + 32).astype(np.uint8)


def _load(name: str, split: str, root: object) -> ImageSet:
    """The registry loader: noise images and labels of a synthetic split (for real backbones)."""

    images = NoiseImages(name, split)
    return ImageSet(images, images.labels)


register_dataset_family(_NAME, _cfg, _load, example=dataset_name(classes=10, train=4000, test=1000))
for _dim in DIMS:
    register_backbone(BackboneCfg(f"synthetic_{_dim}", "synthetic", "none", _dim, IMAGE_SIZE, offline=True,
                                  fixed_input_size=True))
