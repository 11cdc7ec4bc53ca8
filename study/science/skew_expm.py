"""exp(A) of a real skew-symmetric matrix, with an exact gradient 3-4x cheaper than torch's.

    from study.science.skew_expm import expm_skew
    Q = expm_skew(X.tril(-1) - X.tril(-1).mT)     # orthogonal, differentiable in X

Why: the orthogonal adapter B = exp(P) is the one expensive step of an
orthogonal trial. ``torch.linalg.matrix_exp``'s backward evaluates exp of a
2n x 2n block matrix (about 8x the forward); at n = 1280 a forward + backward
costs ~3.3 s on one CPU core, against ~0.04 s for the rest of an affine step.

How: a real skew-symmetric A is normal with imaginary eigenvalues, so
H = iA is Hermitian: H = V diag(w) V^H with V unitary, A = V diag(-i w) V^H and

    exp(A)   = Re( V diag(e^{-i w}) V^H )
    grad_A   = Re( V ((V^H G V) o Phi) V^H ),  G = dLoss/dexp(A),
    Phi_jk   = (e^{mu_j} - e^{mu_k}) / (mu_j - mu_k),  mu = i w (the eigenvalues of A^T)
             = e^{i (w_j + w_k) / 2} sinc((w_j - w_k) / 2)

(the Daleckii-Krein formula for the Frechet derivative of exp at A^T, which
is the adjoint of the one at A). The sinc form has no division, so repeated
eigenvalues (A = 0 at initialisation) need no special case, and a choice of
basis inside an eigenspace does not change the result. One ``eigh`` per step is
shared by forward and backward. V is unitary to working precision, so the
result is also closer to orthogonal than the Taylor/Pade route in float32
(see ``tests/test_skew_expm.py`` and ``benchmarks/bench_trial.py``).

On a GPU the trade should go the other way (matrix products are cheap there,
eigensolvers latency-bound), so ``method="auto"`` keeps torch's ``matrix_exp``
for tensors off the CPU. That choice is not measured yet: ``benchmarks/gpu_check.py``
times both methods on the card it runs on.

Pure torch; float64 inputs work in complex128, everything else in complex64.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["expm_skew", "METHODS"]

METHODS = ("auto", "eigh", "matrix_exp")


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _real_of_product(X: Tensor, V: Tensor) -> Tensor:
    """Re(X V^H) with two real matmuls."""
    return X.real @ V.real.mT + X.imag @ V.imag.mT


class _ExpmSkew(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A: Tensor) -> Tensor:  # type: ignore[override]
        work = A.to(_complex_dtype(A.dtype)) * 1j          # Hermitian when A is skew-symmetric
        w, V = torch.linalg.eigh(work)
        E = _real_of_product(V * torch.polar(torch.ones_like(w), -w), V)
        ctx.save_for_backward(w, V)
        ctx.out_dtype = A.dtype
        return E.to(A.dtype)

    @staticmethod
    def backward(ctx, G: Tensor) -> Tensor:  # type: ignore[override]
        w, V = ctx.saved_tensors
        M = V.mH @ G.to(V.dtype) @ V
        phi = torch.polar(torch.sinc((w[:, None] - w[None, :]) / (2 * math.pi)),
                          (w[:, None] + w[None, :]) / 2)
        return _real_of_product(V @ (M * phi), V).to(ctx.out_dtype)


def expm_skew(A: Tensor, method: str = "auto") -> Tensor:
    """exp(A) for a real skew-symmetric square matrix A (A^T = -A), differentiable.

    A must be skew-symmetric (build it as ``X - X.mT``): the "eigh" method reads
    only its lower triangle. The result is orthogonal with det +1. `method`:
    "eigh" (this module's), "matrix_exp" (torch's), "auto" (eigh on the CPU,
    matrix_exp on other devices). Raises ``ValueError`` for a non-square or
    non-real input or an unknown method.
    """
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"expm_skew needs a square matrix, got shape {tuple(A.shape)}")
    if A.is_complex() or not A.is_floating_point():
        raise ValueError(f"expm_skew needs a real floating-point matrix, got {A.dtype}")
    if method not in METHODS:
        raise ValueError(f"expm_skew: unknown method {method!r}; allowed: {', '.join(METHODS)}")
    if method == "matrix_exp" or (method == "auto" and A.device.type != "cpu"):
        return torch.linalg.matrix_exp(A)
    if A.dtype in (torch.float16, torch.bfloat16):
        return _ExpmSkew.apply(A.float()).to(A.dtype)
    return _ExpmSkew.apply(A)
