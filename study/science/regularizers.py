"""Regularizers on the weight W of the backward adapter B.

    D(W)     = ||W^T W - I||_F                                  (Frobenius, not squared)
    lambda   : sigmoid(alpha (D - lam)) * D                      (the paper's L_lam)
    SO       : D(W)          (default; = the lambda = 0, alpha -> inf limit of L_lam)
               ||W^T W - I||_F^2 with squared=True (Bansal et al. 2018's form)
    SRIP     : sigma_max(W^T W - I) by power iteration (Bansal et al. 2018)

`REGULARIZERS` maps a name (used by `study.science.config.METHODS`) to a factory
`f(config) -> callable(W) -> scalar tensor`; a factory may keep state between
calls (SRIP keeps its power-iteration vector, as torch's spectral_norm does).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from study.science.adapters import orthogonality_deviation

__all__ = [
    "orthogonality_deviation",
    "lambda_orthogonality",
    "soft_orthogonality",
    "srip",
    "REGULARIZERS",
    "build_regularizer",
]


def lambda_orthogonality(W: Tensor, lam: float, alpha: float) -> Tensor:
    """L_lam(W) = sigmoid(alpha * (D(W) - lam)) * D(W), D(W) = ||W^T W - I||_F.

    Near 0 while D is well below lam, about D above it: training settles with
    D(W) close to lam. lam = inf gives 0 (affine); lam = 0 gives soft orthogonality
    scaled by a factor in [1/2, 1). The sigmoid's argument is floored at -40, so
    far below lam the value is 4e-18 * D instead of something smaller: float32
    denormals there slow CPU matmuls by two orders of magnitude.
    """
    D = orthogonality_deviation(W)
    if math.isinf(lam):  # lambda = infinity: affine, no penalty at all
        return D * 0.0
    # Floor the gate's argument at -40 (gate >= 4e-18, ~0 in any loss). Unfloored, a gate passing through
    # float32's denormal range (argument ~ -88) fills the backward matmuls with denormals: one such step
    # took 24 s instead of 0.2 s at n = 1280 on the CPU.
    return torch.sigmoid((alpha * (D - lam)).clamp(min=_GATE_FLOOR)) * D


_GATE_FLOOR = -40.0


def soft_orthogonality(W: Tensor, squared: bool = False) -> Tensor:
    """Soft orthogonality: D(W) = ||W^T W - I||_F, or its square with `squared=True`.

    The default (not squared) is the form the paper's lambda sweep reaches at
    lambda = 0 (sigmoid(alpha D) -> 1 as alpha grows), on the same scale as
    L_lam, so SO and lambda methods share `reg_weight`. `squared=True` is the
    form of Bansal et al. ("Can we gain more from orthogonality regularizations").
    """
    D = orthogonality_deviation(W)
    return D * D if squared else D


def _power_iteration(W: Tensor, v: Tensor, n_iter: int) -> Tensor:
    """Unit vector after `n_iter` steps of v <- M v / ||M v||, M = W^T W - I (no gradient)."""
    with torch.no_grad():
        Wd = W.detach()
        v = v / v.norm().clamp_min(1e-12)
        for _ in range(n_iter):
            u = Wd.mT @ (Wd @ v) - v
            norm = u.norm()
            if norm == 0:  # M v = 0: v is in M's null space; sigma = ||M v|| = 0 is exact only if M = 0
                break
            v = u / norm
    return v


def srip(W: Tensor, n_iter: int = 10, v: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Spectral norm of M = W^T W - I by power iteration (SRIP).

    M is symmetric, so its spectral norm is its largest |eigenvalue|. The
    iterations run without gradient on matrix-vector products (M is never
    formed); the returned value ||M v|| with the final unit v held constant has
    the gradient of sigma_max at the converged v (the spectral_norm trick). `v`
    is the start vector (e.g. the previous call's), else a Gaussian drawn from
    `generator` (seed it for reproducible values).
    """
    if v is None:
        v = torch.randn(W.shape[-1], generator=generator, dtype=torch.float64).to(dtype=W.dtype, device=W.device)
    v = _power_iteration(W, v, n_iter)
    return (W.mT @ (W @ v) - v).norm()


class _SRIP:
    """SRIP with its power-iteration vector kept across calls (warm start), seeded."""

    def __init__(self, n_iter: int, seed: int) -> None:
        self.n_iter = n_iter
        self.generator = torch.Generator().manual_seed(seed)
        self.v: Tensor | None = None

    def __call__(self, W: Tensor) -> Tensor:
        if self.v is None or self.v.shape[0] != W.shape[-1]:
            self.v = torch.randn(W.shape[-1], generator=self.generator, dtype=torch.float64).to(W.dtype)
        self.v = _power_iteration(W, self.v.to(device=W.device, dtype=W.dtype), self.n_iter)
        return (W.mT @ (W @ self.v) - self.v).norm()


REGULARIZERS: dict[str, Callable[..., Callable[[Tensor], Tensor]]] = {
    "lambda": lambda cfg: (lambda W: lambda_orthogonality(W, float(cfg.lam), cfg.alpha)),
    "soft_orthogonality": lambda cfg: soft_orthogonality,
    "srip": lambda cfg: _SRIP(cfg.srip_iters, cfg.seed),
}
"""name -> factory(TrialConfig) -> regularizer(W) -> scalar tensor."""


def build_regularizer(name: str | None, config) -> Callable[[Tensor], Tensor] | None:
    """The regularizer for `name` (None -> None) configured from `config`."""
    if name is None:
        return None
    if name not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {name!r}; known: {', '.join(REGULARIZERS)}")
    return REGULARIZERS[name](config)
