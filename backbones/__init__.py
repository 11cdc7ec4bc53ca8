"""Backbones, data sets and cached feature extraction for lambda-compat.

    import backbones
    backbones.list_backbones("tf_*"); backbones.list_datasets()
    bb = backbones.load("tf_efficientnet_lite0")          # .model .transform .dim .weights_id
    f = backbones.extract("tf_efficientnet_lite0", "mnist", "test")   # f.x, f.y, f.meta (memory-mapped)
    job = backbones.plan(...); backbones.extract_shard(job, shard); backbones.finish(job)  # across workers
    f = backbones.open_features(handle)                   # a complete entry, no torch or timm imported

Registries are data (`_registry.py`, entries in `_zoo.py`, `_datasets.py`, `_synthetic.py`);
the modules behind them are private. The registries and the cache reader import neither
torch nor timm; the names that need them (models, extraction, training) load on first use,
so a process that only reads cached features (a trial worker) stays small.
"""
from __future__ import annotations

import importlib
from typing import Any

from . import _datasets, _synthetic, _zoo  # noqa: F401  (importing them registers the entries)
from ._cache import DTYPES, SHARD_ROWS, CacheWarning, Features, Handle, cache_root, open_features, write_features
from ._datasets import ImageSet, data_root, load_dataset
from ._registry import (
    BackboneCfg,
    DatasetCfg,
    TrainCfg,
    UnknownNameError,
    backbone_cfg,
    dataset_cfg,
    list_backbones,
    list_datasets,
    register_backbone,
    register_dataset,
)
from ._synthetic import PATTERN as SYNTHETIC_PATTERN
from ._synthetic import dataset_name as synthetic_dataset

_LAZY = {  # name -> private module (these import torch / timm)
    **dict.fromkeys(("EXTRACTOR_VERSION", "Job", "extract", "extract_shard",
                     "extraction_count", "finish", "plan"), "_extract"),
    **dict.fromkeys(("Backbone", "is_prepared", "load", "load_classifier", "weights_id"), "_models"),
    **dict.fromkeys(("CheckpointError", "load_checkpoint", "save_checkpoint", "train", "train_digest"), "_train"),
    **dict.fromkeys(("WeightMappingError", "map_state_dict", "state_dict_digest"), "_weights"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'backbones' has no attribute {name!r}")


__all__ = sorted([
    *_LAZY, "DTYPES", "SHARD_ROWS", "BackboneCfg", "CacheWarning", "DatasetCfg", "Features", "Handle", "ImageSet", "TrainCfg",
    "UnknownNameError", "backbone_cfg", "cache_root", "data_root", "dataset_cfg", "list_backbones",
    "list_datasets", "load_dataset", "open_features", "register_backbone", "register_dataset", "synthetic_dataset", "SYNTHETIC_PATTERN", "write_features",
])
