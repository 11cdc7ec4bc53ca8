"""Data set registry and loaders: offline sets for real, folder layouts on fakes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import backbones
from backbones import _datasets

OFFLINE = backbones.list_datasets(offline=True)
ONLINE = {"cifar100", "flowers102", "places365", "cub200", "imagenet_val"}


def test_registry_has_offline_and_online_sets() -> None:
    assert set(OFFLINE) == {"mnist", "digits", "lfw_subset", "photos", "synthetic-c10-train4000-test1000"}
    assert set(backbones.list_datasets(offline=False)) == ONLINE
    assert backbones.dataset_cfg("mnist").resolution == 64
    assert backbones.dataset_cfg("places365").splits == ("train-standard", "val")
    assert backbones.dataset_cfg("flowers102").splits == ("train", "val", "test")


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_set_splits(name: str) -> None:
    cfg = backbones.dataset_cfg(name)
    sizes = {}
    for split in cfg.splits:
        ds = backbones.load_dataset(name, split)
        img = np.asarray(ds.images[0])
        assert img.dtype == np.uint8 and img.ndim in (2, 3)
        assert ds.labels.dtype == np.int64 and ds.labels.shape == (len(ds),)
        assert set(np.unique(ds.labels)) == set(range(cfg.num_classes))  # every class in every split
        sizes[split] = len(ds)
    if {"train", "test"} <= set(cfg.splits):
        train, test = backbones.load_dataset(name, "train"), backbones.load_dataset(name, "test")
        # stratified: each class keeps (about) the same share in both splits
        share = np.bincount(test.labels) / np.bincount(train.labels)
        assert share.max() - share.min() < 0.1


def test_split_is_fixed_stratified_and_disjoint() -> None:
    labels = np.repeat(np.arange(5), [10, 20, 30, 40, 50])
    a = _datasets.stratified_split(labels, 0.2, seed=0)
    b = _datasets.stratified_split(labels, 0.2, seed=0)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not set(a["train"]) & set(a["test"])
    assert sorted([*a["train"], *a["test"]]) == list(range(len(labels)))
    assert np.bincount(labels[a["test"]]).tolist() == [2, 4, 6, 8, 10]


def test_known_sizes() -> None:
    assert len(backbones.load_dataset("mnist", "train")) == 4000
    assert len(backbones.load_dataset("mnist", "test")) == 1000
    assert len(backbones.load_dataset("digits", "train")) + len(backbones.load_dataset("digits", "test")) == 1797
    assert len(backbones.load_dataset("lfw_subset", "test")) == 40


def test_photos_are_distinct_rgb_views() -> None:
    ds = backbones.load_dataset("photos", "all")
    cfg = backbones.dataset_cfg("photos")
    assert ds.classes is not None and len(ds.classes) == cfg.num_classes
    assert "chelsea" in ds.classes and "cat" not in ds.classes  # same photo, kept once
    assert np.bincount(ds.labels).tolist() == [_datasets.PHOTO_VIEWS] * cfg.num_classes
    assert ds.images.shape[1:] == (_datasets.PHOTO_SIZE, _datasets.PHOTO_SIZE, 3)
    regenerated = _datasets._photos.__wrapped__()
    assert np.array_equal(regenerated.images, ds.images)  # seeded
    first = ds.images[ds.labels == 0]
    assert not np.array_equal(first[0], first[1])  # views differ
    train, test = backbones.load_dataset("photos", "train"), backbones.load_dataset("photos", "test")
    assert len(train) == len(test) == len(ds) // 2


def test_unknown_data_set_and_split_list_valid_names() -> None:
    with pytest.raises(backbones.UnknownNameError) as info:
        backbones.load_dataset("mnsit", "test")
    assert "did you mean 'mnist'" in str(info.value)
    assert all(n in str(info.value) for n in backbones.list_datasets())
    with pytest.raises(backbones.UnknownNameError, match="Valid splits: all, test, train"):
        backbones.load_dataset("photos", "val")


def _jpeg(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 10, 3), value, np.uint8)).save(path)


def test_cub200_folder_layout(tmp_path: Path) -> None:
    d = tmp_path / "CUB_200_2011"
    files = ["001.Albatross/a.jpg", "001.Albatross/b.jpg", "002.Auklet/c.jpg", "002.Auklet/d.jpg"]
    for i, f in enumerate(files):
        _jpeg(d / "images" / f, 40 * i)
    (d / "images.txt").write_text("".join(f"{i + 1} {f}\n" for i, f in enumerate(files)))
    (d / "image_class_labels.txt").write_text("1 1\n2 1\n3 2\n4 2\n")
    (d / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n4 0\n")
    (d / "classes.txt").write_text("1 001.Albatross\n2 002.Auklet\n")
    train = backbones.load_dataset("cub200", "train", root=tmp_path)
    assert train.labels.tolist() == [0, 1] and train.classes == ("001.Albatross", "002.Auklet")
    assert train.images[1].mode == "RGB" and np.asarray(train.images[1])[0, 0, 0] == 80
    assert backbones.load_dataset("cub200", "test", root=tmp_path).labels.tolist() == [0, 1]


def test_imagenet_val_folder_and_missing_folders(tmp_path: Path) -> None:
    for wnid, v in (("n01440764", 10), ("n01443537", 20)):
        _jpeg(tmp_path / "imagenet" / "val" / wnid / "x.JPEG", v)
    ds = backbones.load_dataset("imagenet_val", "val", root=tmp_path)
    assert ds.labels.tolist() == [0, 1] and ds.classes == ("n01440764", "n01443537")
    empty = tmp_path / "empty"
    with pytest.raises(FileNotFoundError, match="CUB_200_2011"):
        backbones.load_dataset("cub200", "train", root=empty)
    with pytest.raises(FileNotFoundError, match="imagenet"):
        backbones.load_dataset("imagenet_val", "val", root=empty)


def test_data_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAMBDA_COMPAT_DATA", str(tmp_path / "env"))
    assert backbones.data_root() == tmp_path / "env"
    assert backbones.data_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("LAMBDA_COMPAT_DATA")
    assert backbones.data_root() == backbones.cache_root() / "data"
