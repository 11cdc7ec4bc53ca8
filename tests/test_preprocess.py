"""Per-model preprocessing (study.science.preprocess): centring and PCA against NumPy references."""
from __future__ import annotations

import math
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

from study.science import preprocess
from study.science.preprocess import Preprocess
from study.science.trial import TrialData, run_trial

torch.set_num_threads(1)
CPU = torch.device("cpu")


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference_basis(z: np.ndarray, k: int) -> np.ndarray:
    """The k leading right singular vectors of the centred rows, signed by the largest coordinate."""
    _, _, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
    top = vt[:k].T
    return top * np.sign(top[np.abs(top).argmax(0), np.arange(k)])


def test_centre_of_a_large_train_split_is_the_mean_of_its_unit_rows(monkeypatch):
    x = np.random.default_rng(0).normal(size=(1000, 5)).astype(np.float16)
    monkeypatch.setattr(preprocess, "_CHUNK", 64)  # several passes, as for a split of millions
    prep = Preprocess(x, normalize=True, center=True, pca=None, seed=0, device=CPU)
    unit = _unit(x)
    np.testing.assert_allclose(prep.shift.numpy(), unit.mean(0), atol=1e-6)
    rows = torch.as_tensor(x[[3, 999, 3]])
    np.testing.assert_allclose(prep(rows).numpy(), unit[[3, 999, 3]] - unit.mean(0), atol=1e-6)


def _spread(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Rows with clearly separated variances per direction (a well-posed PCA)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    return ((rng.normal(size=(n, dim)) * np.geomspace(5, 0.1, dim)) @ q.T + 0.5).astype(np.float32)


@pytest.mark.parametrize("center", [False, True])
def test_pca_basis_and_projection_match_numpy_svd(monkeypatch, center):
    x = _spread(600, 12)
    monkeypatch.setattr(preprocess, "_CHUNK", 100)
    prep = Preprocess(x, normalize=True, center=center, pca=4, seed=0, device=CPU)
    z = _unit(x)
    z = z - z.mean(0) if center else z
    basis = _reference_basis(z, 4)
    np.testing.assert_allclose(prep.basis.numpy(), basis, atol=1e-5)
    assert prep.dim == 4
    out = prep(torch.as_tensor(x[:7])).numpy()
    np.testing.assert_allclose(out, _unit(z[:7] @ basis), atol=1e-5)  # projected, then unit rows again


def test_pca_on_a_split_above_the_fit_limit_uses_a_seeded_sample(monkeypatch):
    x = _spread(500, 10)
    monkeypatch.setattr(preprocess, "PCA_FIT_ROWS", 200)
    monkeypatch.setattr(preprocess, "_CHUNK", 64)
    prep = Preprocess(x, normalize=False, center=False, pca=3, seed=5, device=CPU)
    idx = np.sort(torch.randperm(500, generator=torch.Generator().manual_seed(5))[:200].numpy())
    np.testing.assert_allclose(prep.basis.numpy(), _reference_basis(x[idx].astype(np.float64), 3), atol=1e-5)
    np.testing.assert_allclose(prep(torch.as_tensor(x[:3])).numpy(), x[:3] @ prep.basis.numpy(), rtol=1e-6)


def test_pca_at_or_above_the_dim_keeps_the_features():
    x = _spread(50, 6)
    prep = Preprocess(x, normalize=True, center=False, pca=6, seed=0, device=CPU)
    assert prep.basis is None and prep.dim is None
    np.testing.assert_allclose(prep(torch.as_tensor(x)).numpy(), _unit(x), atol=1e-6)


def _pair(N=80, d=10, n=12, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(2 * N) % 4
    lat = rng.normal(size=(4, 6))[y] + rng.normal(size=(2 * N, 6))
    old, new = lat @ rng.normal(size=(6, d)), lat @ rng.normal(size=(6, n)) + 0.1 * rng.normal(size=(2 * N, n))
    zs = rng.normal(size=(30, n))
    return y, old.astype(np.float32), new.astype(np.float32), zs.astype(np.float32)


def _trial_data(y, old, new, zs, N=80):
    part = lambda a, s: NS(x=a[s], y=y[s])  # noqa: E731
    tr, ev = slice(0, N), slice(N, 2 * N)
    return TrialData(part(old, tr), part(new, tr), part(old, ev), part(new, ev),
                     {"z": NS(x=zs, y=np.arange(30) % 3)})


@pytest.mark.parametrize("method", ["orthogonal", "lambda", "affine"])
def test_a_pca_trial_is_the_trial_on_numpy_projected_features(method):
    """pca = k equals a trial without pca on features projected beforehand by the NumPy reference."""
    y, old, new, zs = _pair()
    cfg = dict(method=method, lam=1.0, epochs=3, batch_size=32, lr=1e-2, num_threads=1, backfill_points=5)
    got = run_trial({**cfg, "pca": 5}, _trial_data(y, old, new, zs))
    bases = {name: _reference_basis(_unit(a[:80]), 5) for name, a in (("old", old), ("new", new))}
    proj = lambda a, name: _unit(_unit(a) @ bases[name]).astype(np.float32)  # noqa: E731
    ref = run_trial(cfg, _trial_data(y, proj(old, "old"), proj(new, "new"), proj(zs, "new")))
    for key, value in ref.metrics.items():
        if not key.startswith("time/"):
            assert math.isclose(got.metrics[key], value, rel_tol=1e-4, abs_tol=1e-4) or \
                (math.isnan(value) and math.isnan(got.metrics[key])), key
    assert got.state["old.pca"].shape == (10, 5) and got.state["new.pca"].shape == (12, 5)
    assert got.state["B.weight"].shape == (5, 5)
    np.testing.assert_allclose(got.state["new.pca"].numpy(), bases["new"], atol=1e-5)
