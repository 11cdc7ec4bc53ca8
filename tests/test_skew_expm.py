"""study.science.skew_expm.expm_skew against torch.linalg.matrix_exp (Taylor/Pade, float64) as the reference."""
from __future__ import annotations

import pytest
import torch

from study.science.adapters import make_backward
from study.science.skew_expm import expm_skew


def _skew(n: int, scale: float, seed: int, dtype=torch.float64) -> torch.Tensor:
    X = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    return (X - X.mT).to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _reference(A: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    A = A.double().clone().requires_grad_(True)
    E = torch.linalg.matrix_exp(A)
    E.backward(G.double())
    return E.detach(), A.grad


def _ours(A: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    A = A.clone().requires_grad_(True)
    E = expm_skew(A)
    E.backward(G.to(A.dtype))
    return E.detach(), A.grad


@pytest.mark.parametrize("n,scale", [(1, 1.0), (2, 0.3), (7, 0.01), (33, 1.0), (64, 5.0)])
def test_float64_matches_matrix_exp_value_and_gradient(n, scale):
    A = _skew(n, scale, seed=n)
    G = torch.randn(n, n, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    ref_E, ref_g = _reference(A, G)
    E, g = _ours(A, G)
    # matrix_exp's own truncation error is ~1e-11 at these norms (see the closed-form test below)
    assert _rel(E, ref_E) < 1e-9
    assert _rel(g, ref_g) < 1e-9


@pytest.mark.parametrize("theta", [0.0, 1e-8, 0.3, 3.0, 40.0])
def test_rotation_blocks_match_the_closed_form(theta):
    """exp([[0, t], [-t, 0]]) = [[cos t, sin t], [-sin t, cos t]], also as repeated blocks."""
    J = torch.tensor([[0.0, theta], [-theta, 0.0]], dtype=torch.float64)
    R = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64) * torch.cos(torch.tensor(theta, dtype=torch.float64))
    R = R + J / theta * torch.sin(torch.tensor(theta, dtype=torch.float64)) if theta else R
    assert torch.allclose(expm_skew(J), R, atol=1e-14)
    assert torch.allclose(expm_skew(torch.block_diag(J, J, 2 * J)), torch.block_diag(R, R, R @ R), atol=1e-13)


def test_float32_is_at_least_as_accurate_as_torch_in_float32():
    A64 = _skew(200, 0.5, seed=3)
    G = torch.randn(200, 200, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref_E, ref_g = _reference(A64, G)
    E, g = _ours(A64.float(), G)
    assert E.dtype == torch.float32 and g.dtype == torch.float32
    torch_E, torch_g = (t for t in _reference_float32(A64.float(), G.float()))
    assert _rel(E, ref_E) < 1e-5 and _rel(g, ref_g) < 1e-5
    assert _rel(E, ref_E) <= _rel(torch_E, ref_E)
    assert _rel(g, ref_g) <= _rel(torch_g, ref_g)


def _reference_float32(A: torch.Tensor, G: torch.Tensor):
    A = A.clone().requires_grad_(True)
    E = torch.linalg.matrix_exp(A)
    E.backward(G)
    return E.detach(), A.grad


def test_zero_and_repeated_eigenvalues():
    """A = 0 (every eigenvalue equal): exp = I and the gradient is G itself (L(0, G) = G);
    the gradient at a block diagonal of equal rotations (each eigenvalue repeated) against the reference."""
    G = torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    E, g = _ours(torch.zeros(6, 6, dtype=torch.float64), G)
    assert torch.allclose(E, torch.eye(6, dtype=torch.float64), atol=1e-14)
    assert torch.allclose(g, G, atol=1e-13)
    J = torch.tensor([[0.0, 0.7], [-0.7, 0.0]], dtype=torch.float64)
    A = torch.block_diag(J, J, J)
    ref_E, ref_g = _reference(A, G)
    E, g = _ours(A, G)
    assert _rel(E, ref_E) < 1e-9 and _rel(g, ref_g) < 1e-9


def test_gradcheck():
    X = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert torch.autograd.gradcheck(lambda X: expm_skew(X.tril(-1) - X.tril(-1).mT), (X,))


def test_result_is_a_rotation():
    E = expm_skew(_skew(50, 2.0, seed=5))
    assert torch.allclose(E.mT @ E, torch.eye(50, dtype=torch.float64), atol=1e-12)
    assert float(torch.linalg.det(E)) == pytest.approx(1.0, abs=1e-10)


def test_half_precision_goes_through_float32():
    A = _skew(8, 0.5, seed=6, dtype=torch.bfloat16)
    E = expm_skew(A)
    assert E.dtype == torch.bfloat16
    assert _rel(E, torch.linalg.matrix_exp(A.double())) < 1e-2


@pytest.mark.parametrize("bad", [torch.zeros(3, 4), torch.zeros(2, 3, 3), torch.zeros(3, 3, dtype=torch.int64),
                                 torch.zeros(3, 3, dtype=torch.complex64)])
def test_rejects_non_square_or_non_real(bad):
    with pytest.raises(ValueError, match="expm_skew needs"):
        expm_skew(bad)


def test_methods_agree_and_unknown_method_is_named():
    A = _skew(16, 0.4, seed=8)
    assert torch.allclose(expm_skew(A, "eigh"), expm_skew(A, "matrix_exp"), atol=1e-10)
    assert torch.allclose(expm_skew(A), expm_skew(A, "eigh"), atol=0)  # auto on the CPU
    with pytest.raises(ValueError, match="unknown method 'pade'; allowed: auto, eigh, matrix_exp"):
        expm_skew(A, "pade")


@pytest.mark.parametrize("init", ["identity", "torch"])
def test_orthogonal_adapter_weight_equals_torch_parametrization(init):
    """The orthogonal B's weight equals torch's own orthogonal(matrix_exp) parametrization for the same X."""
    from torch.nn.utils.parametrizations import orthogonal

    n = 12
    B = make_backward("orthogonal", n, init=init, generator=torch.Generator().manual_seed(2)).double()
    X = torch.randn(n, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.3
    with torch.no_grad():
        base = B.weight.clone()  # X = 0: W is the base
        B.parametrizations.weight.original.copy_(X)
    ref = orthogonal(torch.nn.Linear(n, n, bias=False).double(), orthogonal_map="matrix_exp", use_trivialization=False)
    with torch.no_grad():
        ref.parametrizations.weight.original.copy_(X)
    assert torch.allclose(B.weight, base @ ref.weight, atol=1e-12)
