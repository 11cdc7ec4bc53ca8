"""Retrieval metrics for compatibility studies: exact CMC top-k and mAP, partial
backfilling curves, ECC and the compatibility matrix (AC, AM).

NumPy (no Ray, no MLflow, no torch needed). ``device=...`` on :func:`retrieval`
and :func:`backfill_curves` runs the same computation with torch on that device
(``study._metrics_torch``, imported only then: a trial on CUDA does this). All
retrieval values are percentages in [0, 100].

Conventions (the contract of every function here)
-------------------------------------------------
Scores.
    ``distance="cosine"``: both sides are L2-normalised in float32,
    ``x / np.linalg.norm(x, axis=1, keepdims=True)`` (a zero vector stays zero,
    so it scores 0 against everything), and the score is the float32 dot
    product. ``distance="l2"``: the score is the negated squared
    Euclidean distance, ``-(||q||^2 - 2 q.g + ||g||^2)``, computed in float32
    as ``2 (q.g) - ||q||^2 - ||g||^2``. Higher score = closer. The similarity
    block for a chunk of queries is one float32 matmul (BLAS); the fast path
    (:func:`retrieval`) and the test reference (``tests/reference.py``) get
    their scores from the same helper, so two items that tie in one tie in the
    other and both rank exactly the same numbers. (A per-query matrix-vector
    product, as public code does it, or a block of another shape, can differ
    from our matrix-matrix product in the last bit; that can reorder
    near-ties, which is float noise of the similarity, not of the ranking.)

Ranking and ties.
    The ranking of query i is the gallery sorted by descending score, with
    equal scores ordered by gallery index (lower index first): a stable sort
    of ``-score``. Equivalently, the rank (1-based) of gallery item j is
    ``1 + #{k: s_k > s_j} + #{k < j: s_k == s_j}``. This is the only tie rule;
    it makes every metric a deterministic function of the inputs.

Leave-one-out.
    ``leave_one_out=True`` means query i and gallery item i are the same image
    (possibly embedded by different models, e.g. B(h_new) queries against an
    old gallery): the two sets must have the same length and the same labels,
    and gallery item i is removed from query i's ranking. Nothing else is
    removed (a duplicate of the query is still a hit).

Positives, CMC and AP.
    A gallery item is a positive of a query when their labels are equal. CMC
    top-k = share of queries whose first positive has rank <= k. AP over the
    full ranking = mean over the query's P positives of (k / rank of its k-th
    positive), the textbook definition. mAP = mean AP over queries.

Queries without a positive in the gallery (after leave-one-out) are skipped:
    they count in neither CMC nor mAP (the usual re-identification protocol;
    counting them as 0 would make the score depend on how many singleton
    classes a split happens to have). If no query has a positive,
    :func:`retrieval` raises ``ValueError``.

How the fast path stays exact without sorting indices
-----------------------------------------------------
For AP only the ranks of the positives matter. Per chunk of queries we compute
the score block (one matmul), gather the positives' scores, sort each row's
scores (values only: NumPy's SIMD sort, several times cheaper than an argsort;
items below the row's lowest positive are first clipped to one common value
just below it, which cannot change any positive's rank and makes the sort
cheaper) and read ``#{k: s_k > s_p}`` for every positive p with a binary search. A tie
(another item with exactly the positive's score) is detected from the sorted
row; only the rows that have one take an exact correction that counts the
equal-scoring items with a lower index. Row blocks are post-processed in
threads (NumPy's sort releases the GIL). Peak extra memory is about two score
blocks, ``2 * chunk_size * len(gallery) * 4`` bytes, plus the normalised
copies of the inputs.

The torch path shares everything here but the ranking of a block: the same
normalised inputs, the same blocks (the matmul runs on the device), the same
positive tables and AP bookkeeping; it counts ranks by binary searches into each
row's positives (see ``study._metrics_torch``), with the same tie rule, so both
paths give the same numbers on the same scores (exactly when the scores are exact,
e.g. small-integer features; otherwise up to the last-bit rounding of the two
matmuls).
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "DISTANCES",
    "retrieval",
    "backfill_order",
    "backfill_curve",
    "backfill_curves",
    "curve_area",
    "ecc",
    "ecc_margin",
    "ac_am",
    "compatibility_matrix",
]

DISTANCES = ("cosine", "l2")
BACKFILL_ORDERS = ("paper", "random")

# Default block budget: chunk_size * len(gallery) float32 scores per block
# (32 MiB). The fast path holds two blocks (scores + their sorted copy). At least
# _MIN_CHUNK query rows per block, so that the matmul stays compute-bound even
# for very large galleries (each block reads the whole gallery once).
_BLOCK_ELEMS = 1 << 23
_MIN_CHUNK = 64

FAISS_TOP1_MIN_ROWS = 10_000  # a CPU trial scores a top-1-only set (zero-shot retention, cosine) this large
#   or larger through faiss's IndexFlatIP (`study.index_eval.top1_leave_one_out`, same tie rule): 1.68x faster
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
            memory on CUDA (``study._metrics_torch``).

    Returns:
        ``{"top1": ..., "top5": ..., "mAP": ...}`` (one ``top{k}`` per k), floats
        in [0, 100]. Ties follow the module's rule (lower gallery index first);
        queries without a positive are skipped. Raises ``ValueError`` when no
        query has a positive.
    """
    q, g, same, ql, gl, ks = _validate(query, gallery, query_labels, gallery_labels,
                                       leave_one_out, distance, topk)
    if device is not None:
        from study._metrics_torch import retrieval_torch
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


# --------------------------------------------------------------------------
# Partial backfilling
# --------------------------------------------------------------------------

def backfill_order(gallery_forward, labels, *, kind: str = "paper", seed: int = 0) -> np.ndarray:
    """The order in which gallery items are backfilled (a permutation of 0..N-1).

    ``kind="paper"``: largest Euclidean distance of F(h_old) (``gallery_forward``)
    to its class mean (the mean of F(h_old) over the gallery items of that
    label) first; equal distances keep the lower index first.
    ``kind="random"``: ``np.random.default_rng(seed).permutation(N)`` (FCT's order).
    """
    x = _as_features(gallery_forward, "gallery_forward")
    y = _as_labels(labels, x.shape[0], "labels")
    if kind == "random":
        return np.random.default_rng(seed).permutation(x.shape[0])
    if kind != "paper":
        raise ValueError(f"`kind` must be one of {BACKFILL_ORDERS}, got {kind!r}")
    classes, inverse = np.unique(y, return_inverse=True)
    # float64, row blocks of the block budget (the same sums in the same order as all rows at once)
    step = _default_chunk(x.shape[0], 2 * x.shape[1])
    blocks = [slice(a, a + step) for a in range(0, x.shape[0], step)]
    sums = np.zeros((classes.size, x.shape[1]))
    for s in blocks:
        np.add.at(sums, inverse[s], x[s].astype(np.float64))
    means = sums / np.bincount(inverse, minlength=classes.size)[:, None]
    dist = np.concatenate([np.linalg.norm(x[s].astype(np.float64) - means[inverse[s]], axis=1) for s in blocks])
    return np.argsort(-dist, kind="stable")


def backfill_curve(query, gallery_old_side, gallery_new_side, labels, order, *,
                   points: int = 21, distance: str = "cosine", metric: str = "top1",
                   chunk_size: int | None = None,
                   device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Retrieval metric while the gallery is backfilled.

    For each beta in ``linspace(0, 1, points)``, the first ``floor(beta * N)``
    items of ``order`` take their new-side embedding (``gallery_new_side``), the
    rest keep the old side (``gallery_old_side``, e.g. F(h_old)); the query set
    (item i = gallery item i, e.g. B(h_new)) is scored leave-one-out against
    that gallery. ``floor`` is taken after rounding beta*N to 9 decimals, so
    that beta = 0.35 with N = 100 replaces 35 items, not 34.

    Returns ``(betas, values)``, values in percent for ``metric`` in
    ``"top1"``, ``"top<k>"``, ``"mAP"``. One curve of :func:`backfill_curves`
    (``device`` as there).
    """
    betas, values = backfill_curves(query, gallery_old_side, gallery_new_side, labels, {"order": order},
                                    points=points, distance=distance, metric=metric, chunk_size=chunk_size,
                                    device=device)
    return betas, values["order"]


class _Backfill:
    """Checked inputs of :func:`backfill_curves` and its distinct curve points (shared by both paths).

    A point is ``(order name, items replaced)``; the all-old and all-new galleries are
    one point shared by every order (name ""). ``masks[point]`` says which gallery items
    take the new side.
    """

    def __init__(self, query, gallery_old_side, gallery_new_side, labels, orders: Mapping[str, object],
                 points: int, distance: str, metric: str) -> None:
        self.q = _as_features(query, "query")
        self.old = _as_features(gallery_old_side, "gallery_old_side")
        # the queries are often the new side itself (B(h_new) both): then it is one array
        self.new = self.q if gallery_new_side is query else _as_features(gallery_new_side, "gallery_new_side")
        n = self.q.shape[0]
        if self.old.shape != (n, self.q.shape[1]) or self.new.shape != self.old.shape:
            raise ValueError("`query`, `gallery_old_side` and `gallery_new_side` must have the same "
                             f"shape, got {self.q.shape}, {self.old.shape}, {self.new.shape}")
        self.y = _as_labels(labels, n, "labels")
        position: dict[str, np.ndarray] = {}   # name -> where each item sits in that order
        for name, order in orders.items():
            order = np.asarray(order)
            if order.shape != (n,) or not np.array_equal(np.sort(order), np.arange(n)):
                raise ValueError(f"`order` must be a permutation of 0..{n - 1}")
            position[name] = np.empty(n, dtype=np.int64)
            position[name][order] = np.arange(n)
        if int(points) < 2:
            raise ValueError(f"`points` must be >= 2, got {points!r}")
        k = _check_metric(metric)
        self.metric, self.ks = metric, ((1,) if k is None else (k,))
        self.distance = _check_distance(distance)
        self.betas = np.linspace(0.0, 1.0, int(points))
        counts = np.floor(np.round(self.betas * n, 9)).astype(np.int64)
        self.curves = {name: [("", int(c)) if c in (0, n) else (name, int(c)) for c in counts]
                       for name in position}
        self.masks = {pt: position[pt[0]] < pt[1] if pt[0] else np.full(n, pt[1] == n)
                      for pts in self.curves.values() for pt in pts}

    def blocks(self, chunk_size: int, where: Callable, put: Callable[[np.ndarray], Any] | None = None) -> Iterator:
        """Yield ``(q0, point, scores)``: each block of query rows against each point's gallery.

        The rows are scored against the two sides once (two matmuls); a point's block
        takes each column from one of them (``where(mask, new, old)``)."""
        masks = self.masks if put is None else {pt: put(m) for pt, m in self.masks.items()}
        q = _placed(self.q, self.distance, put)   # each side normalised once
        old = _placed(self.old, self.distance, put)
        new = q if self.new is self.q else _placed(self.new, self.distance, put)
        for (q0, s_old), (_, s_new) in zip(_blocks(q, old, self.distance, chunk_size),
                                           _blocks(q, new, self.distance, chunk_size)):
            for pt, mask in masks.items():
                yield q0, pt, where(mask, s_new, s_old)

    def result(self, rankings: Mapping[tuple[str, int], "_Ranking"]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``(betas, {name: values})`` from each point's filled ranking."""
        value = {pt: r.summary(self.ks)[self.metric] for pt, r in rankings.items()}
        return self.betas, {name: np.array([value[pt] for pt in pts]) for name, pts in self.curves.items()}


def backfill_curves(query, gallery_old_side, gallery_new_side, labels, orders: Mapping[str, object], *,
                    points: int = 21, distance: str = "cosine", metric: str = "top1",
                    chunk_size: int | None = None, num_threads: int | None = None,
                    device: str | torch.device | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """:func:`backfill_curve` for several orders at once: ``(betas, {name: values})``.

    Every gallery of every curve is item-wise either the old or the new side, so
    each block of query rows is scored against the two sides once (two matmuls)
    and each curve point only selects its columns, instead of one matmul per
    point and order. The scores are those of :func:`retrieval` on the mixed
    gallery: the same float32 dot products of the same normalised rows.
    ``num_threads`` and ``device`` as in :func:`retrieval`.
    """
    bf = _Backfill(query, gallery_old_side, gallery_new_side, labels, orders, points, distance, metric)
    if device is not None:
        from study._metrics_torch import backfill_torch
        return backfill_torch(bf, chunk_size=chunk_size, device=device)
    n = bf.q.shape[0]
    rankings = {pt: _Ranking(bf.y, bf.y, True) for pt in bf.masks}
    if chunk_size is None:  # old-side, new-side and mixed scores held at once: a third of the budget each
        chunk_size = _default_chunk(n, n, blocks=3)
    threads = _default_threads() if num_threads is None else max(1, int(num_threads))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for q0, pt, block in bf.blocks(chunk_size, np.where):
            rankings[pt].add_block(pool, threads, q0, block)
    return bf.result(rankings)


def curve_area(betas, values) -> float:
    """Trapezoidal area under ``values(beta)``, divided by the beta span (so a curve
    over [0, 1] gets its plain area, in the values' unit: a mean level)."""
    b = np.asarray(betas, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if b.ndim != 1 or b.shape != v.shape or b.size < 2:
        raise ValueError("`betas` and `values` must be 1-D of the same length >= 2")
    span = b[-1] - b[0]
    if not span > 0:
        raise ValueError("`betas` must be increasing")
    return float(np.sum((v[1:] + v[:-1]) * np.diff(b)) / 2.0 / span)


# --------------------------------------------------------------------------
# Compatibility criteria
# --------------------------------------------------------------------------

def ecc(new_side_metric: float, old_old_metric: float) -> bool:
    """Empirical compatibility criterion (BCT): ``M(new-side, old) > M(old, old)``.

    Strict ``>``: equal values do NOT meet it (public repositories disagree on
    ``<`` vs ``<=``; a model that merely matches the old one has gained nothing).
    """
    return bool(new_side_metric > old_old_metric)


def ecc_margin(new_side_metric: float, old_old_metric: float) -> float:
    """``M(new-side, old) - M(old, old)``: positive exactly when :func:`ecc` holds."""
    return float(new_side_metric) - float(old_old_metric)


def ac_am(matrix) -> tuple[float, float]:
    """Average compatibility and average metric of a T x T compatibility matrix.

    ``matrix[i][j]`` is the metric of model i's queries against model j's gallery
    (model 0 oldest). Over the pairs i > j (a newer model querying an older
    gallery): AC = share of pairs with ``M[i][j] > M[j][j]`` (strict, as in
    :func:`ecc`), a fraction in [0, 1]; AM = mean of ``M[i][j]``, in the matrix's
    unit. Needs T >= 2.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 2:
        raise ValueError(f"`matrix` must be square with T >= 2, got shape {m.shape}")
    i, j = np.tril_indices(m.shape[0], k=-1)
    return float(np.mean(m[i, j] > m[j, j])), float(np.mean(m[i, j]))


def compatibility_matrix(query_sets, gallery_sets, labels, *, metric: str = "top1",
                         distance: str = "cosine", leave_one_out: bool = True,
                         topk: Sequence[int] = (1, 5),
                         chunk_size: int | None = None) -> np.ndarray:
    """T x T matrix with ``M[i][j] = retrieval(query_sets[i], gallery_sets[j])[metric]``.

    ``query_sets[i]`` / ``gallery_sets[i]`` are model i's query-side and
    gallery-side embeddings of the same evaluation images (for a plain model
    both are its features; with adapters, e.g. the query side is B(h_new)).
    ``labels`` are those images' labels, shared by all models. Feed the result
    to :func:`ac_am`.
    """
    t = len(query_sets)
    if t != len(gallery_sets):
        raise ValueError(f"`query_sets` and `gallery_sets` differ in length: {t} != "
                         f"{len(gallery_sets)}")
    k = _check_metric(metric)
    ks = tuple(topk) if k is None or k in tuple(topk) else tuple(topk) + (k,)
    m = np.empty((t, t))
    for i in range(t):
        for j in range(t):
            res = retrieval(query_sets[i], gallery_sets[j], labels, labels,
                            leave_one_out=leave_one_out, distance=distance, topk=ks,
                            chunk_size=chunk_size)
            m[i, j] = res[metric]
    return m
