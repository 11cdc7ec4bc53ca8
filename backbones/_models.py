"""Build backbones from registry entries: `load`, `load_classifier`, weights digests."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn as nn

from ._cache import cache_root
from ._registry import BackboneCfg, DatasetCfg, backbone_cfg, list_backbones
from ._train import EmbeddingNet, checkpoint_path, ensure_checkpoint, train_preprocess
from ._transforms import Preprocess
from ._weights import load_package_weights, map_state_dict, package_weights_path, state_dict_digest

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Backbone:
    """A loaded backbone: `model(transform(img)[None])` -> embedding [1, dim]."""

    name: str
    cfg: BackboneCfg
    model: nn.Module  # eval mode, returns the embedding (no classifier)
    transform: Preprocess  # at the backbone's own input size
    dim: int
    weights_id: str  # short sha256 of the weights actually loaded (see state_dict_digest)


def preprocess_for(cfg: BackboneCfg, size: int | None = None) -> Preprocess:
    """The backbone's eval preprocessing, at `size` if given.

    At the default size this is timm's pretrained transform for `cfg.arch`
    (or the training transform for trained entries). At another size (a data
    set's resolution hint, for small images) nothing is cropped away.
    """
    if cfg.train is not None:
        prep = train_preprocess(cfg.train)
        return prep if size is None else Preprocess(size, 1.0, prep.interpolation, prep.mean, prep.std)
    pc = timm.models.get_pretrained_cfg(cfg.arch)
    if pc is None:
        raise ValueError(f"timm has no pretrained cfg for {cfg.arch!r}")
    native = size is None or size == cfg.input_size
    return Preprocess(
        cfg.input_size if size is None else size,
        pc.crop_pct if native else 1.0,
        pc.interpolation,
        tuple(pc.mean),
        tuple(pc.std),
    )


def input_resolution(cfg: BackboneCfg, dataset: DatasetCfg) -> int:
    """Input side used for `dataset`: its resolution hint unless the backbone's input is fixed."""
    if cfg.fixed_input_size or dataset.resolution is None:
        return cfg.input_size
    return dataset.resolution


def _timm_hub(cfg: BackboneCfg) -> nn.Module:
    try:
        return timm.create_model(cfg.arch, pretrained=True)
    except Exception as err:
        offline = ", ".join(list_backbones(offline=True))
        raise RuntimeError(
            f"backbone {cfg.name!r} needs timm hub weights for {cfg.arch!r}, which could not be "
            f"loaded ({type(err).__name__}: {err}). Without a network use an offline backbone: {offline}"
        ) from err


def _offline(cfg: BackboneCfg) -> nn.Module:
    model = timm.create_model(cfg.arch, pretrained=False)
    assert cfg.weights_package is not None
    model.load_state_dict(map_state_dict(load_package_weights(cfg.weights_package), model.state_dict()))
    return model


# Full classifiers (ImageNet head included) for the sources that have one.
_CLASSIFIER_BUILDERS: dict[str, Callable[[BackboneCfg], nn.Module]] = {
    "timm": _timm_hub,
    "offline": _offline,
}


def load_classifier(name: str, device: str | torch.device = "cpu") -> nn.Module:
    """The full pretrained classifier (with its ImageNet head), in eval mode.

    For checks such as "the offline EfficientNet-Lite calls a cat a cat";
    `load` returns the same network without its head.
    """
    cfg = backbone_cfg(name)
    if cfg.source not in _CLASSIFIER_BUILDERS:
        raise ValueError(f"backbone {name!r} (source {cfg.source!r}) has no pretrained classifier")
    return _CLASSIFIER_BUILDERS[cfg.source](cfg).eval().to(device)


def load(name: str, device: str | torch.device = "cpu", *, cache_dir: PathLike | None = None) -> Backbone:
    """Load a registered backbone; "trained" entries are trained and cached on first use.

    `cache_dir` (default: `cache_root()`) is where trained checkpoints live.
    """
    cfg = backbone_cfg(name)
    if cfg.source == "synthetic":
        raise ValueError(f"backbone {name!r} is synthetic: it has no model; backbones.extract makes its features")
    if cfg.train is not None:
        _, ckpt = ensure_checkpoint(cache_root(cache_dir), cfg.train, device=device)
        model: nn.Module = EmbeddingNet(cfg.train)
        model.load_state_dict(ckpt["state_dict"])
        digest = ckpt["digest"]
    else:
        model = _CLASSIFIER_BUILDERS[cfg.source](cfg)
        digest = state_dict_digest(model.state_dict())  # head included: the weights loaded
        model.reset_classifier(0)
    _WEIGHTS_IDS[_weights_memo_key(cfg, cache_dir)] = digest
    return Backbone(name, cfg, model.eval().to(device), preprocess_for(cfg), cfg.dim, digest)


_WEIGHTS_IDS: dict[tuple[object, ...], str] = {}


def _file_stamp(path: Path) -> tuple[object, ...]:
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns)


def _weights_memo_key(cfg: BackboneCfg, cache_dir: PathLike | None) -> tuple[object, ...]:
    if cfg.source == "offline":
        assert cfg.weights_package is not None
        return (cfg, _file_stamp(package_weights_path(cfg.weights_package)))
    if cfg.train is not None:
        path = checkpoint_path(cache_root(cache_dir), cfg.train)
        return (cfg, _file_stamp(path) if path.exists() else None)
    return (cfg,)


def is_prepared(name: str, *, cache_dir: PathLike | None = None) -> bool:
    """False only for a project-trained backbone whose checkpoint is not in the cache yet
    (`load` would train it first). The file is not verified here: `load` does that."""
    cfg = backbone_cfg(name)
    return cfg.train is None or checkpoint_path(cache_root(cache_dir), cfg.train).exists()


def weights_id(name: str, *, cache_dir: PathLike | None = None, device: str | torch.device = "cpu") -> str:
    """`load(name).weights_id` without building the model where the weights file suffices.

    Memoized per process by the weights file's path, size and mtime. A trained
    entry without a checkpoint is trained first (on `device`).
    """
    cfg = backbone_cfg(name)
    key = _weights_memo_key(cfg, cache_dir)
    if key in _WEIGHTS_IDS:
        return _WEIGHTS_IDS[key]
    if cfg.source == "offline":
        assert cfg.weights_package is not None
        digest = state_dict_digest(load_package_weights(cfg.weights_package))
    elif cfg.train is not None:
        digest = ensure_checkpoint(cache_root(cache_dir), cfg.train, device=device)[1]["digest"]
        key = _weights_memo_key(cfg, cache_dir)  # the file exists now
    else:
        digest = load(name, device, cache_dir=cache_dir).weights_id
    _WEIGHTS_IDS[key] = digest
    return digest
