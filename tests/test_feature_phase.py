"""The feature phase at scale: the driver holds handles, never arrays; a trial opens only its own keys."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray

import backbones
from study import tune as st
from study.space import load_space

SPACE = """
name: scale-small
pairs:
  - {old: synthetic_64, new: synthetic_128}
  - {old: synthetic_128, new: synthetic_256}
datasets:
  - {name: synthetic-c5-train3000-test200}
  - {name: synthetic-c3-train500-test90}
zero_shot: [synthetic-c4-train10-test120]
methods: [affine]
seeds: [0]
features: {dtype: float16}
"""


@pytest.fixture()
def spec(tmp_path: Path):
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    return load_space(path)


def test_driver_never_loads_a_feature_array_and_trials_open_only_their_keys(spec, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LAMBDA_COMPAT_CACHE", str(tmp_path / "cache"))  # forwarded to the workers

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the driver opened a feature array")

    keys = spec.feature_keys()
    st.init_ray(None, num_cpus=2)
    try:
        with monkeypatch.context() as spy:  # only the driver process is patched
            spy.setattr(np, "load", forbidden)
            spy.setattr(np, "memmap", forbidden)
            spy.setattr(backbones._cache.CacheEntry, "open", forbidden)
            logs: list[str] = []
            handles, counts = st.feature_phase(spec, log=logs.append)
            again, counts2 = st.feature_phase(spec, log=logs.append)
    finally:
        ray.shutdown()
    assert counts["extracted"] == len(keys) == 14 and counts["from_cache"] == 0  # 3 backbones x 4 splits + 2 zero-shot
    assert counts2 == {"keys": 14, "extracted": 0, "from_cache": 14, "shards_extracted": 0}
    assert all(isinstance(h, backbones.Handle) and h.dtype == "float16" for h in handles.values())
    assert {k: (h.rows, h.dim) for k, h in handles.items()} == {
        str(k): (backbones._synthetic.params(k.dataset)[k.split], backbones.backbone_cfg(k.backbone).dim) for k in keys}
    assert any("img/s" in line for line in logs)

    # One trial: the 4 keys of its pair and data set plus its zero-shot set, nothing else.
    opened: list[str] = []
    real = backbones.open_features
    monkeypatch.setattr(backbones, "open_features", lambda h: opened.append(h.path) or real(h))
    exp = st.experiments(spec)[0]
    cfg = next(c for c in exp.table.base.values() if c["old"] == "synthetic_128" and c["dataset"].startswith("synthetic-c3"))
    data = st.trial_data(cfg, handles)
    mine = [st.FeatureKey(b, cfg["dataset"], s) for b in ("synthetic_128", "synthetic_256") for s in ("train", "test")]
    mine.append(st.FeatureKey("synthetic_256", "synthetic-c4-train10-test120", "test"))
    assert sorted(opened) == sorted(handles[str(k)].path for k in mine)
    assert isinstance(data.old_train.x, np.memmap) and data.old_train.x.dtype == np.float16
    x, y = backbones._synthetic.features(cfg["dataset"], "train", 128, 0, 500)
    np.testing.assert_array_equal(data.old_train.x, x.astype(np.float16))
    np.testing.assert_array_equal(data.old_train.y, y)


SEQUENCE_SPACE = """
name: sequence-small
sequences:
  - models: [synthetic_64, synthetic_128, synthetic_256]
    zero_shot: [synthetic-c4-train10-test120]
datasets:
  - {name: synthetic-c3-train500-test90}
methods: [affine]
seeds: [0]
"""


def test_a_sequence_trial_opens_every_model_s_splits_and_the_mapped_models_zero_shot_sets(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LAMBDA_COMPAT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "space.yaml"
    path.write_text(SEQUENCE_SPACE)
    spec = load_space(path)
    st.init_ray(None, num_cpus=2)
    try:
        handles, _ = st.feature_phase(spec, log=lambda line: None)
    finally:
        ray.shutdown()
    opened: list[str] = []
    real = backbones.open_features
    monkeypatch.setattr(backbones, "open_features", lambda h: opened.append(h.path) or real(h))
    cfg = next(iter(st.experiments(spec)[0].table.base.values()))
    data = st.sequence_data(cfg, handles)
    dims = (64, 128, 256)
    models, ds, zs = [f"synthetic_{d}" for d in dims], cfg["dataset"], "synthetic-c4-train10-test120"
    mine = [st.FeatureKey(m, ds, s) for m in models for s in ("train", "test")]
    mine += [st.FeatureKey(m, zs, "test") for m in models[1:]]  # model 0 is never mapped
    assert sorted(opened) == sorted(handles[str(k)].path for k in mine)
    assert data.t == 3 and list(data.zero_shot) == [zs]
    for t, dim in enumerate(dims):
        for split, got in (("train", data.train[t]), ("test", data.eval[t])):
            x, y = backbones._synthetic.features(ds, split, dim, 0, backbones._synthetic.params(ds)[split])
            np.testing.assert_array_equal(got.x, x)
            np.testing.assert_array_equal(got.y, y)
    for t, got in enumerate(data.zero_shot[zs], start=1):
        x, _ = backbones._synthetic.features(zs, "test", dims[t], 0, 120)
        np.testing.assert_array_equal(got.x, x)
