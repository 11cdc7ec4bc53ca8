"""Adapters: construction, truncation, state round trip, and what they do on synthetic pairs.

The synthetic pairs have a known answer: h_new = R h_old (+ noise) with R a
rotation, so the orthogonal B should recover R^T and leave the new space's own
retrieval untouched; h_new = R diag(s) h_old (anisotropic) has an affine answer
far from orthogonal, so lambda-orthogonal training must land between the two.
"""
from __future__ import annotations

from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn

from study.science import losses, regularizers
from study.science.adapters import (
    BACKWARD_KINDS,
    export_state,
    load_adapters,
    make_backward,
    make_forward,
    orthogonality_deviation,
    truncate_pair,
)
from study.science.config import METHODS
from study.science.trial import TrialData, run_trial

torch.set_num_threads(1)


# ---------------------------------------------------------------------------
# construction
@pytest.mark.parametrize("kind", sorted(BACKWARD_KINDS))
@pytest.mark.parametrize("init", ["identity", "torch"])
def test_every_backward_kind_maps_n_to_n(kind, init):
    B = make_backward(kind, 7, init=init, generator=torch.Generator().manual_seed(0))
    assert B(torch.randn(5, 7)).shape == (5, 7)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_names_registered_parts(name):
    spec = METHODS[name]
    assert spec.backward is None or spec.backward in BACKWARD_KINDS
    assert spec.regularizer is None or spec.regularizer in regularizers.REGULARIZERS
    assert spec.loss is None or spec.loss in losses.LOSSES
    assert spec.regularizer is None or spec.backward == "affine"  # regularizers act on a free W


@pytest.mark.parametrize("init", ["identity", "torch"])
def test_orthogonal_kind_stays_orthogonal_and_has_no_bias(init):
    B = make_backward("orthogonal", 9, init=init, generator=torch.Generator().manual_seed(1))
    assert getattr(B, "bias", None) is None
    if init == "identity":
        assert torch.allclose(B.weight, torch.eye(9))
    with torch.no_grad():  # any value of the free parameter still gives an orthogonal W
        for p in B.parameters():
            p.add_(torch.randn_like(p))
    W = B.weight.detach()
    assert float(orthogonality_deviation(W.double())) < 1e-5
    x = torch.randn(4, 9)
    assert torch.allclose(B(x).norm(dim=1), x.norm(dim=1), atol=1e-5)  # distances preserved


def test_identity_inits():
    A = make_backward("affine", 4)
    assert torch.equal(A.weight, torch.eye(4)) and torch.equal(A.bias, torch.zeros(4))
    F_up = make_forward(3, 5)  # d < n: zero-padded
    assert torch.equal(F_up(torch.ones(1, 3)), torch.tensor([[1.0, 1, 1, 0, 0]]))
    F_down = make_forward(5, 3)  # d > n: first n coordinates
    assert torch.equal(F_down(torch.arange(5.0)[None]), torch.tensor([[0.0, 1, 2]]))


def test_torch_init_is_seeded():
    a = make_forward(6, 4, init="torch", generator=torch.Generator().manual_seed(3))
    b = make_forward(6, 4, init="torch", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_truncate_pair_cuts_to_the_smaller_dim():
    a, b = truncate_pair(torch.randn(3, 8), torch.randn(3, 5))
    assert a.shape == b.shape == (3, 5)
    a, b = truncate_pair(np.zeros((2, 4)), np.zeros((2, 6)))
    assert a.shape == b.shape == (2, 4)


@pytest.mark.parametrize("kind", ["orthogonal", "affine"])
def test_state_round_trip(kind, tmp_path):
    g = torch.Generator().manual_seed(0)
    B, F = make_backward(kind, 6, init="torch", generator=g), make_forward(4, 6, init="torch", generator=g)
    torch.save(export_state(B, F), tmp_path / "adapters.pt")
    B2, F2 = load_adapters(torch.load(tmp_path / "adapters.pt"))
    x, z = torch.randn(3, 6), torch.randn(3, 4)
    assert torch.allclose(B2(x), B(x), atol=1e-6) and torch.allclose(F2(z), F(z))
    assert not any(p.requires_grad for p in B2.parameters())
    assert load_adapters({}) == (None, None)


# ---------------------------------------------------------------------------
# synthetic pairs with a known answer
DIM = 16


def _pair(scales=None, noise=0.02, N=384, seed=0):
    """Class clusters h_old in R^16; h_new = R diag(scales) h_old + noise, R a rotation (det +1).

    Returns (TrialData, R) with a train and an eval split, and a held-out
    zero-shot set of other classes seen only through the new model.
    """
    rng = np.random.default_rng(seed)
    y = np.arange(2 * N) % 8
    old = rng.normal(size=(8, DIM))[y] + rng.normal(size=(2 * N, DIM))
    R, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
    R[:, 0] *= np.sign(np.linalg.det(R))  # a rotation: reachable from B = I through exp(P)
    M = R if scales is None else R @ np.diag(scales)
    new = old @ M.T + noise * rng.normal(size=old.shape)
    zy = np.arange(N) % 8
    z = (rng.normal(size=(8, DIM))[zy] + 1.5 * rng.normal(size=(N, DIM))) @ M.T
    part = lambda a, s: NS(x=a[s].astype(np.float32), y=y[s])  # noqa: E731
    tr, ev = slice(0, N), slice(N, 2 * N)
    data = TrialData(part(old, tr), part(new, tr), part(old, ev), part(new, ev),
                     {"held": NS(x=z.astype(np.float32), y=zy)})
    return data, R


# L_B alone: its exact minimiser on the rotation pair is R^T; lr 3e-2 converges in a few hundred steps.
FIT_ONLY = dict(w1=0.0, w2=1.0, w3=0.0, epochs=50, batch_size=64, lr=3e-2, num_threads=1,
                eval_every=1000, backfill_points=2)


def _held_out_fit(result, data) -> float:
    """Mean ||B(h_new) - h_old||^2 on the eval split (unit-normalised features, as trained)."""
    B, _ = load_adapters(result.state)
    xo = Fn.normalize(torch.as_tensor(data.old_eval.x), dim=1)
    xn = Fn.normalize(torch.as_tensor(data.new_eval.x), dim=1)
    with torch.no_grad():
        return float(((B(xn) - xo) ** 2).sum(1).mean())


def _nearest(x: np.ndarray) -> np.ndarray:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    return s.argmax(1)


@pytest.fixture(scope="module")
def rotation():
    data, R = _pair()
    return data, R, run_trial(dict(FIT_ONLY, method="orthogonal", epochs=100), data)


@pytest.fixture(scope="module")
def anisotropic():
    data, _ = _pair(scales=np.geomspace(0.5, 2.0, DIM))
    runs = {m: run_trial(dict(FIT_ONLY, method=m, lam=3.0), data) for m in ("orthogonal", "affine", "lambda")}
    return data, runs


def test_orthogonal_recovers_the_rotation(rotation):
    data, R, result = rotation
    W = result.state["B.weight"].numpy()
    assert np.linalg.norm(W - R.T) / np.linalg.norm(R) < 0.03  # 0.013 here, 0.003-0.013 over seeds 0-5
    assert result.metrics["orth/B"] < 1e-4
    assert result.metrics["B/old/top1"] > result.metrics["new/old/top1"] + 50  # B/old works, raw new/old does not


def test_orthogonal_zero_shot_is_exactly_zero(rotation, anisotropic):
    _, _, result = rotation
    assert result.metrics["zs/held"] == 0.0
    assert result.metrics["zs/mean"] == 0.0
    assert result.metrics["B/B/top1"] == result.metrics["new/new/top1"]
    assert anisotropic[1]["orthogonal"].metrics["zs/held"] == 0.0


def test_affine_changes_the_new_space_and_orthogonal_never_does(anisotropic):
    data, runs = anisotropic
    z = data.zero_shot["held"].x
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    before = _nearest(z)
    moved = {}
    for m in ("orthogonal", "affine"):
        B, _ = load_adapters(runs[m].state)
        with torch.no_grad():
            after = _nearest(B(torch.as_tensor(zn)).numpy())
        moved[m] = float(np.mean(after != before))
    assert moved["orthogonal"] == 0.0
    assert moved["affine"] > 0.1
    assert runs["affine"].metrics["zs/held"] != 0.0


def test_lambda_lands_near_lambda_between_orthogonal_and_affine(anisotropic):
    data, runs = anisotropic
    dev = {m: r.metrics["orth/B"] for m, r in runs.items()}
    fit = {m: _held_out_fit(r, data) for m, r in runs.items()}
    assert abs(dev["lambda"] - 3.0) < 0.5, dev  # alpha = 30 settles a few tenths below lambda
    assert dev["orthogonal"] < 1e-4 < dev["lambda"] < dev["affine"] - 1.0, dev
    assert fit["orthogonal"] > fit["lambda"] > fit["affine"], fit


def test_lambda_with_the_full_loss_also_settles_near_lambda(anisotropic):
    data, _ = anisotropic
    result = run_trial(dict(FIT_ONLY, method="lambda", lam=2.0, w1=1.0, w3=1.0), data)
    assert abs(result.metrics["orth/B"] - 2.0) < 0.5
