"""Losses on frozen features h_old = phi_old(x) (d-dim) and h_new = phi_new(x) (n-dim).

The paper's objective ("compat"):

    L_B = ||B(h_new) - h_old||^2
    L_F = ||F(h_old) - B(h_new)||^2          (F targets the back-aligned new space)
    L_C = Lcon(F(h_old), B(h_new)) + Lcon(F(h_old), h_old)
    L   = w1 L_F + w2 L_B + w3 L_C + reg_weight * L_reg(W of B)

Squared norms are summed over coordinates and averaged over the batch. When
d != n, a new-side vector and an old feature are both cut to their first
min(d, n) coordinates before they meet (in L_B and the second Lcon term). All
terms are optimised jointly: L_F's gradient reaches B too (nothing is detached).

Lcon is a multi-positive contrastive loss (StableRep style): for anchor i,
p_i = softmax_j(cos(a_i, c_j) / T) over every candidate j of the batch; the
target q_i puts mass 1/P_i on each of the P_i candidates of i's class (the same
image's other-model vector included; anchors and candidates are different
vectors, so nothing is excluded); the loss is the mean over anchors of the
cross-entropy H(q_i, p_i). Anchors are the first argument only (one direction).

FCT's objective ("fct"): L = ||F(h_old) - h_new||^2 (reported as loss/forward).

`LOSSES` is the registry used by `study.science.config.METHODS`. Each entry returns a
dict with every key of `study.science.keys.LOSS_KEYS` (`loss/total` is the one optimised).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from study.science.adapters import truncate_pair

__all__ = ["squared_error", "multi_positive_contrastive", "compat_loss", "fct_loss", "LOSSES"]


def squared_error(a: Tensor, b: Tensor) -> Tensor:
    """Mean over the batch of ||a_i - b_i||^2 (sum over coordinates)."""
    return (a - b).pow(2).sum(dim=-1).mean()


def multi_positive_contrastive(
    anchors: Tensor,
    candidates: Tensor,
    anchor_labels: Tensor,
    candidate_labels: Tensor | None = None,
    temperature: float = 0.1,
) -> Tensor:
    """StableRep-style multi-positive contrastive loss (see the module docstring).

    anchors [N, D] and candidates [M, D] are compared by cosine similarity;
    candidate_labels default to anchor_labels. Anchors with no candidate of
    their class are left out of the mean (0 if none has one).
    """
    if candidate_labels is None:
        candidate_labels = anchor_labels
    a = Fn.normalize(anchors, dim=-1)
    c = Fn.normalize(candidates, dim=-1)
    logits = a @ c.mT / temperature
    pos = (anchor_labels[:, None] == candidate_labels[None, :]).to(logits.dtype)
    n_pos = pos.sum(dim=1)
    has = n_pos > 0
    log_p = torch.log_softmax(logits, dim=1)
    per_anchor = -(pos * log_p).sum(dim=1) / n_pos.clamp_min(1)
    if not bool(has.all()):
        if not bool(has.any()):
            return logits.sum() * 0
        return per_anchor[has].mean()
    return per_anchor.mean()


def compat_loss(
    h_old: Tensor,
    h_new: Tensor,
    y: Tensor,
    B: nn.Module,
    F: nn.Module,
    regularizer: Callable[[Tensor], Tensor] | None,
    cfg,
) -> dict[str, Tensor]:
    """The paper's total loss for one batch; `cfg` gives w1, w2, w3, reg_weight, temperature."""
    b_new = B(h_new)  # [N, n]
    f_old = F(h_old)  # [N, n]
    b_t, old_t = truncate_pair(b_new, h_old)
    l_b = squared_error(b_t, old_t)
    l_f = squared_error(f_old, b_new)
    f_t, old_t2 = truncate_pair(f_old, h_old)
    l_c = multi_positive_contrastive(f_old, b_new, y, y, cfg.temperature) + multi_positive_contrastive(
        f_t, old_t2, y, y, cfg.temperature
    )
    l_reg = regularizer(B.weight) if regularizer is not None else l_b.new_zeros(())
    total = cfg.w1 * l_f + cfg.w2 * l_b + cfg.w3 * l_c + cfg.reg_weight * l_reg
    return {
        "loss/total": total,
        "loss/forward": l_f,
        "loss/backward": l_b,
        "loss/contrastive": l_c,
        "loss/reg": l_reg,
    }


def fct_loss(
    h_old: Tensor,
    h_new: Tensor,
    y: Tensor,
    B: nn.Module | None,
    F: nn.Module,
    regularizer: Callable[[Tensor], Tensor] | None,
    cfg,
) -> dict[str, Tensor]:
    """FCT baseline: F trained with MSE to the raw new features; B (identity) unused."""
    l_f = squared_error(F(h_old), h_new)
    zero = l_f.new_zeros(())
    return {
        "loss/total": l_f,
        "loss/forward": l_f,
        "loss/backward": zero,
        "loss/contrastive": zero,
        "loss/reg": zero,
    }


LOSSES: dict[str, Callable[..., dict[str, Tensor]]] = {
    "compat": compat_loss,
    "fct": fct_loss,
}
"""name -> loss(h_old, h_new, y, B, F, regularizer, cfg) -> dict of LOSS_KEYS tensors."""
