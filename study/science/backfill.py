"""Partial backfilling: the backfill orders, the metric while the gallery turns old -> new, its area."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import numpy as np

from study.science.retrieval import (
    _as_features,
    _as_labels,
    _blocks,
    _check_distance,
    _check_metric,
    _default_chunk,
    _default_threads,
    _placed,
    _Ranking,
)

if TYPE_CHECKING:
    import torch

__all__ = ["BACKFILL_ORDERS", "backfill_order", "backfill_curve", "backfill_curves", "curve_area"]

# --------------------------------------------------------------------------
# Partial backfilling
# --------------------------------------------------------------------------

BACKFILL_ORDERS = ("paper", "random")


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
        from study.science._metrics_torch import backfill_torch
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
