"""Class-extension backbones trained by the project, at test size."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import backbones
from backbones import _registry, _train


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Test size: the registry's recipes with 100 images per class and 2 epochs.
SMALL = {"max_per_class": 100, "epochs": 2}


def _small_entry(name: str) -> backbones.BackboneCfg:
    cfg = backbones.backbone_cfg(name)
    assert cfg.train is not None
    return replace(cfg, name=f"{name}_small", train=replace(cfg.train, **SMALL))


def loo_1nn(x: np.ndarray, y: np.ndarray) -> float:
    """Leave-one-out 1-NN accuracy with cosine similarity."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return float((y[sim.argmax(1)] == y).mean())


def test_small_pair_trains_fast_and_new_beats_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    feats = {}
    for name in ("mnist_old", "mnist_new"):
        cfg = _small_entry(name)
        monkeypatch.setitem(_registry._BACKBONES, cfg.name, cfg)
        t0 = time.perf_counter()
        bb = backbones.load(cfg.name, cache_dir=tmp_path)
        assert time.perf_counter() - t0 < 60, "test-size training must take well under a minute"
        assert bb.dim == cfg.dim and not bb.model.training
        feats[name] = backbones.extract(bb, "mnist", "test", cache_dir=tmp_path, progress=False)
    old, new = feats["mnist_old"], feats["mnist_new"]
    assert old.x.shape == (1000, 128) and new.x.shape == (1000, 256)  # d != n
    acc_old, acc_new = loo_1nn(old.x, old.y), loo_1nn(new.x, new.y)
    assert acc_new > acc_old + 0.03, (acc_old, acc_new)
    assert acc_new > 0.85


def test_checkpoint_is_cached_and_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = backbones.TrainCfg("resnet18", "mnist", (0, 1), seed=0, embed_dim=8, epochs=1, max_per_class=10)
    entry = backbones.BackboneCfg("tiny", "trained", "resnet18", 8, 32, offline=True, fixed_input_size=True,
                                  train=cfg)
    monkeypatch.setitem(_registry._BACKBONES, "tiny", entry)
    assert not backbones.is_prepared("tiny", cache_dir=tmp_path)
    assert backbones.is_prepared("tf_efficientnet_lite0", cache_dir=tmp_path)  # nothing to train
    first = backbones.load("tiny", cache_dir=tmp_path)
    assert backbones.is_prepared("tiny", cache_dir=tmp_path)
    path = _train.checkpoint_path(tmp_path, cfg)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["config"]["classes"] == [0, 1] and ckpt["digest"] == first.weights_id
    assert "head_state_dict" in ckpt and ckpt["train_digest"] == backbones.train_digest(cfg)

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached checkpoint should have been used")

    with monkeypatch.context() as m:
        m.setattr(_train, "train", no_training)
        assert backbones.load("tiny", cache_dir=tmp_path).weights_id == first.weights_id
        assert backbones.weights_id("tiny", cache_dir=tmp_path) == first.weights_id

    ckpt["state_dict"]["embed.bias"] += 1.0  # altered tensors no longer match the digest
    backbones.save_checkpoint(ckpt, path)
    with pytest.raises(backbones.CheckpointError, match="digest"):
        backbones.load_checkpoint(path)
    with pytest.warns(RuntimeWarning, match="retraining"):
        again = backbones.load("tiny", cache_dir=tmp_path)
    assert again.weights_id == first.weights_id  # retrained, and deterministic


def test_training_is_deterministic_in_and_across_processes(tmp_path: Path) -> None:
    cfg = backbones.TrainCfg("resnet18", "mnist", (0, 1, 2), seed=3, embed_dim=16, epochs=1, max_per_class=30)
    a = backbones.train(cfg, progress=False)
    torch.set_num_threads(2)  # the caller's thread count must not matter
    try:
        b = backbones.train(cfg, progress=False)
    finally:
        torch.set_num_threads(1)
    assert a["digest"] == b["digest"]
    assert torch.get_num_threads() == 1  # restored
    assert backbones.train(replace(cfg, seed=4), progress=False)["digest"] != a["digest"]

    out = tmp_path / "ckpt.pt"
    cmd = [sys.executable, "-m", "backbones", "train", "--arch", "resnet18", "--dataset", "mnist",
           "--classes", "0-2", "--seed", "3", "--embed-dim", "16", "--epochs", "1", "--max-per-class", "30",
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # another thread count than this process
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "epoch 1/1" in r.stderr  # progress output
    assert r.stdout.strip() == f"{out} digest {a['digest']}"
    assert backbones.load_checkpoint(out)["digest"] == a["digest"]
