"""Feature cache: miss then hit, one extraction across processes, corruption detected."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import backbones
from backbones import _extract as extract_module


pytestmark = pytest.mark.usefixtures("one_torch_thread")


BACKBONE, DATASET, SPLIT = "tf_efficientnet_lite0", "digits", "test"  # 359 images at 32 px


def _extract(cache: Path, **kw: Any) -> backbones.Features:
    return backbones.extract(BACKBONE, DATASET, SPLIT, cache_dir=cache, progress=False, **kw)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, backbones.Features]:
    """One real extraction; tests copy its cache instead of extracting again."""
    cache = tmp_path_factory.mktemp("pristine-cache")
    return cache, _extract(cache)


def test_miss_then_hit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = backbones.extraction_count()
    first = _extract(tmp_path)
    assert backbones.extraction_count() == before + 1 and first.meta["from_cache"] is False
    assert first.x.dtype == np.float32 and first.x.shape == (359, 1280)
    assert first.y.dtype == np.int64 and first.y.shape == (359,)
    assert first.meta["resolution"] == backbones.dataset_cfg(DATASET).resolution

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cache hit must not load the data set or build the model")

    monkeypatch.setattr(extract_module, "load_dataset", forbidden)
    monkeypatch.setattr(extract_module, "load", forbidden)
    second = _extract(tmp_path)
    assert backbones.extraction_count() == before + 1 and second.meta["from_cache"] is True
    assert np.array_equal(first.x, second.x) and np.array_equal(first.y, second.y)
    assert "from_cache" not in json.loads((Path(second.meta["path"]) / "meta.json").read_text())


def test_key_depends_on_weights(pristine: tuple[Path, backbones.Features], tmp_path: Path) -> None:
    cache, feats = pristine
    shutil.copytree(cache, tmp_path, dirs_exist_ok=True)
    bb = backbones.load(BACKBONE)
    hit = backbones.extract(bb, DATASET, SPLIT, cache_dir=tmp_path, progress=False)
    assert hit.meta["from_cache"] is True and hit.meta["weights_id"] == bb.weights_id
    other = replace(bb, weights_id="0" * 16)  # stands in for different weights
    miss = backbones.extract(other, DATASET, SPLIT, cache_dir=tmp_path, progress=False)
    assert miss.meta["from_cache"] is False and miss.meta["path"] != hit.meta["path"]


def _worker(cache: str, barrier: Any, results: Any) -> None:
    torch.set_num_threads(1)
    barrier.wait()
    f = backbones.extract(BACKBONE, DATASET, SPLIT, cache_dir=cache, progress=False)
    results.put((backbones.extraction_count(), f.meta["from_cache"], float(f.x.sum())))


def test_two_processes_extract_once(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(count for count, _, _ in got) == [0, 1]
    assert sorted(hit for _, hit, _ in got) == [False, True]
    assert got[0][2] == got[1][2]


def _truncate(entry: Path) -> str:
    f = entry / "x.npy"
    f.write_bytes(f.read_bytes()[:-1000])
    return "x.npy"


def _flip_byte(entry: Path) -> str:
    f = entry / "y.npy"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01
    f.write_bytes(bytes(data))
    return "y.npy"


def _drop_meta(entry: Path) -> str:
    (entry / "meta.json").unlink()
    return "meta.json is missing"


def _drop_meta_and_shard_records(entry: Path) -> str:
    (entry / "meta.json").unlink()
    shutil.rmtree(entry / "shards")
    return "meta.json is missing"


@pytest.mark.parametrize("corrupt", [_truncate, _flip_byte, _drop_meta_and_shard_records],
                         ids=["truncated", "flipped", "no-meta-no-records"])
def test_corruption_is_detected_and_reextracted(
    corrupt: Any, pristine: tuple[Path, backbones.Features], tmp_path: Path
) -> None:
    cache, good = pristine
    shutil.copytree(cache, tmp_path, dirs_exist_ok=True)
    entry = Path(good.meta["path"].replace(str(cache), str(tmp_path)))
    what = corrupt(entry)
    before = backbones.extraction_count()
    with pytest.warns(backbones.CacheWarning, match=what) as record:
        again = _extract(tmp_path)
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert backbones.extraction_count() == before + 1 and again.meta["from_cache"] is False
    assert np.array_equal(again.x, good.x) and np.array_equal(again.y, good.y)
    assert _extract(tmp_path).meta["from_cache"] is True  # repaired


def test_missing_meta_resumes_from_the_verified_shards(pristine: tuple[Path, backbones.Features], tmp_path: Path) -> None:
    """meta.json is written last: without it the entry is an unfinished extraction. Its shards are
    verified against their records and kept; nothing is embedded again, nothing corrupt is served."""
    cache, good = pristine
    shutil.copytree(cache, tmp_path, dirs_exist_ok=True)
    entry = Path(good.meta["path"].replace(str(cache), str(tmp_path)))
    _drop_meta(entry)
    before = backbones.extraction_count()
    with pytest.warns(backbones.CacheWarning, match="meta.json is missing"):
        again = _extract(tmp_path)
    assert backbones.extraction_count() == before and again.meta["from_cache"] is True
    assert np.array_equal(again.x, good.x) and (entry / "meta.json").is_file()


SHARDED = dict(shard_rows=32)  # digits/test: 359 rows -> 12 shards


def _sharded_worker(cache: str) -> None:
    torch.set_num_threads(1)
    backbones.extract(BACKBONE, DATASET, SPLIT, cache_dir=cache, progress=False, **SHARDED)


def _records(cache: Path) -> list[Path]:
    return sorted(cache.glob("features/*/*/*/shards/*.json"))


def test_killed_sharded_extraction_resumes_with_the_same_bytes(tmp_path: Path) -> None:
    import signal
    import time

    good = _extract(tmp_path / "uninterrupted", **SHARDED)  # same shards, so the same batches
    tmp_path = tmp_path / "killed"
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_sharded_worker, args=(str(tmp_path),))
    proc.start()
    deadline = time.monotonic() + 240
    while len(_records(tmp_path)) < 3 and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    done = len(_records(tmp_path))
    assert 3 <= done < 12, f"the kill came too late: {done} of 12 shards were finished"
    assert not list(tmp_path.glob("features/*/*/*/meta.json"))  # never served half-done
    before = backbones.extraction_count()
    resumed = _extract(tmp_path, **SHARDED)
    assert backbones.extraction_count() - before == 12 - done  # only the missing shards
    assert resumed.meta["from_cache"] is False and len(resumed.meta["shards"]) == 12
    assert np.array_equal(resumed.x, good.x) and np.array_equal(resumed.y, good.y)


def test_a_corrupt_shard_is_found_and_only_it_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from backbones import _cache

    first = _extract(tmp_path, **SHARDED)
    good = np.array(first.x)
    entry = Path(first.meta["path"])
    x = entry / "x.npy"
    offset = _cache._npy_offset(x)[0]
    data = bytearray(x.read_bytes())
    data[offset + 200 * 1280 * 4 + 7] ^= 0x10  # a byte of row 200: shard 6 (rows 192-224)
    x.write_bytes(bytes(data))
    before = backbones.extraction_count()
    with pytest.warns(backbones.CacheWarning, match=r"x.npy: shard 6 \(rows 192-224\)"):
        again = _extract(tmp_path, **SHARDED)
    assert backbones.extraction_count() - before == 1
    assert np.array_equal(again.x, good)

    hashed: list[int] = []
    real = _cache._hash_range
    monkeypatch.setattr(_cache, "_hash_range", lambda *a: hashed.append(a[2]) or real(*a))
    assert _extract(tmp_path, **SHARDED).meta["from_cache"] is True
    assert hashed == []  # later opens on this node: stat + headers only, no data read
    _cache.CacheEntry(entry)._stamp_file().unlink()  # as on another node's first use
    assert _extract(tmp_path, **SHARDED).meta["from_cache"] is True
    assert sum(hashed) == x.stat().st_size - offset + (entry / "y.npy").stat().st_size - _cache._npy_offset(entry / "y.npy")[0]


def test_float16_storage_is_its_own_entry(pristine: tuple[Path, backbones.Features], tmp_path: Path) -> None:
    _, good = pristine
    half = _extract(tmp_path, dtype="float16")
    assert half.x.dtype == np.float16 and half.meta["path"] != good.meta["path"]
    np.testing.assert_array_equal(half.x, good.x.astype(np.float16))


def test_synthetic_features_are_deterministic_per_row_range(tmp_path: Path) -> None:
    from backbones import _synthetic

    name = backbones.synthetic_dataset(classes=5, train=9000, test=100, seed=2)
    whole = backbones.extract("synthetic_64", name, "train", cache_dir=tmp_path, shard_rows=4000, progress=False)
    x, y = _synthetic.features(name, "train", 64, 4090, 8200)  # across blocks and shards
    assert np.array_equal(x, whole.x[4090:8200]) and np.array_equal(y, whole.y[4090:8200])
    assert np.bincount(whole.y).tolist() == [1800] * 5
    other = _synthetic.features(name, "train", 128, 0, 10)[1]
    assert np.array_equal(other, whole.y[:10])  # every synthetic backbone sees the same images
    with pytest.raises(ValueError, match="only synthetic data sets|not a synthetic data set"):
        backbones.extract("synthetic_64", "digits", "test", cache_dir=tmp_path)


def test_cache_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAMBDA_COMPAT_CACHE", str(tmp_path / "env"))
    assert backbones.cache_root() == tmp_path / "env"
    assert backbones.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("LAMBDA_COMPAT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert backbones.cache_root() == tmp_path / "xdg" / "lambda-compat"


def test_unknown_split_fails_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(backbones.UnknownNameError, match="Valid splits: test, train"):
        backbones.extract(BACKBONE, DATASET, "validation", cache_dir=tmp_path)
    assert not (tmp_path / "features").exists()


def test_cli_extract_prints_the_cache_path(
    pristine: tuple[Path, backbones.Features], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from backbones._cli import main

    cache, good = pristine
    shutil.copytree(cache, tmp_path, dirs_exist_ok=True)
    assert main(["extract", "--backbone", BACKBONE, "--dataset", DATASET, "--split", SPLIT,
                 "--cache-dir", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr()
    path = Path(out.out.strip())
    assert path == Path(good.meta["path"].replace(str(cache), str(tmp_path)))
    assert (path / "meta.json").is_file() and "cached" in out.err


@pytest.mark.parametrize("prefetch", [False, True])
def test_extraction_batches_in_order_with_and_without_prefetch(prefetch: bool) -> None:
    """The CUDA path prepares batch k + 1 in a thread: same batches, same order, errors still raised."""
    images = [np.full((2, 2), i, np.float32) for i in range(10)]
    prep = lambda ims: torch.stack([torch.as_tensor(im) for im in ims]) * 2  # noqa: E731
    got = list(extract_module._batches(images, prep, 0, 10, 4, prefetch=prefetch))
    assert [s for s, _ in got] == [0, 4, 8]
    assert torch.equal(torch.cat([b for _, b in got]), torch.as_tensor(np.stack(images)) * 2)
    assert [s for s, _ in extract_module._batches(images, prep, 3, 10, 4, prefetch=prefetch)] == [3, 7]  # a shard

    def bad(ims):
        if any(float(im[0, 0]) == 6 for im in ims):
            raise ValueError("unreadable image 6")
        return torch.stack([torch.as_tensor(im) for im in ims])

    with pytest.raises(ValueError, match="unreadable image 6"):
        list(extract_module._batches(images, bad, 0, 10, 4, prefetch=prefetch))


def test_node_copy_is_made_once_verified_and_refreshed(pristine: tuple[Path, backbones.Features], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """LAMBDA_COMPAT_NODE_CACHE: readers map a verified node-local copy; a changed source is copied again,
    and a corrupt source is never served through its copy."""
    cache, good = pristine
    shutil.copytree(cache, tmp_path / "shared", dirs_exist_ok=True)
    entry = Path(good.meta["path"].replace(str(cache), str(tmp_path / "shared")))
    monkeypatch.setenv("LAMBDA_COMPAT_NODE_CACHE", str(tmp_path / "node"))
    first = backbones.open_features(entry)
    local = Path(first.meta["opened"])
    assert local.parent == tmp_path / "node" and np.array_equal(first.x, good.x)
    mtime = (local / "x.npy").stat().st_mtime_ns
    assert Path(backbones.open_features(entry).meta["opened"]) == local
    assert (local / "x.npy").stat().st_mtime_ns == mtime  # not copied again
    _flip_byte(entry)  # the shared source changes (and is corrupt now)
    with pytest.raises(backbones._cache.Corrupt, match="node-local copy failed verification.*y.npy"):
        backbones.open_features(entry)
    assert not local.exists()
