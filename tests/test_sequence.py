"""Sequence trials on tiny synthetic features: the matrix against an independent reference, identity
and orthogonal chains, AC/AM with ties, the key contract."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

from study.science import keys as K
from study.science import metrics
from study.science.sequence import SequenceData, run_sequence_trial
from study.science.trial import normalize_rows, run_trial

torch.set_num_threads(1)
FAST = dict(epochs=3, batch_size=32, lr=1e-2, num_threads=1, backfill_points=3, eval_every=2)


def _data(dims=(8, 10, 12), N=80, seed=0) -> SequenceData:
    rng = np.random.default_rng(seed)
    y = np.arange(2 * N) % 4
    lat = rng.normal(size=(4, 6))[y] + rng.normal(size=(2 * N, 6))
    zy = np.arange(30) % 3
    zlat = rng.normal(size=(3, 6))[zy] + rng.normal(size=(30, 6))
    train, ev, zs = [], [], []
    for t, n in enumerate(dims):
        A = rng.normal(size=(6, n))
        x = (lat @ A + 0.2 * t * rng.normal(size=(2 * N, n))).astype(np.float32)
        train.append(NS(x=x[:N], y=y[:N]))
        ev.append(NS(x=x[N:], y=y[N:]))
        zs.append(NS(x=(zlat @ A).astype(np.float32), y=zy))
    return SequenceData(train, ev, {"z": zs[1:]})


def _resize(x: np.ndarray, n: int) -> np.ndarray:
    """Cut to the first n columns or pad with zeros to n."""
    out = np.zeros((len(x), n))
    m = min(n, x.shape[1])
    out[:, :m] = x[:, :m]
    return out


def _apply_chain(state: dict, x: np.ndarray, i: int, j: int, dims: list[int]) -> np.ndarray:
    """Model i's rows through B_i, then B_{i-1}, ... B_{j+1}, one map at a time (float64)."""
    x = x.astype(np.float64)
    for k in range(i, j, -1):
        W = state.get(f"step{k}.B.weight")
        x = x if W is None else x @ W.double().numpy().T
        b = state.get(f"step{k}.B.bias")
        x = _resize(x if b is None else x + b.double().numpy(), dims[k - 1])
    return x.astype(np.float32)


def _ref_matrix(result, data: SequenceData, stat: str) -> np.ndarray:
    xs = [normalize_rows(e.x) for e in data.eval]
    y = data.eval[0].y
    dims = [x.shape[1] for x in xs]
    m = np.full((data.t, data.t), np.nan)
    for i in range(data.t):
        for j in range(i + 1):
            q = _apply_chain(result.state, xs[i], i, j, dims)
            m[i, j] = metrics.retrieval(q, xs[j], y, y, leave_one_out=True)[stat]
    return m


def _matrix(result, t: int, stat: str, compose: str = "chain") -> np.ndarray:
    m = np.full((t, t), np.nan)
    for i in range(t):
        for j in range(i + 1):
            m[i, j] = result.metrics[K.seq_matrix_key(stat, i, j, compose)]
    return m


@pytest.mark.parametrize("dims", [(8, 10, 12), (8, 12, 10)], ids=["growing", "shrinking"])
def test_matrix_matches_the_composed_weights(dims):
    data = _data(dims)
    res = run_sequence_trial({"method": "lambda", "lam": 1.0, **FAST}, data)
    assert list(res.metrics) == K.sequence_keys(3, ["z"])
    xs = [normalize_rows(e.x) for e in data.eval]
    y = data.eval[0].y
    for stat in K.SEQ_STATS:
        got, ref = _matrix(res, 3, stat), _ref_matrix(res, data, stat)
        np.testing.assert_allclose(got, ref, atol=1e-9)
        # the diagonal is each model's own x/x retrieval
        own = [metrics.retrieval(x, x, y, y, leave_one_out=True)[stat] for x in xs]
        np.testing.assert_allclose(np.diag(got), own, atol=1e-9)
        ac, am = metrics.ac_am(ref)
        assert res.metrics[K.seq_summary_key("AC", stat)] == ac
        assert res.metrics[K.seq_summary_key("AM", stat)] == pytest.approx(am)
    # each update is the ordinary pair trial; its B/old is the matrix's subdiagonal (dims grow: same cut)
    pair = run_trial({"method": "lambda", "lam": 1.0, **FAST}, data.pair(0, 1))
    assert {k: res.metrics[K.step_key(1, k)] for k in pair.metrics if not k.startswith("time/")} == \
        pytest.approx({k: v for k, v in pair.metrics.items() if not k.startswith("time/")}, nan_ok=True)
    if dims[1] >= dims[0]:
        assert res.metrics["seq/top1/1/0"] == pytest.approx(pair.metrics["B/old/top1"])


def test_with_pca_every_update_and_the_direct_adapter_are_the_pair_trials():
    """Each model's preprocessing is fitted once and shared: the updates' and the direct adapter's
    metrics and weights equal independent pair trials (each fits its own)."""
    cfg = {"method": "lambda", "lam": 1.0, **FAST, "pca": 6}
    data = _data((8, 10, 12))
    res = run_sequence_trial(cfg, data, compose="direct")
    for prefix, (old, new) in (("step1", (0, 1)), ("step2", (1, 2)), ("direct2-0", (0, 2))):
        pair = run_trial(cfg, data.pair(old, new))
        for key, value in pair.state.items():
            torch.testing.assert_close(res.state[f"{prefix}.{key}"], value, rtol=0, atol=0)
        if prefix.startswith("step"):
            t = int(prefix[-1])
            assert {k: res.metrics[K.step_key(t, k)] for k in pair.metrics if not k.startswith("time/")} == \
                pytest.approx({k: v for k, v in pair.metrics.items() if not k.startswith("time/")}, nan_ok=True)


def test_identity_adapters_give_the_raw_models_matrix():
    """fct's B is the identity: the matrix is the raw models' (equal dims, no cut)."""
    data = _data((8, 8, 8))
    res = run_sequence_trial({"method": "fct", **FAST}, data, compose="direct")
    xs = [normalize_rows(e.x) for e in data.eval]
    y = data.eval[0].y
    for stat in K.SEQ_STATS:
        raw = np.tril(metrics.compatibility_matrix(xs, xs, y, metric=stat))
        for compose in K.COMPOSE_MODES:
            np.testing.assert_allclose(np.nan_to_num(_matrix(res, 3, stat, compose)), raw, atol=1e-9)
    for i, j in ((1, 0), (2, 0), (2, 1)):
        assert res.metrics[K.seq_orth_key(i, j)] == 0.0
        assert res.metrics[K.seq_zs_key(i, j)] == 0.0


def test_orthogonal_chain_keeps_every_space():
    data = _data((8, 8, 8))
    res = run_sequence_trial({"method": "orthogonal", **FAST}, data, compose="direct")
    for compose in K.COMPOSE_MODES:
        for i, j in ((1, 0), (2, 0), (2, 1)):
            assert res.metrics[K.seq_zs_key(i, j, "z", compose)] == 0.0
            assert res.metrics[K.seq_orth_key(i, j, compose)] < 1e-4
    assert "direct2-0.B.weight" in res.state and "direct1-0.B.weight" not in res.state
    # the direct 2 -> 0 entry is a separately trained adapter, the consecutive ones are the chain's
    assert res.metrics["seq/direct/top1/2/1"] == res.metrics["seq/top1/2/1"]


def test_affine_chain_bends_the_space():
    res = run_sequence_trial({"method": "affine", **FAST, "epochs": 6}, _data((8, 8, 8)))
    assert res.metrics[K.seq_orth_key(2, 0)] > 0.01


def test_ac_am_ties_and_the_unused_upper_triangle():
    nan = float("nan")
    m = [[50, nan, nan],
         [50, 60, nan],   # 50 = 50: a tie does not count
         [51, 60, 70]]    # 51 > 50 counts, 60 = 60 does not
    ac, am = metrics.ac_am(m)
    assert ac == pytest.approx(1 / 3)
    assert am == pytest.approx((50 + 51 + 60) / 3)


def test_bad_sequence_input():
    data = _data((8, 8, 8))
    with pytest.raises(ValueError, match="trains no backward adapter"):
        run_sequence_trial({"method": "independent"}, data)
    with pytest.raises(ValueError, match="compose 'tree'.*chain, direct"):
        run_sequence_trial({"method": "affine"}, data, compose="tree")
    with pytest.raises(ValueError, match=">= 3 models"):
        SequenceData(data.train[:2], data.eval[:2])
    with pytest.raises(ValueError, match="models 1 .. 2"):
        SequenceData(data.train, data.eval, {"z": data.zero_shot["z"][:1]})


def test_sequence_module_imports_neither_ray_nor_mlflow():
    code = ("import sys, study.science.sequence; bad = [m for m in ('ray', 'mlflow') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_report_rows_average_seeds_of_the_summary_keys(tmp_path):
    from study import sequence_report as SR

    def trial(ac: float, am: float, zs: float) -> dict[str, float]:
        m = {K.seq_matrix_key(s, i, j): 50.0 for s in K.SEQ_STATS for i in range(3) for j in range(i + 1)}
        m.update({K.seq_summary_key(n, s): v for n, v in (("AC", ac), ("AM", am)) for s in K.SEQ_STATS})
        return {**m, K.seq_zs_key(2, 0): zs, K.seq_zs_key(1, 0): 99.0}

    assert SR.sequence_length(trial(0, 0, 0)) == 3 and SR.sequence_length({"B/old/top1": 1.0}) == 0
    key = ("a->b->c", "mnist", "lambda", "12")
    rows = SR.summarize({key: [trial(1.0, 60.0, -1.0), trial(0.0, 70.0, -3.0)], ("x", "y", "affine", ""): [{}]})
    assert len(rows) == 1 and rows[0]["n"] == 2
    assert rows[0]["AC/top1"] == (0.5, 0.5) and rows[0]["AM/mAP"] == (65.0, 5.0)
    assert rows[0]["ZS final"] == (-2.0, 1.0)   # the map newest -> oldest, not 1 -> 0
    assert "| a->b->c | mnist | lambda | 12 | 2 | 0.50 ± 0.50 | 65.00 ± 5.00 |" in SR.markdown(rows)
    files = SR.write_matrices(trial(1.0, 60.0, -1.0), 3, tmp_path)
    assert [f.name for f in files] == ["matrix_top1.csv", "matrix_mAP.csv", "matrix.png"]
    assert (tmp_path / "matrix_top1.csv").read_text().splitlines()[1:3] == ["0,50.0000,,", "1,50.0000,50.0000,"]
