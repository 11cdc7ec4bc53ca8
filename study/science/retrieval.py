"""Exact CMC top-k and mAP retrieval, NumPy with an optional torch path (`study.science._metrics_torch`).

The conventions every metric shares (scores, ties, leave-one-out, blocks) are in the docstring of
`study.science.metrics`, the facade that re-exports the public names.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["DISTANCES", "FAISS_TOP1_MIN_ROWS", "retrieval"]

DISTANCES = ("cosine", "l2")

# Default block budget: chunk_size * len(gallery) float32 scores per block
# (32 MiB). The fast path holds two blocks (scores + their sorted copy). At least
# _MIN_CHUNK query rows per block, so that the matmul stays compute-bound even
# for very large galleries (each block reads the whole gallery once).
_BLOCK_ELEMS = 1 << 23
_MIN_CHUNK = 64

FAISS_TOP1_MIN_ROWS = 10_000  # a CPU trial scores a top-1-only set (zero-shot retention, cosine) this large
#   or larger through faiss's IndexFlatIP (`study.science.index_eval.top1_leave_one_out`, same tie rule): 1.68x faster
#   than this module's full ranking at N = 10,000 and 3.9x at 100,000, D = 1280 (benchmarks/results/
#   retrieval_faiss_10k.json, retrieval_100k.json). Smaller sets stay here (faiss not measured faster there)


# --------------------------------------------------------------------------
# Input checks and the shared similarity computation
# --------------------------------------------------------------------------

def _check_distance(distance: str) -> str:
    if distance not in DISTANCES:
        raise ValueError(f"`distance` must be one of {DISTANCES}, got {distance!r}")
    return distance


def _as_features(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D array [N, D], got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise ValueError(f"`{name}` must be real-valued, got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"`{name}` contains NaN or infinite values")
    return a


def _as_labels(y, n: int, name: str) -> np.ndarray:
    a = np.asarray(y)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"`{name}` must be 1-D with {n} entries, got shape {a.shape}")
    return a


def _check_topk(topk) -> tuple[int, ...]:
    ks = tuple(int(k) for k in topk)
    if any(k < 1 for k in ks):
        raise ValueError(f"`topk` entries must be >= 1, got {tuple(topk)}")
    return ks


def _validate(query, gallery, query_labels, gallery_labels, leave_one_out, distance, topk):
    _check_distance(distance)
    same = query is gallery
    q = _as_features(query, "query")
    g = q if same else _as_features(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"`query` and `gallery` dimensions differ: {q.shape[1]} != {g.shape[1]}")
    if q.shape[0] == 0 or g.shape[0] == 0:
        raise ValueError(f"`query` and `gallery` need at least one item, got {q.shape[0]} "
                         f"and {g.shape[0]}")
    ql = _as_labels(query_labels, q.shape[0], "query_labels")
    gl = _as_labels(gallery_labels, g.shape[0], "gallery_labels")
    if leave_one_out:
        if q.shape[0] != g.shape[0]:
            raise ValueError(
                "`leave_one_out=True` needs query i and gallery i to be the same item: "
                f"got {q.shape[0]} queries and {g.shape[0]} gallery items")
        if not np.array_equal(ql, gl):
            raise ValueError("`leave_one_out=True` needs `query_labels` == `gallery_labels`")
    return q, g, same, ql, gl, _check_topk(topk)


def _prepare(x: np.ndarray, distance: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 features as scored: normalised rows (cosine) or rows + squared norms (l2)."""
    if distance == "cosine":
        # The common spelling, so that code normalising "the usual way" gets
        # bit-identical scores from the same matmul.
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.maximum(norms, np.finfo(np.float32).tiny), None
    return x, np.einsum("ij,ij->i", x, x)


def _default_chunk(n_query: int, n_gallery: int, blocks: int = 1) -> int:
    """Query rows per score block so that `blocks` blocks held at once fit the block budget."""
    return max(1, min(n_query, max(_MIN_CHUNK, _BLOCK_ELEMS // (blocks * max(1, n_gallery)))))


def _placed(x: np.ndarray, distance: str, put: Callable[[np.ndarray], Any] | None) -> tuple[Any, Any]:
    """:func:`_prepare`'s pair, moved by ``put`` to where the matmul runs (the torch path: tensors
    on its device); as it is (NumPy) without ``put``."""
    a, sq = _prepare(x, distance)
    if put is None:
        return a, sq
    return put(a), None if sq is None else put(sq)


def _blocks(query: tuple[Any, Any], gallery: tuple[Any, Any], distance: str, chunk_size: int | None) -> Iterator:
    """Yield ``(q0, scores)`` blocks [rows, len(gallery)] of two :func:`_placed` pairs.

    The block of rows q0:q0+b is one float32 matmul; for "l2" it becomes
    ``2 q.g - ||q||^2 - ||g||^2`` (higher is closer) in place.
    """
    (q, qsq), (g, gsq) = query, gallery
    n = q.shape[0]
    b = _default_chunk(n, g.shape[0]) if chunk_size is None else int(chunk_size)
    if b < 1:
        raise ValueError(f"`chunk_size` must be >= 1 or None, got {chunk_size!r}")
    gt = g.T
    for q0 in range(0, n, b):
        s = q[q0:q0 + b] @ gt
        if distance == "l2":
            s *= 2.0
            s -= qsq[q0:q0 + b, None]
            s -= gsq[None, :]
        yield q0, s


def _score_blocks(query: np.ndarray, gallery: np.ndarray, same: bool, distance: str,
                  chunk_size: int | None, put: Callable[[np.ndarray], Any] | None = None) -> Iterator:
    """Yield ``(q0, scores)`` float32 blocks [rows, len(gallery)], shared by every path (NumPy
    arrays, or tensors where ``put`` moves the inputs: see :func:`_placed`, :func:`_blocks`)."""
    q = _placed(query, distance, put)
    yield from _blocks(q, q if same else _placed(gallery, distance, put), distance, chunk_size)


def _check_metric(metric: str) -> int | None:
    """The k of a "top<k>" metric, None for "mAP"; anything else is an error."""
    if metric == "mAP":
        return None
    if metric.startswith("top") and metric[3:].isdigit() and int(metric[3:]) >= 1:
        return int(metric[3:])
    raise ValueError(f"`metric` must be 'top<k>' (k >= 1) or 'mAP', got {metric!r}")


def _summarise(first_rank: np.ndarray, ap: np.ndarray, has_pos: np.ndarray,
               ks: tuple[int, ...]) -> dict[str, float]:
    if not has_pos.any():
        raise ValueError("no query has a positive in the gallery (check the labels, and "
                         "that leave-one-out does not remove every match)")
    fr = first_rank[has_pos]
    out = {f"top{k}": float(100.0 * np.mean(fr <= k)) for k in ks}
    out["mAP"] = float(100.0 * np.mean(ap[has_pos]))
    return out


# --------------------------------------------------------------------------
# Fast exact path
# --------------------------------------------------------------------------

def _default_threads() -> int:
    """Usable CPUs, capped by ``OMP_NUM_THREADS`` when set (Ray sets it to a
    trial's CPU share) and by 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        n = min(n, int(omp))
    return max(1, min(8, n))


class _Positives:
    """Gallery indices of each label, as a padded table (one row per label)."""

    def __init__(self, gallery_labels: np.ndarray):
        order = np.argsort(gallery_labels, kind="stable")  # ascending index within a label
        self.labels, starts, counts = np.unique(gallery_labels[order], return_index=True,
                                                return_counts=True)
        self.width = int(counts.max()) if counts.size else 0
        width = max(self.width, 1)
        ar = np.arange(width)
        self.valid = ar[None, :] < counts[:, None]
        self.index = order[np.minimum(starts[:, None] + ar[None, :], max(order.size - 1, 0))]

    def for_queries(self, labels: np.ndarray):
        """(index [b, width], valid [b, width]) of the positives of each query label."""
        k = np.searchsorted(self.labels, labels)
        k = np.minimum(k, max(self.labels.size - 1, 0))
        known = (self.labels[k] == labels) if self.labels.size else np.zeros(labels.shape, bool)
        return self.index[k], self.valid[k] & known[:, None]


def _eq_before(s: np.ndarray, pidx: np.ndarray, pval: np.ndarray) -> np.ndarray:
    """For positives at gallery indices ``pidx`` with scores ``pval`` in row ``s``:
    how many items with a lower index have exactly the same score."""
    idx = np.flatnonzero(np.isin(s, np.unique(pval)))   # ascending gallery index
    vals = s[idx]
    order = np.argsort(vals, kind="stable")             # equal values keep index order
    inv = np.empty_like(order)
    inv[order] = np.arange(order.size)
    start = np.searchsorted(vals[order], pval, side="left")
    return inv[np.searchsorted(idx, pidx)] - start


_NO_RANK = np.iinfo(np.int64).max


def _positive_ranks(s: np.ndarray, pidx: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Ranks (1-based, tie rule of the module) of each row's positives, sorted ascending;
    padding entries are ``_NO_RANK``. ``s`` is a score block whose excluded items are
    already ``-inf``."""
    n = s.shape[1]
    pval = np.take_along_axis(s, pidx, axis=1)
    # Items scoring below a row's lowest positive never rank above a positive:
    # clip them to just below it (nextafter, so they cannot tie with it). The
    # counts below are unchanged, and the sort gets cheaper with every item
    # clipped (duplicates). The clip is also the copy we sort in place.
    low = np.min(np.where(valid, pval, np.inf), axis=1)
    low = np.nextafter(low.astype(np.float32), np.float32(-np.inf))
    srt = np.maximum(s, low[:, None])
    srt.sort(axis=1)
    # Ascending needles make each row's binary searches cheaper (NumPy reuses the
    # previous position as a lower bound).
    pval = np.where(valid, pval, np.float32(-np.inf))
    o = np.argsort(pval, axis=1)
    pval = np.take_along_axis(pval, o, axis=1)
    pidx = np.take_along_axis(pidx, o, axis=1)
    valid = np.take_along_axis(valid, o, axis=1)
    right = np.empty(pval.shape, dtype=np.int64)   # #{k: s_k <= s_p}
    for r in range(s.shape[0]):
        right[r] = np.searchsorted(srt[r], pval[r], side="right")
    ranks = n - right + 1                          # 1 + #{k: s_k > s_p}
    # The positive itself is at srt[r, right-1]; another equal score sits just before it.
    prev = np.take_along_axis(srt, np.maximum(right - 2, 0), axis=1)
    tied = valid & (right >= 2) & (prev == pval)
    for r in np.flatnonzero(tied.any(axis=1)):
        t = tied[r]
        ranks[r, t] += _eq_before(s[r], pidx[r, t], pval[r, t])
    ranks[~valid] = _NO_RANK
    ranks.sort(axis=1)
    return ranks


def retrieval(query, gallery, query_labels, gallery_labels, *, leave_one_out: bool,
              distance: str = "cosine", topk: Sequence[int] = (1, 5),
              chunk_size: int | None = None, num_threads: int | None = None,
              device: str | torch.device | None = None) -> dict[str, float]:
    """Exact CMC top-k and full-ranking mAP, in percent.

    Args:
        query, gallery: float arrays [Nq, D] and [Ng, D] (anything ``np.asarray``
            accepts; computed in float32). Pass the same object twice for a
            set against itself (it is then normalised once).
        query_labels, gallery_labels: 1-D label arrays (any comparable dtype).
        leave_one_out: query i and gallery item i are the same image; drop item
            i from query i's ranking (needs equal lengths and labels).
        distance: "cosine" or "l2" (see the module docstring for the scores).
        topk: the k of the CMC keys ``"top{k}"``.
        chunk_size: queries per similarity block; default keeps a block near
            32 MiB (at least 64 rows). Results are reproducible for a given
            chunk size; BLAS may round a score differently (last bit) for
            another block shape, which can reorder near-ties between
            chunkings. The test reference (``tests/reference.py``) with the same
            ``chunk_size`` sees bit-identical scores.
        num_threads: threads for the per-block ranking (default: usable CPUs,
            capped by ``OMP_NUM_THREADS`` when set, and by 8). Results do not
            depend on it. NumPy path only.
        device: None (default): NumPy on the host. A torch device ("cuda",
            "cuda:1", "cpu", a ``torch.device``): the torch path on it, with
            the same conventions; its default ``chunk_size`` fits the free
            memory on CUDA (``study.science._metrics_torch``).

    Returns:
        ``{"top1": ..., "top5": ..., "mAP": ...}`` (one ``top{k}`` per k), floats
        in [0, 100]. Ties follow the module's rule (lower gallery index first);
        queries without a positive are skipped. Raises ``ValueError`` when no
        query has a positive.
    """
    q, g, same, ql, gl, ks = _validate(query, gallery, query_labels, gallery_labels,
                                       leave_one_out, distance, topk)
    if device is not None:
        from study.science._metrics_torch import retrieval_torch
        return retrieval_torch(q, g, same, ql, gl, ks, leave_one_out=leave_one_out, distance=distance,
                               chunk_size=chunk_size, device=device)
    acc = _Ranking(ql, gl, leave_one_out)
    threads = _default_threads() if num_threads is None else max(1, int(num_threads))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for q0, block in _score_blocks(q, g, same, distance, chunk_size):
            acc.add_block(pool, threads, q0, block)
    return acc.summary(ks)


class _Ranking:
    """Per-query first-positive rank and AP, filled block by block (the fast path's core)."""

    def __init__(self, query_labels: np.ndarray, gallery_labels: np.ndarray, leave_one_out: bool) -> None:
        n = query_labels.shape[0]
        self.ql, self.leave_one_out = query_labels, leave_one_out
        self.pos = _Positives(gallery_labels)
        self.first = np.zeros(n, dtype=np.int64)
        self.ap = np.zeros(n, dtype=np.float64)
        self.npos = np.zeros(n, dtype=np.int64)

    def _positives(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(gallery index [b, width], valid [b, width]) of the positives of query rows `rows`."""
        pidx, valid = self.pos.for_queries(self.ql[rows])
        if self.leave_one_out:
            valid = valid & (pidx != rows[:, None])
        return pidx, valid

    def _record(self, rows: np.ndarray, ranks: np.ndarray, npos: np.ndarray) -> None:
        """Store first rank and AP of query rows `rows` from their positives' sorted ranks."""
        k = np.arange(1, ranks.shape[1] + 1, dtype=np.float64)
        prec = np.where(k[None, :] <= npos[:, None], k[None, :] / ranks, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.ap[rows] = prec.sum(axis=1) / npos
        self.first[rows] = ranks[:, 0]
        self.npos[rows] = npos

    def _rows(self, q0: int, block: np.ndarray, a: int, b: int) -> None:
        rows = np.arange(q0 + a, q0 + b)
        pidx, valid = self._positives(rows)
        self._record(rows, _positive_ranks(block[a:b], pidx, valid), valid.sum(axis=1))

    def add_block(self, pool: ThreadPoolExecutor, threads: int, q0: int, block: np.ndarray) -> None:
        """Rank the score rows q0:q0+len(block) (modifies `block`: leave-one-out items -> -inf)."""
        b = block.shape[0]
        if self.leave_one_out:
            r = np.arange(b)
            block[r, q0 + r] = -np.inf
        edges = np.linspace(0, b, min(threads, b) + 1).astype(int)
        futures = [pool.submit(self._rows, q0, block, int(lo), int(hi))
                   for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]
        for f in futures:
            f.result()

    def summary(self, ks: tuple[int, ...]) -> dict[str, float]:
        return _summarise(self.first, self.ap, self.npos > 0, ks)
