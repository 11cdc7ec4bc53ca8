"""The adapters: backward B (new -> old, n x n) and forward F (old -> new, d -> n).

Both backbones are frozen; these small linear maps are the only trained
parameters. Backward kinds are a registry (`BACKWARD_KINDS`): adding a kind is
one builder function and one entry.

- ``orthogonal``: B = exp(P) with P skew-symmetric, no bias: the map of
  ``torch.nn.utils.parametrizations.orthogonal(..., orthogonal_map="matrix_exp")``
  (W = base @ exp(P), P = X.tril(-1) - X.tril(-1)^T, X trained, starting at 0),
  with exp computed by `study.science.skew_expm.expm_skew` (one eigendecomposition; an
  exact gradient 3-4x cheaper than torch's and closer to orthogonal in float32).
  Every angle and distance of the new space is preserved. W = base @ exp(P)
  never leaves the connected component of its init: from B = I only rotations
  (det +1) are reachable. Without a bias it cannot absorb a mean offset between
  the spaces (see `TrialConfig.center`).
- ``affine``: B(x) = W x + b, unconstrained (the lambda = infinity end).
- ``identity``: B(x) = x, nothing trained (FCT keeps the new features as they are).

The truncation rule for d != n (the paper's): whenever a new-side vector
(n-dim: h_new, B(h_new), F(h_old)) is compared with an old feature (d-dim),
both are cut to their first min(d, n) coordinates. `truncate_pair` does it.

Initialisation (paper silent, `TrialConfig.init`): "identity" starts B at I (so
D(W) = 0, orthogonal and admissible for every lambda) and F at the zero-padded
rectangular identity I_{n x d}; "torch" uses nn.Linear's default init (for the
orthogonal kind, a random orthogonal matrix). Both draw from a seeded generator.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from study.science.skew_expm import expm_skew

__all__ = [
    "BACKWARD_KINDS",
    "SkewExp",
    "make_backward",
    "make_forward",
    "backward_weight",
    "orthogonality_deviation",
    "truncate_pair",
    "export_state",
    "load_adapters",
]


def orthogonality_deviation(W: Tensor) -> Tensor:
    """D(W) = ||W^T W - I||_F (Frobenius norm, not squared); differentiable.

    The gradient at D = 0 is 0 (torch's norm backward masks the 0/0).
    """
    eye = torch.eye(W.shape[-1], dtype=W.dtype, device=W.device)
    return torch.linalg.matrix_norm(W.mT @ W - eye)


def truncate_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Cut both [N, *] arrays to their first min(dim a, dim b) columns (the paper's d != n rule)."""
    m = min(a.shape[-1], b.shape[-1])
    return a[..., :m], b[..., :m]


def _init_weight(shape: tuple[int, int], init: str, generator: torch.Generator | None) -> Tensor:
    out_f, in_f = shape
    if init == "identity":
        return torch.eye(out_f, in_f)
    if init == "torch":  # nn.Linear's default: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))
        bound = 1.0 / in_f**0.5
        return (torch.rand(out_f, in_f, generator=generator) * 2 - 1) * bound
    raise ValueError(f"unknown init {init!r}; allowed: 'identity', 'torch'")


class SkewExp(nn.Module):
    """Parametrization W = base @ exp(X.tril(-1) - X.tril(-1)^T) of an orthogonal weight."""

    def __init__(self, base: Tensor) -> None:
        super().__init__()
        self.register_buffer("base", base)

    def forward(self, X: Tensor) -> Tensor:
        lower = X.tril(-1)
        return self.base @ expm_skew(lower - lower.mT)


def _orthogonal(n: int, init: str, generator: torch.Generator | None) -> nn.Module:
    if init == "identity":
        base = torch.eye(n)
    else:  # a random orthogonal start (QR of a seeded Gaussian, signs fixed)
        q, r = torch.linalg.qr(torch.randn(n, n, generator=generator))
        base = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    lin = nn.Linear(n, n, bias=False)
    with torch.no_grad():
        lin.weight.zero_()  # the trained X: W = base @ exp(0) = base at the start
    parametrize.register_parametrization(lin, "weight", SkewExp(base))
    return lin


def _linear(in_f: int, out_f: int, init: str, generator: torch.Generator | None) -> nn.Linear:
    """An affine layer R^in_f -> R^out_f: weight by `_init_weight`, bias 0 ("identity") or nn.Linear's U(+-1/sqrt(in))."""
    lin = nn.Linear(in_f, out_f, bias=True)
    with torch.no_grad():
        lin.weight.copy_(_init_weight((out_f, in_f), init, generator))
        if init == "identity":
            lin.bias.zero_()
        else:
            lin.bias.copy_((torch.rand(out_f, generator=generator) * 2 - 1) / in_f**0.5)
    return lin


def _affine(n: int, init: str, generator: torch.Generator | None) -> nn.Module:
    return _linear(n, n, init, generator)


def _identity(n: int, init: str, generator: torch.Generator | None) -> nn.Module:
    return nn.Identity()


BACKWARD_KINDS: dict[str, Callable[[int, str, torch.Generator | None], nn.Module]] = {
    "orthogonal": _orthogonal,
    "affine": _affine,
    "identity": _identity,
}
"""Backward adapter builders: kind -> f(n, init, generator) -> nn.Module mapping [*, n] -> [*, n]."""


def make_backward(kind: str, n: int, *, init: str = "identity", generator: torch.Generator | None = None) -> nn.Module:
    """Build B of `kind` (a key of BACKWARD_KINDS) acting on n-dim new features."""
    if kind not in BACKWARD_KINDS:
        raise ValueError(f"unknown backward adapter kind {kind!r}; kinds: {', '.join(BACKWARD_KINDS)}")
    return BACKWARD_KINDS[kind](n, init, generator)


def make_forward(d: int, n: int, *, init: str = "identity", generator: torch.Generator | None = None) -> nn.Linear:
    """F: affine R^d -> R^n (one linear layer with bias)."""
    return _linear(d, n, init, generator)


def backward_weight(B: nn.Module, n: int | None = None) -> Tensor:
    """The effective matrix W of B (for the orthogonal kind, exp(P) evaluated once)."""
    if isinstance(B, nn.Identity):
        if n is None:
            raise ValueError("backward_weight(nn.Identity) needs n")
        return torch.eye(n)
    return B.weight


def export_state(B: nn.Module | None, F: nn.Module | None) -> dict[str, Tensor]:
    """Plain CPU tensors of the trained adapters, for torch.save.

    Keys: `B.weight` [n, n], `B.bias` [n] (affine kinds only), `F.weight` [n, d],
    `F.bias` [n]. A missing B (independent, or fct's identity) or F has no keys.
    """
    state: dict[str, Tensor] = {}
    with torch.no_grad():
        if B is not None and not isinstance(B, nn.Identity):
            state["B.weight"] = B.weight.detach().cpu().clone()
            if getattr(B, "bias", None) is not None:
                state["B.bias"] = B.bias.detach().cpu().clone()
        if F is not None:
            state["F.weight"] = F.weight.detach().cpu().clone()
            state["F.bias"] = F.bias.detach().cpu().clone()
    return state


def load_adapters(state: dict[str, Tensor]) -> tuple[nn.Linear | None, nn.Linear | None]:
    """Rebuild (B, F) as frozen plain nn.Linear modules in eval mode from `export_state`'s dict.

    B is None when the state has no `B.weight`: for "fct" that means B is the
    identity (use the new features as they are); for "independent" F is None too.
    Apply as in training: `B(normalize(h_new))`, `F(normalize(h_old))` when the
    trial used `normalize=True`.
    """

    def build(prefix: str) -> nn.Linear | None:
        w = state.get(f"{prefix}.weight")
        if w is None:
            return None
        b = state.get(f"{prefix}.bias")
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        lin.requires_grad_(False)
        return lin.eval()

    return build("B"), build("F")
