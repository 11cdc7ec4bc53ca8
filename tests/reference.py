"""Test references: slow, obviously correct versions of the library's fast paths.

Benchmarks import this module too (`benchmarks/bench_retrieval.py`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from study.science.retrieval import _score_blocks, _summarise, _validate  # the same scores and summary as the fast path


def retrieval_brute_force(query, gallery, query_labels, gallery_labels, *,
                          leave_one_out: bool, distance: str = "cosine",
                          topk: Sequence[int] = (1, 5),
                          chunk_size: int | None = None) -> dict[str, float]:
    """Reference implementation of `study.science.metrics.retrieval`, for tests and benchmarks.

    Per query: the score row (from the same blocks as the fast path), gallery
    item i dropped when leave-one-out, ``argsort(-scores, kind="stable")``,
    then CMC and AP read off the full ranking. Same conventions and output as
    `retrieval`; O(N log N) per query.
    """
    q, g, same, ql, gl, ks = _validate(query, gallery, query_labels, gallery_labels,
                                       leave_one_out, distance, topk)
    n = q.shape[0]
    first = np.zeros(n, dtype=np.int64)
    ap = np.zeros(n, dtype=np.float64)
    has_pos = np.zeros(n, dtype=bool)
    for q0, block in _score_blocks(q, g, same, distance, chunk_size):
        for r in range(block.shape[0]):
            i = q0 + r
            s = block[r]
            rel = gl == ql[i]
            if leave_one_out:
                s = np.delete(s, i)
                rel = np.delete(rel, i)
            order = np.argsort(-s, kind="stable")
            hits = np.flatnonzero(rel[order])
            if hits.size == 0:
                continue
            has_pos[i] = True
            first[i] = hits[0] + 1
            ap[i] = np.mean(np.arange(1, hits.size + 1) / (hits + 1.0))
    return _summarise(first, ap, has_pos, ks)
