"""study.science.metrics against independent references: brute force, hand-computed
values and scikit-learn. Offline, a few seconds."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from study.science import metrics
from study.science import retrieval as R
from study.science.metrics import (ac_am, backfill_curve, backfill_order, compatibility_matrix,
                           curve_area, ecc, ecc_margin, retrieval)
from reference import retrieval_brute_force


def _tied_data(seed: int, n: int = 120, d: int = 3, classes: int = 9):
    """Small-integer features: many exactly equal scores (duplicates, equal
    distances), and a few singleton classes (queries with no positive)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, size=(n, d)).astype(np.float32)
    y = rng.integers(0, classes, size=n)
    y[:3] = [100, 101, 102]  # singletons: no positive under leave-one-out
    return x, y


def _assert_same(a: dict, b: dict, tol: float = 1e-9):
    assert a.keys() == b.keys()
    for k in a:
        assert abs(a[k] - b[k]) <= tol, (k, a, b)


# --------------------------------------------------------------------------
# fast path == brute force
# --------------------------------------------------------------------------

@pytest.mark.parametrize("distance", ["cosine", "l2"])
@pytest.mark.parametrize("chunk_size", [1, 4, 17, None])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_matches_brute_force_leave_one_out_with_ties(distance, chunk_size, seed):
    x, y = _tied_data(seed)
    kw = dict(leave_one_out=True, distance=distance, topk=(1, 2, 5), chunk_size=chunk_size)
    _assert_same(retrieval(x, x, y, y, **kw), retrieval_brute_force(x, x, y, y, **kw))


@pytest.mark.parametrize("distance", ["cosine", "l2"])
@pytest.mark.parametrize("chunk_size", [1, 5, None])
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_matches_brute_force_separate_gallery(distance, chunk_size, seed):
    rng = np.random.default_rng(seed + 10)
    q = rng.integers(-2, 3, size=(60, 4)).astype(np.float32)
    g = rng.integers(-2, 3, size=(150, 4)).astype(np.float32)
    g[10:20] = g[0]  # exact duplicates in the gallery
    ql = rng.integers(0, 8, size=60)
    ql[:4] = 99  # labels absent from the gallery: no positive
    gl = rng.integers(0, 7, size=150)
    kw = dict(leave_one_out=False, distance=distance, chunk_size=chunk_size)
    _assert_same(retrieval(q, g, ql, gl, **kw), retrieval_brute_force(q, g, ql, gl, **kw))


@pytest.mark.parametrize("distance", ["cosine", "l2"])
def test_test_data_really_has_ties(distance, monkeypatch):
    x, y = _tied_data(0)
    for _, s in R._score_blocks(x, x, True, distance, None):
        row = np.delete(s[0], 0)
        assert np.unique(row).size < row.size / 2
    calls = []
    real = R._eq_before
    monkeypatch.setattr(R, "_eq_before", lambda *a: calls.append(1) or real(*a))
    retrieval(x, x, y, y, leave_one_out=True, distance=distance)
    assert len(calls) > 10  # the fast path's tie correction really ran


@pytest.mark.parametrize("num_threads", [1, 2, 5])
def test_threads_do_not_change_results(num_threads):
    x, y = _tied_data(3, n=200)
    ref = retrieval_brute_force(x, x, y, y, leave_one_out=True, chunk_size=32)
    got = retrieval(x, x, y, y, leave_one_out=True, chunk_size=32, num_threads=num_threads)
    _assert_same(ref, got)


@pytest.mark.parametrize("distance", ["cosine", "l2"])
def test_chunk_size_does_not_change_results_when_scores_are_exact(distance):
    # Entries in {-1, 0, 1} with exactly four non-zeros: norm 2, so cosine
    # scores are exact in float32 and every chunking computes the same scores.
    rng = np.random.default_rng(4)
    x = np.zeros((90, 8), np.float32)
    for row in x:
        row[rng.choice(8, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    y = rng.integers(0, 6, size=90)
    results = [retrieval(x, x, y, y, leave_one_out=True, distance=distance, chunk_size=c)
               for c in (1, 2, 7, None)]
    for r in results[1:]:
        _assert_same(results[0], r, tol=0.0)


# --------------------------------------------------------------------------
# hand-computed values
# --------------------------------------------------------------------------

def test_hand_computed_ap():
    # 1-D, l2: gallery at distances 1..5 from the query; positives at ranks 1, 3, 5.
    q = np.array([[0.0]], np.float32)
    g = np.array([[1.0], [2.0], [3.0], [4.0], [5.0]], np.float32)
    gl = np.array([7, 0, 7, 0, 7])
    for fn in (retrieval, retrieval_brute_force):
        r = fn(q, g, [7], gl, leave_one_out=False, distance="l2", topk=(1, 2))
        assert r["mAP"] == pytest.approx(100 * (1 / 1 + 2 / 3 + 3 / 5) / 3)
        assert r["top1"] == 100.0 and r["top2"] == 100.0
    # The same with the first item a negative: positives at ranks 2, 3, 5.
    gl2 = np.array([0, 7, 7, 0, 7])
    r = retrieval(q, g, [7], gl2, leave_one_out=False, distance="l2", topk=(1, 2))
    assert r["mAP"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 3 / 5) / 3)
    assert r["top1"] == 0.0 and r["top2"] == 100.0


@pytest.mark.parametrize("fn", [retrieval, retrieval_brute_force])
def test_tie_rule_lower_gallery_index_first(fn):
    q = np.array([[0.0]], np.float32)
    g = np.array([[1.0], [-1.0]], np.float32)  # both at distance 1: a tie
    neg_first = fn(q, g, [1], [0, 1], leave_one_out=False, distance="l2", topk=(1,))
    pos_first = fn(q, g, [1], [1, 0], leave_one_out=False, distance="l2", topk=(1,))
    assert neg_first == {"top1": 0.0, "mAP": 50.0}
    assert pos_first == {"top1": 100.0, "mAP": 100.0}


def test_leave_one_out_by_hand():
    # Items on a line; the query itself (distance 0) must not count.
    x = np.array([[0.0], [1.0], [3.0], [4.0]], np.float32)
    y = np.array([0, 1, 0, 1])
    r = retrieval(x, x, y, y, leave_one_out=True, distance="l2", topk=(1,))
    # item 0: ranking 1(1), 2(0), 3(1) -> positive at rank 2: AP 1/2, miss
    # item 1: ranking 0(0) and 2(0) tie at distance 1 -> 0 first; then 3(1) -> AP 1/3, miss
    # item 2: 3(1) first, then 1(1), 0(0) -> positive at 3: AP 1/3, miss
    # item 3: 2(0) first, then 1(1) at 3 -> AP 1/2, miss
    assert r["top1"] == 0.0
    assert r["mAP"] == pytest.approx(100 * (1 / 2 + 1 / 3 + 1 / 3 + 1 / 2) / 4)


def test_queries_without_positive_are_skipped():
    rng = np.random.default_rng(5)
    g = rng.standard_normal((40, 6)).astype(np.float32)
    gl = rng.integers(0, 4, size=40)
    q = rng.standard_normal((10, 6)).astype(np.float32)
    ql = rng.integers(0, 4, size=10)
    base = retrieval(q, g, ql, gl, leave_one_out=False)
    q2 = np.vstack([q, rng.standard_normal((5, 6)).astype(np.float32)])
    ql2 = np.concatenate([ql, [9, 9, 9, 9, 9]])  # label 9 is not in the gallery
    _assert_same(base, retrieval(q2, g, ql2, gl, leave_one_out=False))
    _assert_same(base, retrieval_brute_force(q2, g, ql2, gl, leave_one_out=False))
    with pytest.raises(ValueError, match="no query has a positive"):
        retrieval(q, g, np.full(10, 9), gl, leave_one_out=False)


def test_singleton_classes_under_leave_one_out_are_skipped():
    x = np.array([[0.0], [1.0], [5.0]], np.float32)
    y = np.array([0, 0, 1])  # item 2 has no other item of its class
    r = retrieval(x, x, y, y, leave_one_out=True, distance="l2", topk=(1,))
    assert r == {"top1": 100.0, "mAP": 100.0}


# --------------------------------------------------------------------------
# scikit-learn, where there are no ties
# --------------------------------------------------------------------------

@pytest.mark.parametrize("leave_one_out", [True, False])
def test_agrees_with_sklearn_without_ties(leave_one_out):
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(6)
    centers = rng.standard_normal((6, 16))
    g_lab = rng.integers(0, 6, size=150)
    g = (centers[g_lab] + 1.5 * rng.standard_normal((150, 16))).astype(np.float32)
    if leave_one_out:
        q, q_lab = g, g_lab
    else:
        q_lab = rng.integers(0, 6, size=50)
        q = (centers[q_lab] + 1.5 * rng.standard_normal((50, 16))).astype(np.float32)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    aps, top1 = [], []
    for i in range(len(q)):
        s = gn @ qn[i]
        rel = g_lab == q_lab[i]
        if leave_one_out:
            s, rel = np.delete(s, i), np.delete(rel, i)
        assert np.unique(s).size == s.size  # no ties, so sklearn's AP is the textbook AP
        aps.append(average_precision_score(rel, s))
        top1.append(rel[np.argmax(s)])
    r = retrieval(q, g, q_lab, g_lab, leave_one_out=leave_one_out, topk=(1,))
    assert r["mAP"] == pytest.approx(100 * np.mean(aps), abs=1e-6)
    assert r["top1"] == pytest.approx(100 * np.mean(top1), abs=1e-6)


# --------------------------------------------------------------------------
# input errors
# --------------------------------------------------------------------------

def test_errors_name_the_argument():
    x = np.zeros((4, 2), np.float32)
    y = np.arange(4)
    with pytest.raises(ValueError, match="`distance`"):
        retrieval(x, x, y, y, leave_one_out=True, distance="dot")
    with pytest.raises(ValueError, match="`leave_one_out=True`"):
        retrieval(x, x[:3], y, y[:3], leave_one_out=True)
    with pytest.raises(ValueError, match="`query_labels`"):
        retrieval(x, x, y[:3], y, leave_one_out=False)
    with pytest.raises(ValueError, match="NaN"):
        retrieval(np.full((4, 2), np.nan), x, y, y, leave_one_out=False)


def test_metric_names_are_checked():
    old, new, y = _pair(n=20)
    with pytest.raises(ValueError, match="`metric`"):
        backfill_curve(new, old, new, y, np.arange(20), metric="map")
    with pytest.raises(ValueError, match="`metric`"):
        compatibility_matrix([old, new], [old, new], y, metric="top0")


# --------------------------------------------------------------------------
# backfilling
# --------------------------------------------------------------------------

def _pair(seed=7, n=80, d=8):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, size=n)
    centers = rng.standard_normal((5, d))
    old = (centers[y] + 1.0 * rng.standard_normal((n, d))).astype(np.float32)
    new = (centers[y] + 0.5 * rng.standard_normal((n, d))).astype(np.float32)
    return old, new, y


@pytest.mark.parametrize("kind", ["paper", "random"])
def test_backfill_curve_end_points(kind):
    old, new, y = _pair()
    order = backfill_order(old, y, kind=kind, seed=3)
    for metric in ("top1", "mAP"):
        betas, values = backfill_curve(new, old, new, y, order, points=6, metric=metric)
        assert betas.tolist() == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        r0 = retrieval(new, old, y, y, leave_one_out=True)[metric]
        r1 = retrieval(new, new, y, y, leave_one_out=True)[metric]
        assert values[0] == pytest.approx(r0, abs=1e-9)
        assert values[-1] == pytest.approx(r1, abs=1e-9)


def test_backfill_curve_replaces_the_first_items_of_the_order():
    old, new, y = _pair(n=20)
    order = np.arange(20)[::-1]
    _, values = backfill_curve(new, old, new, y, order, points=21, metric="mAP")
    # beta = 0.35 -> floor(7.0) = 7 items, the last seven indices.
    mixed = old.copy()
    mixed[13:] = new[13:]
    assert values[7] == pytest.approx(retrieval(new, mixed, y, y, leave_one_out=True)["mAP"])


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("chunk_size", [7, None])
def test_backfill_curves_match_brute_force_on_each_mixed_gallery(distance, chunk_size):
    """Every point of every curve against retrieval_brute_force on the gallery built item by item.
    Small-integer features with l2 give exact integer scores (many ties), so any BLAS blocking
    scores them identically and the comparison is exact."""
    rng = np.random.default_rng(11)
    n = 60
    y = rng.integers(0, 6, size=n)
    if distance == "l2":
        q, old, new = (rng.integers(-2, 3, size=(n, 3)).astype(np.float32) for _ in range(3))
        tol = 1e-9
    else:
        old, new, y = _pair(seed=12, n=n)
        q = new
        tol = 1e-6
    orders = {"paper": backfill_order(old, y, kind="paper"), "random": backfill_order(old, y, kind="random", seed=2),
              "reverse": np.arange(n)[::-1]}
    for metric in ("top1", "top5", "mAP"):
        betas, curves = metrics.backfill_curves(q, old, new, y, orders, points=7, distance=distance, metric=metric,
                                                chunk_size=chunk_size)
        assert set(curves) == set(orders)
        counts = np.floor(np.round(betas * n, 9)).astype(int)
        for name, order in orders.items():
            for c, value in zip(counts, curves[name]):
                mixed = old.copy()
                mixed[order[:c]] = new[order[:c]]
                ref = retrieval_brute_force(q, mixed, y, y, leave_one_out=True, distance=distance,
                                            topk=(1, 5), chunk_size=chunk_size)[metric]
                assert abs(value - ref) <= tol, (metric, name, c, value, ref)
            single = backfill_curve(q, old, new, y, order, points=7, distance=distance, metric=metric,
                                    chunk_size=chunk_size)[1]
            assert single.tolist() == curves[name].tolist()


def test_backfill_order_paper_and_random():
    x = np.array([[0.0], [1.0], [5.0], [10.0], [11.0], [30.0]], np.float32)
    y = np.array([0, 0, 0, 1, 1, 1])
    # class means 2 and 17: distances 2, 1, 3, 7, 6, 13
    assert backfill_order(x, y, kind="paper").tolist() == [5, 3, 4, 2, 0, 1]
    r1 = backfill_order(x, y, kind="random", seed=1)
    assert sorted(r1.tolist()) == list(range(6))
    assert r1.tolist() == backfill_order(x, y, kind="random", seed=1).tolist()
    with pytest.raises(ValueError, match="`kind`"):
        backfill_order(x, y, kind="fastfill")


def test_curve_area():
    b = np.linspace(0, 1, 21)
    assert curve_area(b, np.full(21, 40.0)) == pytest.approx(40.0)
    assert curve_area(b, 100 * b) == pytest.approx(50.0)
    assert curve_area([0, 0.5, 1], [0, 100, 0]) == pytest.approx(50.0)


# --------------------------------------------------------------------------
# ECC, AC/AM, compatibility matrix
# --------------------------------------------------------------------------

def test_ecc_is_strict():
    assert ecc(60.1, 60.0) is True
    assert ecc(60.0, 60.0) is False
    assert ecc(59.0, 60.0) is False
    assert ecc_margin(61.5, 60.0) == pytest.approx(1.5)


def test_ac_am_hand_made():
    m = [[50, 0, 0],
         [55, 60, 0],
         [45, 62, 70]]
    # pairs (1,0): 55 > 50 yes; (2,0): 45 > 50 no; (2,1): 62 > 60 yes
    ac, am = ac_am(m)
    assert ac == pytest.approx(2 / 3)
    assert am == pytest.approx((55 + 45 + 62) / 3)
    # equality does not count (strict)
    assert ac_am([[50, 0], [50, 60]]) == (0.0, 50.0)
    with pytest.raises(ValueError, match="T >= 2"):
        ac_am([[1.0]])


def test_compatibility_matrix_fills_with_retrieval():
    old, new, y = _pair(n=60)
    m = compatibility_matrix([old, new], [old, new], y, metric="mAP")
    assert m.shape == (2, 2)
    assert m[0, 0] == pytest.approx(retrieval(old, old, y, y, leave_one_out=True)["mAP"])
    assert m[1, 0] == pytest.approx(retrieval(new, old, y, y, leave_one_out=True)["mAP"])
    ac, am = ac_am(m)
    assert am == pytest.approx(m[1, 0]) and ac in (0.0, 1.0)


def test_metrics_module_imports_neither_ray_nor_mlflow():
    code = ("import sys, study.science.metrics; "
            "bad = [m for m in ('ray', 'mlflow', 'torch') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
