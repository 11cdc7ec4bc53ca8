"""Regularizers and losses against independent references (formulas, NumPy, loops)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from study.science.adapters import orthogonality_deviation
from study.science.losses import multi_positive_contrastive, squared_error
from study.science.regularizers import (
    REGULARIZERS,
    build_regularizer,
    lambda_orthogonality,
    soft_orthogonality,
    srip,
)

torch.set_num_threads(1)


def _f(t: torch.Tensor) -> float:
    return t.detach().item()


def _w(n=6, scale=0.3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.eye(n, dtype=dtype) + scale * torch.randn(n, n, generator=g, dtype=dtype)).requires_grad_()


def test_deviation_matches_numpy():
    W = _w()
    Wn = W.detach().numpy()
    ref = np.linalg.norm(Wn.T @ Wn - np.eye(6), "fro")
    assert _f(orthogonality_deviation(W)) == pytest.approx(ref, rel=1e-12)


def test_deviation_gradient_is_zero_not_nan_at_identity():
    W = torch.eye(5, requires_grad=True)
    orthogonality_deviation(W).backward()
    assert torch.equal(W.grad, torch.zeros(5, 5))


@pytest.mark.parametrize("lam,alpha", [(0.5, 10.0), (2.0, 1.0), (0.0, 3.0)])
def test_lambda_value_and_gradient_match_the_formula(lam, alpha):
    W = _w()
    Wn = W.detach().numpy()
    M = Wn.T @ Wn - np.eye(6)
    D = np.linalg.norm(M, "fro")
    s = 1 / (1 + math.exp(-alpha * (D - lam)))
    assert _f(lambda_orthogonality(W, lam, alpha)) == pytest.approx(s * D, rel=1e-12)
    # analytic gradient: dL/dD = s + alpha D s (1 - s); dD/dW = 2 W M / D
    grad_ref = (s + alpha * D * s * (1 - s)) * 2 * Wn @ M / D
    lambda_orthogonality(W, lam, alpha).backward()
    np.testing.assert_allclose(W.grad.numpy(), grad_ref, rtol=1e-10, atol=1e-12)
    # autograd vs central finite differences
    W0 = W.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda w: lambda_orthogonality(w, lam, alpha), (W0,))


def test_lambda_limits():
    W = _w()
    D = _f(orthogonality_deviation(W))
    assert _f(lambda_orthogonality(W, math.inf, 10.0)) == 0.0  # lambda = inf: affine
    v0 = _f(lambda_orthogonality(W, 0.0, 10.0))  # lambda = 0: soft orthogonality (x a factor in [1/2, 1))
    assert D / 2 <= v0 < D
    assert _f(lambda_orthogonality(W, 0.0, 1e4)) == pytest.approx(_f(soft_orthogonality(W)))
    far = _f(lambda_orthogonality(W, D + 5, 10.0))  # far below lambda: ~0 (gate floored at sigmoid(-40))
    assert far == pytest.approx(D / (1 + math.exp(40.0)), rel=1e-9)


def test_soft_orthogonality_forms():
    W = _w()
    D = _f(orthogonality_deviation(W))
    assert _f(soft_orthogonality(W)) == pytest.approx(D)
    assert _f(soft_orthogonality(W, squared=True)) == pytest.approx(D * D)
    assert torch.autograd.gradcheck(lambda w: soft_orthogonality(w, squared=True), (W,))


def test_srip_matches_numpy_spectral_norm_and_its_gradient():
    W = _w(n=8, scale=0.4, seed=1)
    M = W.detach().numpy().T @ W.detach().numpy() - np.eye(8)
    ref = np.linalg.norm(M, 2)
    g = torch.Generator().manual_seed(0)
    value = srip(W, n_iter=200, generator=g)
    assert _f(value) == pytest.approx(ref, rel=1e-6)
    value.backward()
    W2 = W.detach().clone().requires_grad_()
    torch.linalg.matrix_norm(W2.T @ W2 - torch.eye(8, dtype=W2.dtype), ord=2).backward()
    np.testing.assert_allclose(W.grad.numpy(), W2.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_srip_is_seeded_and_warm_start_converges():
    W = _w(n=12, scale=0.3, seed=2)
    a = srip(W, n_iter=3, generator=torch.Generator().manual_seed(7))
    b = srip(W, n_iter=3, generator=torch.Generator().manual_seed(7))
    assert _f(a) == _f(b)
    ref = np.linalg.norm(W.detach().numpy().T @ W.detach().numpy() - np.eye(12), 2)

    class Cfg:
        srip_iters, seed = 2, 0

    reg = build_regularizer("srip", Cfg())
    values = [_f(reg(W)) for _ in range(100)]  # the vector is kept between calls
    assert values[-1] == pytest.approx(ref, rel=1e-6)
    assert all(v <= ref * (1 + 1e-9) for v in values)  # a Rayleigh-type lower bound


def test_registry_builds_every_regularizer():
    class Cfg:
        lam, alpha, srip_iters, seed = 1.0, 10.0, 5, 0

    W = _w()
    for name in REGULARIZERS:
        value = build_regularizer(name, Cfg())(W)
        assert value.ndim == 0 and torch.isfinite(value)
    assert build_regularizer(None, Cfg()) is None
    with pytest.raises(ValueError, match="known: lambda"):
        build_regularizer("nope", Cfg())


# ---------------------------------------------------------------------------
def _contrastive_loop(anchors, candidates, ya, yc, T):
    """Textbook multi-positive contrastive loss, one anchor at a time, in float64 Python."""
    a = [np.asarray(v, dtype=np.float64) for v in anchors]
    c = [np.asarray(v, dtype=np.float64) for v in candidates]
    losses = []
    for i, ai in enumerate(a):
        pos = [j for j in range(len(c)) if yc[j] == ya[i]]
        if not pos:
            continue
        sims = [float(ai @ cj / (np.linalg.norm(ai) * np.linalg.norm(cj))) / T for cj in c]
        mx = max(sims)
        log_z = mx + math.log(sum(math.exp(s - mx) for s in sims))
        losses.append(-sum((sims[j] - log_z) / len(pos) for j in pos))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("T", [0.1, 0.5])
def test_contrastive_matches_brute_force_loop(T):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(12, 5, generator=g, dtype=torch.float64)
    c = torch.randn(9, 5, generator=g, dtype=torch.float64)
    ya = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 0, 1, 2, 9])  # class 9 has no candidate: left out
    yc = torch.tensor([0, 0, 1, 2, 2, 2, 3, 1, 0])
    got = multi_positive_contrastive(a, c, ya, yc, T)
    ref = _contrastive_loop(a.numpy(), c.numpy(), ya.tolist(), yc.tolist(), T)
    assert _f(got) == pytest.approx(ref, rel=1e-10)
    # same set as anchors and candidates: candidate labels default to the anchors'
    got2 = multi_positive_contrastive(a, a, ya, temperature=T)
    assert _f(got2) == pytest.approx(_contrastive_loop(a.numpy(), a.numpy(), ya.tolist(), ya.tolist(), T), rel=1e-10)


def test_contrastive_without_any_positive_is_zero_with_a_gradient():
    a = torch.randn(3, 4, requires_grad=True)
    loss = multi_positive_contrastive(a, torch.randn(2, 4), torch.tensor([0, 1, 2]), torch.tensor([5, 6]))
    loss.backward()
    assert _f(loss) == 0.0 and a.grad is not None


def test_squared_error_is_batch_mean_of_squared_norms():
    a, b = torch.randn(7, 3), torch.randn(7, 3)
    ref = np.mean(np.sum((a.numpy() - b.numpy()) ** 2, axis=1))
    assert _f(squared_error(a, b)) == pytest.approx(ref, rel=1e-6)


def test_lambda_far_below_lambda_stays_out_of_float32_denormals():
    """Where the exact gate sigmoid(alpha (D - lam)) is a float32 denormal (argument ~ -88), the floored
    gate keeps values and gradients normal: one such step took 24 s instead of 0.2 s at n = 1280."""
    W = (torch.eye(64) + 1e-3 * torch.randn(64, 64, generator=torch.Generator().manual_seed(0))).requires_grad_()
    D = _f(orthogonality_deviation(W))
    lam, alpha = D + 88.0 / 30.0, 30.0
    tiny = torch.finfo(torch.float32).tiny
    assert 0 < torch.sigmoid(torch.tensor(alpha * (D - lam))).item() < tiny  # the exact gate: denormal
    value = lambda_orthogonality(W, lam, alpha)
    value.backward()
    assert tiny < _f(value) < 1e-15
    g = W.grad
    assert not bool(((g != 0) & (g.abs() < tiny)).any())
