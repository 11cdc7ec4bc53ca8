"""Feature extraction with a content-keyed, verified, process-safe cache."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ._cache import CacheEntry, cache_root, content_key
from ._datasets import load_dataset
from ._models import Backbone, PathLike, input_resolution, load, preprocess_for, weights_id
from ._registry import backbone_cfg, check_split
from ._transforms import Preprocess

EXTRACTOR_VERSION = 1  # bump when extraction changes the numbers it produces
_EXTRACTIONS = 0


def extraction_count() -> int:
    """Real (non-cache) extractions run in this process so far."""
    return _EXTRACTIONS


@dataclass(frozen=True)
class Features:
    """Embeddings of one data set split: x float32 [N, D], y int64 [N], and metadata.

    `meta["from_cache"]` says whether they were served from the cache (not stored);
    `meta["path"]` is the cache entry's directory.
    """

    x: np.ndarray
    y: np.ndarray
    meta: dict[str, Any]


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def extract(
    backbone_or_name: Backbone | str,
    dataset: str,
    split: str,
    *,
    cache_dir: PathLike | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Features:
    """Embed every image of `dataset`/`split`, or serve the result from the cache.

    The cache key is the weights digest, architecture, data set (and its
    revision), split, preprocessing (the data set's resolution hint applied),
    compute precision and EXTRACTOR_VERSION. A hit loads neither the data set
    nor (for offline and trained entries) the model. Concurrent callers of one
    key extract once; a corrupt entry is reported (CacheWarning) and rebuilt.
    On CUDA: bf16 autocast and channels_last.
    """
    dcfg = check_split(dataset, split)
    if isinstance(backbone_or_name, Backbone):
        bb: Backbone | None = backbone_or_name
        bcfg, wid = backbone_or_name.cfg, backbone_or_name.weights_id
        dev = torch.device(device) if device is not None else next(backbone_or_name.model.parameters()).device
    else:
        bb = None
        bcfg = backbone_cfg(backbone_or_name)
        dev = torch.device(device) if device is not None else _default_device()
        wid = weights_id(bcfg.name, cache_dir=cache_dir, device=dev)
    prep = preprocess_for(bcfg, input_resolution(bcfg, dcfg))
    material = {
        "extractor_version": EXTRACTOR_VERSION,
        "weights_id": wid,
        "arch": bcfg.arch,
        "dataset": dataset,
        "dataset_revision": dcfg.revision,
        "split": split,
        "preprocess": prep.describe(),
        "precision": "bf16" if dev.type == "cuda" else "fp32",
    }
    entry = CacheEntry.for_key(cache_root(cache_dir), bcfg.name, dataset, split, content_key(material))
    got = entry.read(warn=False)
    if got is None:
        with entry.lock():
            got = entry.read(warn=True)  # another process may have written it meanwhile
            if got is None:
                if bb is None:
                    bb = load(bcfg.name, dev, cache_dir=cache_dir)
                x, y, info = _embed(bb, dataset, split, prep, dev, batch_size, progress)
                meta = entry.write(x, y, {"backbone": bcfg.name, **material, **info})
                return Features(x, y, {**meta, "from_cache": False, "path": str(entry.path)})
    x, y, meta = got
    return Features(x, y, {**meta, "from_cache": True, "path": str(entry.path)})


def _batches(images: Any, prep_batch: Callable[[list[Any]], torch.Tensor], n: int, batch_size: int, *,
             prefetch: bool) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, preprocessed batch) in order.

    With `prefetch` (a CUDA model), batch k + 1 is prepared in a thread while the GPU runs
    batch k (PIL and torch's resize release the GIL), so the CPU preprocessing overlaps
    the forward instead of adding to it. On the CPU the forward already uses every core:
    a preprocessing thread beside it measured slower (0.83x against 0.90x of a bare
    forward, benchmarks/bench_extraction.py), so batches are prepared inline there.
    """
    starts = list(range(0, n, batch_size))

    def make(s: int) -> torch.Tensor:
        return prep_batch([images[i] for i in range(s, min(n, s + batch_size))])

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


def _embed(
    bb: Backbone, dataset: str, split: str, prep: Preprocess, dev: torch.device, batch_size: int, progress: bool
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Run the model over the split in batches; returns x, y and run facts for the meta."""
    global _EXTRACTIONS
    data = load_dataset(dataset, split)
    n = len(data)
    x = np.empty((n, bb.dim), np.float32)
    cuda = dev.type == "cuda"
    model = bb.model.to(dev)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    t0 = time.perf_counter()
    desc = f"extract {bb.name} {dataset}/{split}@{prep.size}"
    with torch.inference_mode(), amp, tqdm(total=n, desc=desc, unit="img", file=sys.stderr,
                                           disable=not progress) as bar:
        for s, batch in _batches(data.images, prep.batch, n, batch_size, prefetch=cuda):
            if cuda:
                batch = batch.pin_memory().to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
            out = model(batch)
            if out.shape != (len(batch), bb.dim):
                raise RuntimeError(f"{bb.name} returned {tuple(out.shape)}, expected (*, {bb.dim})")
            x[s:s + len(batch)] = out.float().cpu().numpy()
            bar.update(len(batch))
    seconds = time.perf_counter() - t0
    _EXTRACTIONS += 1
    info = {
        "n": n,
        "dim": bb.dim,
        "resolution": prep.size,
        "device": str(dev),
        "seconds": round(seconds, 3),
        "images_per_s": round(n / seconds, 2) if seconds > 0 else None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return x, np.ascontiguousarray(data.labels, dtype=np.int64), info
