"""Index evaluation (study.science.index_eval) against independent references: brute-force numpy rankings,
the exact metrics path, and freshly filled indexes."""
from __future__ import annotations

import math
import os
import re

import faiss
import numpy as np
import pytest

from study.science import keys as K
from study.science import index_eval, metrics
from study.science.index_eval import (
    DeployedIndex,
    IndexSpec,
    IndexSpecError,
    exact_topk,
    index_threads,
    recall_at_k,
    topk_cmc,
)


def _clustered(n: int, d: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centers = rng.standard_normal((classes, d))
    return (0.6 * centers[y] + rng.standard_normal((n, d))).astype(np.float32), y


def _brute_topk(q: np.ndarray, g: np.ndarray, k: int, distance: str, leave_one_out: bool) -> np.ndarray:
    """float64 scores, stable argsort, own item dropped: the textbook ranking."""
    q64, g64 = q.astype(np.float64), g.astype(np.float64)
    if distance == "cosine":
        q64 /= np.linalg.norm(q64, axis=1, keepdims=True)
        g64 /= np.linalg.norm(g64, axis=1, keepdims=True)
        s = q64 @ g64.T
    else:
        s = -((q64[:, None, :] - g64[None, :, :]) ** 2).sum(-1)
    if leave_one_out:
        np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("distance", ["cosine", "l2"])
def test_flat_index_gives_the_exact_top_k(distance: str) -> None:
    """Random Gaussian features have no exact or near ties at these sizes, so the top-k must agree
    item for item (with ties faiss would put the higher id first; see the next test)."""
    x, y = _clustered(600, 32, 6, 0)
    index = DeployedIndex(IndexSpec.from_dict({"factory": "Flat"}), x, distance)
    index.fill(x)
    ref = _brute_topk(x, x, 10, distance, leave_one_out=True)
    np.testing.assert_array_equal(index.search(x, 10, leave_one_out=True), ref)
    np.testing.assert_array_equal(exact_topk(x, x, 10, leave_one_out=True, distance=distance), ref)
    # CMC read off the index's top-k equals the exact full-ranking path
    exact = metrics.retrieval(x, x, y, y, leave_one_out=True, distance=distance, topk=(1, 5))
    got = topk_cmc(index.search(x, 5, leave_one_out=True), y, y, (1, 5), leave_one_out=True)
    assert got == {"top1": exact["top1"], "top5": exact["top5"]}


def test_faiss_flat_breaks_exact_ties_higher_id_first() -> None:
    g = np.tile(np.array([[1.0, 0.0, 0.0]], dtype=np.float32), (5, 1))
    assert exact_topk(g[:1], g, 5, leave_one_out=False).tolist() == [[4, 3, 2, 1, 0]]


def test_ivf_with_nprobe_equal_to_nlist_has_recall_one() -> None:
    x, _ = _clustered(1200, 24, 8, 1)
    for factory in ("IVF16,Flat", "IVF16,PQ4"):
        spec = IndexSpec.from_dict({"factory": factory, "nprobe": 16})
        index = DeployedIndex(spec, x, "cosine")
        index.fill(x)
        ids = index.search(x, 10, leave_one_out=True)
        exact = exact_topk(x, x, 10, leave_one_out=True, distance="cosine")
        if factory == "IVF16,Flat":   # all lists visited, uncompressed: exhaustive search
            assert recall_at_k(ids, exact, 10) == 100.0
        else:                         # all lists visited, but PQ codes: approximate
            assert recall_at_k(ids, exact, 10) < 100.0
    few = DeployedIndex(IndexSpec.from_dict({"factory": "IVF16,Flat", "nprobe": 1}), x, "cosine")
    few.fill(x)
    assert recall_at_k(few.search(x, 10, leave_one_out=True), exact_topk(x, x, 10, leave_one_out=True), 10) < 100.0


def test_topk_cmc_and_recall_closed_form() -> None:
    # gallery labels 0 0 1 1 2; query i = gallery item i (leave-one-out); retrieved ids by hand
    gl = np.array([0, 0, 1, 1, 2])
    ids = np.array([[2, 1, 3], [0, 2, 4], [4, 0, 3], [0, 1, 4], [0, 1, 2]])
    # first positive ranks: q0 -> 2, q1 -> 1, q2 -> 3, q3 -> none in top 3; q4 has no positive: skipped
    got = topk_cmc(ids, gl, gl, (1, 2, 3), leave_one_out=True)
    assert got == {"top1": 25.0, "top2": 50.0, "top3": 75.0}
    exact = np.array([[1, 2, 3], [0, 3, 4], [3, 4, 0], [2, -1, -1], [0, 1, 2]])
    # overlaps: 3, 2, 3, 0, 3 of 3
    assert math.isclose(recall_at_k(ids, exact, 3), 100.0 * (3 + 2 + 3 + 0 + 3) / 15)
    assert recall_at_k(np.full((1, 2), -1), np.full((1, 2), -1), 2) == 0.0


@pytest.mark.parametrize("factory,in_place", [("Flat", True), ("IVF8,Flat", True), ("IVF8,PQ4", True),
                                              ("PQ4", True), ("HNSW16", False)])
def test_backfill_in_the_index_starts_all_old_and_ends_all_new(factory: str, in_place: bool) -> None:
    """Replacing every item in place (in a random order, in uneven steps) gives exactly the index
    filled with the new vectors from the start (same trained quantizer); no step gives the old one."""
    old, _ = _clustered(500, 16, 5, 2)
    new, _ = _clustered(500, 16, 5, 3)
    train, _ = _clustered(800, 16, 5, 4)
    index = DeployedIndex(IndexSpec.from_dict({"factory": factory}), train, "cosine")
    assert index.in_place is in_place
    index.fill(new)
    all_new = index.search(new, 8, leave_one_out=True)
    index.fill(old)
    all_old = index.search(new, 8, leave_one_out=True)
    index.replace(np.array([], dtype=np.int64), new[:0])
    np.testing.assert_array_equal(index.search(new, 8, leave_one_out=True), all_old)   # beta = 0
    order = np.random.default_rng(0).permutation(500)
    for lo, hi in ((0, 7), (7, 260), (260, 500)):
        index.replace(order[lo:hi], new[order[lo:hi]])
        if hi < 500:
            assert not np.array_equal(index.search(new, 8, leave_one_out=True), all_new)
    np.testing.assert_array_equal(index.search(new, 8, leave_one_out=True), all_new)   # beta = 1


def test_threads_follow_the_trial_and_are_restored(monkeypatch) -> None:
    before = faiss.omp_get_max_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")   # what Ray sets in a 1-CPU trial's worker
    with index_threads(None) as n:
        assert n == 1 == faiss.omp_get_max_threads()
    with index_threads(3) as n:
        assert n == 3 == faiss.omp_get_max_threads()
    assert faiss.omp_get_max_threads() == before
    assert os.environ["OMP_NUM_THREADS"] == "1"


@pytest.mark.parametrize("entry,dim,n_train,key,needle", [
    ({"factory": "IVF8,Flatt"}, 16, 100, "factory", "cannot build"),
    ({"factory": "IVF8,PQ5"}, 16, 1000, "factory", "divide the dim 16"),
    ({"factory": "IVF64,Flat"}, 16, 50, "factory", "50 points"),
    ({"factory": "PQ4"}, 16, 100, "factory", "256 centroids"),
    ({"factory": "Flat", "nprobe": 4}, 16, 100, "nprobe", "allowed for it: none"),
    ({"factory": "HNSW32", "nprobe": 4}, 16, 100, "nprobe", "allowed for it: efSearch"),
    ({"factory": "IVF8,Flat", "nprobe": 9}, 16, 100, "nprobe", "<= the 8 IVF lists"),
    ({"factory": "IVF8,Flat", "efsearch": 9}, 16, 100, "efsearch", "did you mean `efSearch`"),
])
def test_bad_entries_name_the_key(entry, dim, n_train, key, needle) -> None:
    with pytest.raises(IndexSpecError) as err:
        IndexSpec.from_dict(entry).build(dim, n_train=n_train)
    assert err.value.key == key and needle in err.value.message, err.value.message


class _F:
    def __init__(self, x, y) -> None:
        self.x, self.y = x, y


def test_run_trial_index_rows_match_the_exact_rows_for_flat() -> None:
    from study.science.trial import TrialData, run_trial

    rng = np.random.default_rng(5)
    xo, y = _clustered(900, 24, 6, 5)
    xn = np.concatenate([xo, rng.standard_normal((900, 8)).astype(np.float32)], axis=1)   # d = 24, n = 32
    data = TrialData(_F(xo[:600], y[:600]), _F(xn[:600], y[:600]), _F(xo[600:], y[600:]), _F(xn[600:], y[600:]))
    index = [{"factory": "Flat"}, {"factory": "HNSW16", "name": "hnsw", "efSearch": 64, "recall_k": 5}]
    for method in ("lambda", "independent"):
        res = run_trial({"method": method, "lam": 3.0, "epochs": 2, "index": index}, data)
        m = res.metrics
        specs = [IndexSpec.from_dict(e) for e in index]
        assert set(K.index_keys(specs)) <= set(m)
        for key in m:   # MLflow's rule for metric names
            assert re.fullmatch(r"[\w\-. :/]+", key), key
        for row in K.INDEX_ROWS:
            for stat in ("top1", "top5"):
                assert m[K.index_key("Flat", row, stat)] == pytest.approx(m[f"{row}/{stat}"], nan_ok=True)
            if math.isnan(m[f"{row}/top1"]):
                assert math.isnan(m[K.index_key("hnsw", row, "recall5")])
            else:
                assert m[K.index_key("Flat", row, "recall10")] == 100.0
        flat_curve = res.curves[K.index_key("Flat", K.CURVE_PAPER)]
        assert flat_curve == pytest.approx(res.curves[K.index_key(K.INDEX_EXACT, K.CURVE_PAPER)])
        assert len(flat_curve) == len(res.curves[K.CURVE_BETA])
        assert m[K.index_key("hnsw", K.INDEX_IN_PLACE)] == 0.0 and m[K.index_key("Flat", K.INDEX_IN_PLACE)] == 1.0
        if method == "lambda":   # the backfill starts as the F index queried by B(h_new): the B/F row
            assert flat_curve[0] == pytest.approx(m["B/F/top1"])
            hnsw_curve = res.curves[K.index_key("hnsw", K.CURVE_PAPER)]
            assert hnsw_curve[0] == pytest.approx(m[K.index_key("hnsw", "B/F", "top1")])


def test_report_index_drop_is_exact_minus_index_mean_over_seeds(tmp_path) -> None:
    from types import SimpleNamespace

    from study.report import index_markdown, plot_index_drop, summarize_index

    def run(method: str, lam: str, seed: int, exact: float, in_index: float) -> SimpleNamespace:
        m = {"old/old/top1": 80.0, "B/old/top1": exact, "B/F/top1": 70.0,
             K.index_key("IVF4_PQ8", "old/old", "top1"): 78.0, K.index_key("IVF4_PQ8", "B/old", "top1"): in_index,
             K.index_key("IVF4_PQ8", "B/F", "top1"): 70.0, K.index_key("IVF4_PQ8", "B/old", "recall10"): 50.0 + seed,
             K.index_key("IVF4_PQ8", "old/old", "recall10"): 60.0}
        tags = {"pair": "a->b", "dataset": "mnist", "method": method, "lambda": lam, "seed": str(seed)}
        return SimpleNamespace(info=SimpleNamespace(status="FINISHED"), data=SimpleNamespace(metrics=m, tags=tags))

    runs = [run("affine", "", 0, 75.0, 70.0), run("affine", "", 1, 77.0, 70.0), run("lambda", "12", 0, 74.0, 73.0)]
    rows = summarize_index(runs)
    assert [(r["method"], r["index"], r["n"]) for r in rows] == [("lambda", "IVF4_PQ8", 1), ("affine", "IVF4_PQ8", 2)]
    affine = rows[1]
    assert affine["B/old drop"] == (6.0, 1.0) and affine["old/old drop"] == (2.0, 0.0)
    assert affine["B/F drop"] == (0.0, 0.0) and affine["B/old recall"] == (50.5, 0.5)
    assert math.isnan(affine["backfill"][0])
    assert "| a->b | mnist | affine | - | IVF4_PQ8 | 2.00 ± 0.00 | 6.00 ± 1.00 |" in index_markdown(rows)
    assert plot_index_drop(rows, tmp_path / "drop.png") and (tmp_path / "drop.png").stat().st_size > 0


@pytest.mark.parametrize("candidates", [1, 8])
def test_faiss_top1_equals_the_exact_path_ties_included(candidates):
    """Top-1-only retrieval through IndexFlatIP keeps the exact path's tie rule (lower index first):
    rows drawn from a few integer vectors tie exactly and often; candidates=1 forces the exact fallback."""
    rng = np.random.default_rng(0)
    base = rng.integers(-2, 3, size=(6, 8)).astype(np.float32)
    x = base[rng.integers(0, 6, size=300)]
    y = rng.integers(0, 4, size=300)
    y[:3] = [7, 8, 9]  # queries without a positive are skipped
    want = metrics.retrieval(x, x, y, y, leave_one_out=True, topk=(1,))["top1"]
    assert index_eval.top1_leave_one_out(x, x, y, candidates=candidates) == want
    z = rng.normal(size=(500, 16)).astype(np.float32)
    yz = rng.integers(0, 10, size=500)
    g = z + 0.5 * rng.normal(size=z.shape).astype(np.float32)  # a gallery of other vectors (as B/old)
    for query, gallery in ((z, z), (z, g), (x[:300], x[::-1].copy()[:300])):
        labels = yz[:len(query)]
        want = metrics.retrieval(query, gallery, labels, labels, leave_one_out=True, topk=(1,))["top1"]
        assert index_eval.top1_leave_one_out(query, gallery, labels, candidates=candidates) == want


def test_top1_only_scores_go_through_faiss_on_large_sets_with_the_same_result(monkeypatch) -> None:
    """A CPU trial's top-1-only scores (zero-shot, cheap per-epoch rows) go through faiss from
    FAISS_TOP1_MIN_ROWS rows on, with the same numbers."""
    from study.science.trial import TrialData, run_trial

    xo, y = _clustered(400, 16, 5, 1)
    xn, _ = _clustered(400, 16, 5, 2)
    xz, yz = _clustered(300, 16, 7, 3)
    data = TrialData(_F(xo[:250], y[:250]), _F(xn[:250], y[:250]), _F(xo[250:], y[250:]), _F(xn[250:], y[250:]),
                     {"z": _F(xz, yz)})
    cfg = {"method": "lambda", "lam": 3.0, "epochs": 2, "backfill_points": 3}
    exact = run_trial(cfg, data).metrics
    calls: list[int] = []
    real = index_eval.top1_leave_one_out
    monkeypatch.setattr(index_eval, "top1_leave_one_out",
                        lambda q, g, labels, **kw: calls.append(len(q)) or real(q, g, labels, **kw))
    monkeypatch.setattr(metrics, "FAISS_TOP1_MIN_ROWS", 150)
    via_faiss = run_trial(cfg, data).metrics
    # cheap eval at epochs 1 and 2: rows B/old, B/F, B/B on the 150-row eval split and the zero-shot pair
    # (new, B) on the 300-row set; then the final zero-shot pair
    assert calls == ([150] * 3 + [300] * 2) * 2 + [300, 300]
    for key in ("zs/z", "zs/z/new_top1", "zs/z/B_top1", "zs/mean", "B/old/top1", "B/B/top1"):
        assert via_faiss[key] == exact[key], key
