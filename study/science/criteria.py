"""Compatibility criteria: ECC (strict >), its margin, the compatibility matrix and AC / AM."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from study.science.retrieval import _check_metric, retrieval

__all__ = ["ecc", "ecc_margin", "ac_am", "compatibility_matrix"]

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
