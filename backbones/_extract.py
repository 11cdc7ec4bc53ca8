"""Feature extraction into the sharded, verified, process-safe cache (`_cache.py`).

    f = extract("tf_efficientnet_lite0", "mnist", "test")       # all in this process
    job = plan("tf_efficientnet_lite0", "places365", "train")   # or split the work:
    for shard in job.todo: extract_shard(job, shard)            #   any process, any order
    handle = finish(job); f = open_features(handle)             #   memory-mapped

`plan` returns a `Handle` (a few bytes: the entry's path and shape) when the key is
cached and verifies, else a `Job` listing the shards still to write. A Ray study runs
one task per shard; extraction memory is a few batches whatever the split size.
"""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from . import _synthetic
from ._cache import DTYPES, SHARD_ROWS, CacheEntry, CacheWarning, Corrupt, Features, Handle, Shard, cache_root, content_key, open_features
from ._datasets import load_dataset
from ._models import Backbone, PathLike, input_resolution, load, preprocess_for, weights_id
from ._registry import BackboneCfg, backbone_cfg, check_split
from ._transforms import Preprocess

EXTRACTOR_VERSION = 1  # bump when extraction changes the numbers it produces
CACHE_FORMAT = 2  # 2: sharded entries (x.npy / y.npy + shard records)
_EXTRACTIONS = 0


def extraction_count() -> int:
    """Real (non-cache) extractions run in this process so far (calls that embedded any shard)."""
    return _EXTRACTIONS


@dataclass(frozen=True)
class Job:
    """One key's extraction, as `plan` left it: picklable and small."""

    entry: CacheEntry
    backbone: str
    dataset: str
    split: str
    material: dict[str, Any]
    rows: int
    dim: int
    dtype: str
    n_shards: int
    todo: tuple[Shard, ...]
    size: int | None  # input side (None: synthetic, no images)
    weights_given: bool = False  # extract() got a Backbone object: shards need it passed in


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {DTYPES}, got {dtype!r}")
    return dtype


def plan(
    backbone_or_name: Backbone | str,
    dataset: str,
    split: str,
    *,
    cache_dir: PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: str = "float32",
    shard_rows: int = SHARD_ROWS,
) -> Handle | Job:
    """The cached entry of a key if it is complete and verifies, else the job that makes it.

    The cache key is the weights digest, architecture, data set (and its revision),
    split, preprocessing (the data set's resolution hint applied), compute precision,
    storage dtype, EXTRACTOR_VERSION and CACHE_FORMAT. A hit loads neither the data set
    nor (for offline and trained entries) the model. A damaged entry is reported
    (CacheWarning, one line) and only its bad shards are redone.
    """
    dcfg = check_split(dataset, split)
    _check_dtype(dtype)
    if isinstance(backbone_or_name, Backbone):
        bcfg, wid = backbone_or_name.cfg, backbone_or_name.weights_id
        dev = torch.device(device) if device is not None else next(backbone_or_name.model.parameters()).device
    else:
        bcfg = backbone_cfg(backbone_or_name)
        dev = torch.device(device) if device is not None else _default_device()
        wid = _synthetic_id(bcfg, dataset) if bcfg.source == "synthetic" else weights_id(bcfg.name, cache_dir=cache_dir, device=dev)
    prep = None if bcfg.source == "synthetic" else preprocess_for(bcfg, input_resolution(bcfg, dcfg))
    material = {
        "extractor_version": EXTRACTOR_VERSION,
        "cache_format": CACHE_FORMAT,
        "weights_id": wid,
        "arch": bcfg.arch,
        "dataset": dataset,
        "dataset_revision": dcfg.revision,
        "split": split,
        "preprocess": prep.describe() if prep is not None else None,
        "precision": "bf16" if dev.type == "cuda" and prep is not None else "fp32",
        "dtype": dtype,
    }
    entry = CacheEntry.for_key(cache_root(cache_dir), bcfg.name, dataset, split, content_key(material))
    handle = _served(entry)
    if handle is not None:
        return handle
    rows = len(load_dataset(dataset, split).labels) if prep is not None else _synthetic.params(dataset)[split]
    todo = entry.prepare(rows, bcfg.dim, dtype, shard_rows)
    n_shards = -(-rows // shard_rows)
    return Job(entry, bcfg.name, dataset, split, material, rows, bcfg.dim, dtype, n_shards, tuple(todo),
               prep.size if prep is not None else None, weights_given=isinstance(backbone_or_name, Backbone))


def _synthetic_id(cfg: BackboneCfg, dataset: str) -> str:
    _synthetic.params(dataset)  # ValueError: a synthetic backbone embeds only synthetic data sets
    return f"synthetic-v1-{cfg.dim}"


def _served(entry: CacheEntry) -> Handle | None:
    """A Handle if the entry opens and verifies; None (after reporting and discarding what failed) otherwise."""
    try:
        got = entry.open()
    except Corrupt as bad:
        then = "re-extracting" if bad.whole or bad.bad else "resuming from its verified shards"
        warnings.warn(f"feature cache: {bad}; {then}", CacheWarning, stacklevel=4)
        entry.discard(bad)
        return None
    if got is None:
        return None
    x, _, _ = got
    return Handle(str(entry.path), int(x.shape[0]), int(x.shape[1]), str(x.dtype), from_cache=True)


def extract_shard(job: Job, shard: Shard, *, backbone: Backbone | None = None, device: str | torch.device | None = None,
                  batch_size: int = 64, progress: bool = False, data: Any = None) -> bool:
    """Fill one shard of `job` (under its lock); False if another process had done it already.

    `backbone` and `data` (the split's ImageSet) may be passed to reuse them across shards."""
    global _EXTRACTIONS
    with job.entry.shard_lock(shard.index):
        rec = job.entry.record(shard.index)
        if rec is not None and rec["rows"] == [shard.start, shard.stop]:
            return False
        if job.size is None:
            batches: Iterator[tuple[np.ndarray, np.ndarray]] = _synthetic_batches(job, shard, max(batch_size, 1024))
        else:
            dev = torch.device(device) if device is not None else _default_device()
            if backbone is None:
                if job.weights_given:
                    raise ValueError("this job was planned with a Backbone object: pass it as `backbone`")
                backbone = load(job.backbone, dev)
            if data is None:
                data = load_dataset(job.dataset, job.split)
            prep = preprocess_for(backbone.cfg, job.size)
            batches = _embed(backbone, data, shard, prep, dev, batch_size,
                             f"extract {job.backbone} {job.dataset}/{job.split}@{prep.size} shard {shard.index}", progress)
        job.entry.write_shard(shard, batches)
        _EXTRACTIONS += 1
    return True


def finish(job: Job, info: dict[str, Any] | None = None) -> Handle:
    """Write the entry's meta.json once every shard is there; the complete entry's Handle."""
    meta = job.entry.finish({"backbone": job.backbone, **job.material, "n": job.rows, "dim": job.dim,
                             "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **(info or {})},
                            job.n_shards)
    if meta is None:
        missing = [k for k in range(job.n_shards) if job.entry.record(k) is None]
        raise RuntimeError(f"{job.entry.path}: shards {missing[:5]}{'...' if len(missing) > 5 else ''} not written yet")
    return Handle(str(job.entry.path), job.rows, job.dim, job.dtype, from_cache=not job.todo)


def extract(
    backbone_or_name: Backbone | str,
    dataset: str,
    split: str,
    *,
    cache_dir: PathLike | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
    dtype: str = "float32",
    shard_rows: int = SHARD_ROWS,
) -> Features:
    """Embed every image of `dataset`/`split` in this process, or serve it from the cache.

    See `plan` for the cache key. Concurrent callers of one key extract each shard once;
    a killed call resumes from its finished shards. On CUDA: bf16 autocast and channels_last.
    """
    job = plan(backbone_or_name, dataset, split, cache_dir=cache_dir, device=device, dtype=dtype, shard_rows=shard_rows)
    if isinstance(job, Handle):
        return open_features(job)
    bb = backbone_or_name if isinstance(backbone_or_name, Backbone) else None
    data = None
    t0, embedded = time.perf_counter(), 0
    for shard in job.todo:
        if job.size is not None and bb is None:
            dev = torch.device(device) if device is not None else _default_device()
            bb = load(job.backbone, dev, cache_dir=cache_dir)
        if job.size is not None and data is None:
            data = load_dataset(dataset, split)
        if extract_shard(job, shard, backbone=bb, device=device, batch_size=batch_size, progress=progress, data=data):
            embedded += shard.stop - shard.start
    seconds = time.perf_counter() - t0
    info = {"seconds": round(seconds, 3), "images_per_s": round(embedded / seconds, 2) if seconds > 0 and embedded else None}
    if bb is not None:
        info["device"] = str(next(bb.model.parameters()).device)
    if job.size is not None:
        info["resolution"] = job.size
    handle = finish(job, info)
    feats = open_features(handle)
    return Features(feats.x, feats.y, {**feats.meta, "from_cache": embedded == 0})


def _synthetic_batches(job: Job, shard: Shard, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for s in range(shard.start, shard.stop, batch_size):
        yield _synthetic.features(job.dataset, job.split, job.dim, s, min(shard.stop, s + batch_size))


def _batches(images: Any, prep_batch: Callable[[list[Any]], torch.Tensor], start: int, stop: int, batch_size: int, *,
             prefetch: bool) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, preprocessed batch) in order, over images[start:stop].

    With `prefetch` (a CUDA model), batch k + 1 is prepared in a thread while the GPU runs
    batch k (PIL and torch's resize release the GIL), so the CPU preprocessing overlaps
    the forward instead of adding to it. On the CPU the forward already uses every core:
    a preprocessing thread beside it measured slower (0.83x against 0.90x of a bare
    forward, benchmarks/bench_extraction.py), so batches are prepared inline there.
    """
    starts = list(range(start, stop, batch_size))

    def make(s: int) -> torch.Tensor:
        return prep_batch([images[i] for i in range(s, min(stop, s + batch_size))])

    if not prefetch:
        for s in starts:
            yield s, make(s)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(make, starts[0]) if starts else None
        for k, s in enumerate(starts):
            batch = pending.result()
            pending = pool.submit(make, starts[k + 1]) if k + 1 < len(starts) else None
            yield s, batch


def _embed(bb: Backbone, data: Any, shard: Shard, prep: Preprocess, dev: torch.device, batch_size: int,
           desc: str, progress: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(embeddings float32, labels) batch by batch over the shard's rows."""
    cuda = dev.type == "cuda"
    model = bb.model.to(dev)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    labels = np.asarray(data.labels, dtype=np.int64)
    with torch.inference_mode(), amp, tqdm(total=shard.stop - shard.start, desc=desc, unit="img", file=sys.stderr,
                                           disable=not progress) as bar:
        for s, batch in _batches(data.images, prep.batch, shard.start, shard.stop, batch_size, prefetch=cuda):
            if cuda:
                batch = batch.pin_memory().to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
            out = model(batch)
            if out.shape != (len(batch), bb.dim):
                raise RuntimeError(f"{bb.name} returned {tuple(out.shape)}, expected (*, {bb.dim})")
            yield out.float().cpu().numpy(), labels[s:s + len(batch)]
            bar.update(len(batch))
