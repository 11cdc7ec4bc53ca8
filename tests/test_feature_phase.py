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
