"""The torch path of study.science.metrics (``device=...``) against the NumPy path and the brute-force
reference, ties included. Runs on the CPU (and on CUDA too where there is one). A few seconds."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from study.science import _metrics_torch as T
from study.science import metrics
from study.science import retrieval as R
from study.science import keys as K
from study.science.metrics import backfill_curve, backfill_curves, backfill_order, retrieval
from reference import retrieval_brute_force

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _exact(seed: int, n: int = 150, d: int = 16, classes: int = 7):
    """Rows of +-s with 1, 4 or 16 non-zeros (s in 1, 2, 4): normalised entries are +-1, +-1/2,
    +-1/4, so cosine and l2 scores are exact in float32 whatever the matmul's order of sums, and
    many are equal. Plus a zero row, exact duplicates and two singleton classes (no positive)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, d), np.float32)
    for row in x:
        k = rng.choice([1, 4, 16])
        row[rng.choice(d, k, replace=False)] = rng.choice([-1.0, 1.0], k) * rng.choice([1.0, 2.0, 4.0])
    x[5] = 0.0
    x[10:14] = x[20]
    y = rng.integers(0, classes, size=n)
    y[:2] = [100, 101]
    return x, y


def _gaussian(seed: int, n: int = 200, d: int = 24, classes: int = 6):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    x = (rng.standard_normal((classes, d))[y] + 1.2 * rng.standard_normal((n, d))).astype(np.float32)
    return x, y


def _close(a: dict, b: dict, tol: float = 1e-9) -> bool:
    """Equal keys and values within `tol` points (AP's float64 sums run in another order in the
    brute force; equal ranks give equal values up to ~1e-14)."""
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= tol for k in a)


def test_exact_data_really_ties():
    x, _ = _exact(0)
    for distance in ("cosine", "l2"):
        for _, s in R._score_blocks(x, x, True, distance, None):
            assert np.unique(s[30]).size < s.shape[1] / 5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("distance", ["cosine", "l2"])
@pytest.mark.parametrize("chunk_size", [1, 17, None])
@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_equals_numpy_and_brute_force_with_ties(device, distance, chunk_size, seed):
    x, y = _exact(seed)
    kw = dict(leave_one_out=True, distance=distance, topk=(1, 2, 5), chunk_size=chunk_size)
    got = retrieval(x, x, y, y, device=device, **kw)
    assert got == retrieval(x, x, y, y, **kw)
    assert _close(got, retrieval_brute_force(x, x, y, y, **kw))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_size", [1, 9, None])
def test_retrieval_small_integers_l2(device, chunk_size):
    # 3-D vectors of {-2..2}: integer l2 scores, nearly every score tied with others
    rng = np.random.default_rng(3)
    x = rng.integers(-2, 3, size=(120, 3)).astype(np.float32)
    y = rng.integers(0, 9, size=120)
    kw = dict(leave_one_out=True, distance="l2", topk=(1, 5), chunk_size=chunk_size)
    assert _close(retrieval(x, x, y, y, device=device, **kw), retrieval_brute_force(x, x, y, y, **kw))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("distance", ["cosine", "l2"])
def test_retrieval_separate_gallery(device, distance):
    q, ql = _exact(4, n=60)
    g, gl = _exact(5, n=170)
    g[30:40] = q[7]          # the query's duplicates in the gallery
    ql[:4] = 99              # labels absent from the gallery: no positive
    kw = dict(leave_one_out=False, distance=distance, chunk_size=13)
    got = retrieval(q, g, ql, gl, device=device, **kw)
    assert got == retrieval(q, g, ql, gl, **kw)
    assert _close(got, retrieval_brute_force(q, g, ql, gl, **kw))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("distance", ["cosine", "l2"])
def test_retrieval_float_data_within_float_tolerance(device, distance):
    x, y = _gaussian(6)
    kw = dict(leave_one_out=True, distance=distance, topk=(1, 5))
    got = retrieval(x, x, y, y, device=device, **kw)
    assert _close(got, retrieval(x, x, y, y, **kw))
    assert _close(got, retrieval_brute_force(x, x, y, y, **kw))


@pytest.mark.parametrize("device", DEVICES)
def test_tie_rule_and_hand_computed_ap(device):
    q = np.array([[0.0]], np.float32)
    g = np.array([[1.0], [-1.0]], np.float32)   # both at distance 1: a tie, the lower index first
    kw = dict(leave_one_out=False, distance="l2", topk=(1,), device=device)
    assert retrieval(q, g, [1], [0, 1], **kw) == {"top1": 0.0, "mAP": 50.0}
    assert retrieval(q, g, [1], [1, 0], **kw) == {"top1": 100.0, "mAP": 100.0}
    g5 = np.array([[1.0], [2.0], [3.0], [4.0], [5.0]], np.float32)   # positives at ranks 2, 3, 5
    r = retrieval(q, g5, [7], [0, 7, 7, 0, 7], **kw)
    assert r["mAP"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 3 / 5) / 3) and r["top1"] == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_no_positive_raises_and_inputs_are_not_written(device):
    x, y = _exact(7, n=40)
    before = x.copy()
    retrieval(x, x, y, y, leave_one_out=True, distance="l2", device=device)
    assert np.array_equal(x, before)
    with pytest.raises(ValueError, match="no query has a positive"):
        retrieval(x, x, np.arange(40), np.arange(40), leave_one_out=True, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("distance", ["cosine", "l2"])
@pytest.mark.parametrize("chunk_size", [11, None])
def test_backfill_curves_every_point_against_brute_force(device, distance, chunk_size):
    n = 60
    q, y = _exact(8, n=n)
    old, _ = _exact(9, n=n)
    new, _ = _exact(10, n=n)
    new[:10] = old[:10]    # items whose old and new sides are equal
    orders = {"paper": backfill_order(old, y, kind="paper"), "random": backfill_order(old, y, kind="random", seed=2),
              "reverse": np.arange(n)[::-1]}
    kw = dict(points=5, distance=distance, chunk_size=chunk_size)
    curves = {m: backfill_curves(q, old, new, y, orders, metric=m, device=device, **kw)
              for m in ("top1", "top5", "mAP")}
    betas = curves["mAP"][0]
    counts = np.floor(np.round(betas * n, 9)).astype(int)
    for name, order in orders.items():
        for i, c in enumerate(counts):
            mixed = old.copy()
            mixed[order[:c]] = new[order[:c]]
            ref = retrieval_brute_force(q, mixed, y, y, leave_one_out=True, distance=distance, topk=(1, 5),
                                        chunk_size=chunk_size)
            for m, (_, values) in curves.items():
                assert abs(values[name][i] - ref[m]) <= 1e-9, (m, name, c, values[name][i], ref[m])
    _, numpy_curves = backfill_curves(q, old, new, y, orders, metric="mAP", **kw)
    assert all(curves["mAP"][1][name].tolist() == numpy_curves[name].tolist() for name in orders)
    single = backfill_curve(q, old, new, y, orders["paper"], metric="mAP", device=device, **kw)[1]
    assert single.tolist() == curves["mAP"][1]["paper"].tolist()


def test_cuda_blocks_follow_free_memory(monkeypatch):
    free = 3 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 8 << 30))
    cuda = torch.device("cuda")
    for n, width, extra in ((50_000, 50, 0), (50_000, 50, 2), (1_000, 999, 2)):
        rows = T._block_rows(n, n, width, cuda, extra)
        per_row = (T._BYTES_PER_SCORE + 4 * extra) * n + 24 * (width + 1)
        assert rows * per_row <= free * T._CUDA_MEMORY_SHARE < (rows + 1) * per_row or rows == n
    assert T._block_rows(10, 10**9, 1, cuda, 0) == 1                 # never below one row
    assert T._block_rows(100_000, 100_000, 50, cuda, 0) * 100_000 <= T._MAX_BLOCK_SCORES
    # the CPU keeps the NumPy path's fixed budget
    assert T._block_rows(10_000, 10_000, 50, torch.device("cpu"), 2) == R._default_chunk(10_000, 10_000, 3)


def test_trial_evaluation_through_the_torch_path_gives_the_same_metrics(monkeypatch):
    """run_trial with its evaluation sent to the torch path (as on CUDA) against the NumPy path."""
    from types import SimpleNamespace as NS

    from study.science import trial

    rng = np.random.default_rng(0)
    y = np.arange(160) % 4
    lat = rng.normal(size=(4, 6))[y] + rng.normal(size=(160, 6))
    old, new = lat @ rng.normal(size=(6, 8)), lat @ rng.normal(size=(6, 12))
    part = lambda a, s: NS(x=a[s].astype(np.float32), y=y[s])  # noqa: E731
    zs = {"z": NS(x=rng.normal(size=(30, 12)).astype(np.float32), y=np.arange(30) % 3)}
    data = trial.TrialData(part(old, slice(0, 80)), part(new, slice(0, 80)), part(old, slice(80, None)),
                           part(new, slice(80, None)), zs)
    cfg = dict(method="lambda", lam=1.0, epochs=2, batch_size=32, lr=1e-2, num_threads=1, backfill_points=5)
    ref = trial.run_trial(cfg, data)
    monkeypatch.setattr(trial, "_metrics_device", lambda device: torch.device("cpu"))
    got = trial.run_trial(cfg, data)
    keys = [k for k in ref.metrics if not k.startswith("time/")]
    assert np.allclose([got.metrics[k] for k in keys], [ref.metrics[k] for k in keys], rtol=0, atol=1e-9,
                       equal_nan=True)
    assert got.curves[K.CURVE_PAPER] == pytest.approx(ref.curves[K.CURVE_PAPER], abs=1e-9)
