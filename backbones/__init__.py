"""Backbones, data sets and cached feature extraction for lambda-compat.

    import backbones
    backbones.list_backbones("tf_*"); backbones.list_datasets()
    bb = backbones.load("tf_efficientnet_lite0")          # .model .transform .dim .weights_id
    f = backbones.extract("tf_efficientnet_lite0", "mnist", "test")   # f.x, f.y, f.meta (memory-mapped)
    job = backbones.plan(...); backbones.extract_shard(job, shard); backbones.finish(job)  # split across workers

Registries are data (`_registry.py`, entries in `_zoo.py` and `_datasets.py`);
the modules behind them are private.
"""
from . import _datasets, _synthetic, _zoo  # noqa: F401  (importing them registers the entries)
from ._cache import CacheWarning, cache_root
from ._datasets import ImageSet, data_root, load_dataset
from ._extract import (
    DTYPES,
    EXTRACTOR_VERSION,
    SHARD_ROWS,
    Features,
    Handle,
    Job,
    extract,
    extract_shard,
    extraction_count,
    finish,
    open_features,
    plan,
)
from ._synthetic import dataset_name as synthetic_dataset
from ._models import Backbone, is_prepared, load, load_classifier, weights_id
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
from ._train import CheckpointError, load_checkpoint, save_checkpoint, train, train_digest
from ._weights import WeightMappingError, map_state_dict, state_dict_digest

__all__ = [
    "DTYPES",
    "EXTRACTOR_VERSION",
    "SHARD_ROWS",
    "Handle",
    "Job",
    "extract_shard",
    "finish",
    "open_features",
    "plan",
    "synthetic_dataset",
    "Backbone",
    "BackboneCfg",
    "CacheWarning",
    "CheckpointError",
    "DatasetCfg",
    "Features",
    "ImageSet",
    "TrainCfg",
    "UnknownNameError",
    "WeightMappingError",
    "backbone_cfg",
    "cache_root",
    "data_root",
    "dataset_cfg",
    "extract",
    "extraction_count",
    "is_prepared",
    "list_backbones",
    "list_datasets",
    "load",
    "load_checkpoint",
    "load_classifier",
    "load_dataset",
    "map_state_dict",
    "register_backbone",
    "register_dataset",
    "save_checkpoint",
    "state_dict_digest",
    "train",
    "train_digest",
    "weights_id",
]
