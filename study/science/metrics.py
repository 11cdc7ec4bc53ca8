"""Retrieval metrics for compatibility studies, one facade over three modules: exact CMC top-k
and mAP (`retrieval`), partial backfilling curves (`backfill`), ECC and the compatibility
matrix with AC, AM (`criteria`).

NumPy (no Ray, no MLflow, no torch needed). ``device=...`` on :func:`retrieval`
and :func:`backfill_curves` runs the same computation with torch on that device
(``study.science._metrics_torch``, imported only then: a trial on CUDA does this). All
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
row's positives (see ``study.science._metrics_torch``), with the same tie rule, so both
paths give the same numbers on the same scores (exactly when the scores are exact,
e.g. small-integer features; otherwise up to the last-bit rounding of the two
matmuls).
"""
from __future__ import annotations

from study.science.backfill import BACKFILL_ORDERS, backfill_curve, backfill_curves, backfill_order, curve_area
from study.science.criteria import ac_am, compatibility_matrix, ecc, ecc_margin
from study.science.retrieval import DISTANCES, FAISS_TOP1_MIN_ROWS, retrieval

__all__ = [
    "DISTANCES",
    "FAISS_TOP1_MIN_ROWS",
    "BACKFILL_ORDERS",
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
