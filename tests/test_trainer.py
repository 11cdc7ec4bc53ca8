"""The trainer: epoch means, determinism, divergence, one exp(P) per step."""
from __future__ import annotations

from types import SimpleNamespace as NS

import math
import numpy as np
import pytest
import torch

from study.science.adapters import make_backward
from study.science.trainer import DivergedError, resolve_device, train
from study.science.trial import TrialData, run_trial

torch.set_num_threads(1)


def _tiny(seed=0, N=96, d=6, n=8):
    rng = np.random.default_rng(seed)
    y = np.arange(2 * N) % 4
    old = rng.normal(size=(4, d))[y] + rng.normal(size=(2 * N, d))
    new = np.concatenate([old, old[:, : n - d] ** 2], axis=1) + 0.1 * rng.normal(size=(2 * N, n))
    part = lambda a, s: NS(x=a[s].astype(np.float32), y=y[s])  # noqa: E731
    tr, ev = slice(0, N), slice(N, 2 * N)
    zs = NS(x=rng.normal(size=(40, n)).astype(np.float32), y=np.arange(40) % 4)
    return TrialData(part(old, tr), part(new, tr), part(old, ev), part(new, ev), {"z": zs})


FAST = dict(epochs=4, batch_size=32, lr=1e-2, num_threads=1, backfill_points=3, eval_every=2)


def test_epoch_means_are_sample_weighted_and_reported_each_epoch():
    p = torch.nn.Parameter(torch.zeros(()))
    seen = []

    def loss(idx):  # mean index of the batch: the epoch mean must be the mean of 0..N-1 whatever the batching
        return {"loss/total": idx.float().mean() + 0 * p, "loss/other": idx.float().max()}

    hist = train([p], loss, 10, epochs=3, batch_size=4, on_epoch=lambda e, m: seen.append((e, dict(m))))
    assert [e for e, _ in seen] == [1, 2, 3]
    assert all(h["loss/total"] == pytest.approx(4.5) for h in hist)
    assert all(h["epoch"] == float(i + 1) for i, h in enumerate(hist))


def test_nan_loss_raises_diverged_naming_the_epoch():
    p = torch.nn.Parameter(torch.ones(()))
    calls = {"n": 0}

    def loss(idx):
        calls["n"] += 1
        bad = calls["n"] > 2 * 3  # 3 batches per epoch: NaN from epoch 3 on
        return {"loss/total": p * (float("nan") if bad else 1.0)}

    with pytest.raises(DivergedError, match=r"^diverged at epoch 3: loss/total = nan") as info:
        train([p], loss, 9, epochs=5, batch_size=3)
    assert info.value.epoch == 3


def test_run_trial_diverges_with_a_huge_learning_rate():
    cfg = dict(FAST, method="affine", lr=1e30, normalize=False)
    with pytest.raises(DivergedError, match=r"diverged at epoch \d+"):
        run_trial(cfg, _tiny())


def test_same_seed_gives_identical_results_other_seed_does_not():
    data = _tiny()
    cfg = dict(FAST, method="lambda", lam=0.5, init="torch")
    a, b = run_trial(dict(cfg, seed=1), data), run_trial(dict(cfg, seed=1), data)
    c = run_trial(dict(cfg, seed=2), data)
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith("time/")}  # noqa: E731
    np.testing.assert_equal(strip(a.metrics), strip(b.metrics))
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert a.curves == b.curves
    assert not torch.equal(a.state["B.weight"], c.state["B.weight"])


def test_orthogonal_matrix_exponential_once_per_step(monkeypatch):
    import study.science.adapters

    calls = {"n": 0}
    real = study.science.adapters.expm_skew

    def counting(A):
        calls["n"] += 1
        return real(A)

    monkeypatch.setattr(study.science.adapters, "expm_skew", counting)
    B = make_backward("orthogonal", 5)
    x = torch.randn(20, 5)

    def loss(idx):  # B called three times per step
        out = B(x[idx])
        return {"loss/total": (out - x[idx]).pow(2).sum() + B(x[idx]).sum() * 0 + B(x[idx]).mean() * 0}

    calls["n"] = 0
    train(B.parameters(), loss, 20, epochs=2, batch_size=5)
    assert calls["n"] == 2 * 4


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="using the CPU"):
            assert resolve_device("cuda") == torch.device("cpu")


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_adam_matches_torch_optim_adam_bit_for_bit(weight_decay):
    """study.science.trainer.Adam against torch.optim.Adam (its CPU single-tensor path) on the same gradients."""
    from study.science.trainer import Adam

    g = torch.Generator().manual_seed(0)
    init = [torch.randn(7, 5, generator=g), torch.randn(5, generator=g)]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    opt_ours = Adam(ours, lr=3e-2, weight_decay=weight_decay)
    opt_ref = torch.optim.Adam(ref, lr=3e-2, weight_decay=weight_decay, foreach=False)
    x = torch.randn(16, 5, generator=g)
    for step in range(25):
        for params, opt in ((ours, opt_ours), (ref, opt_ref)):
            opt.zero_grad()
            loss = ((x @ params[0].T).tanh().sum(1) + x @ params[1]).pow(2).mean()
            if step == 3:  # a parameter without a gradient is left alone by both
                loss = (x @ params[1]).pow(2).mean()
            loss.backward()
            opt.step()
        for a, b in zip(ours, ref):
            assert torch.equal(a, b), (step, (a - b).abs().max())


def test_training_does_not_import_torch_dynamo():
    """torch.optim would import torch._dynamo (~150 MiB per Ray worker): a trial must not."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from types import SimpleNamespace as NS\n"
        "from study.science.trial import TrialData, run_trial\n"
        "r = np.random.default_rng(0); y = np.arange(40) % 4\n"
        "f = lambda d: NS(x=r.normal(size=(40, d)).astype(np.float32), y=y)\n"
        "run_trial({'method': 'orthogonal', 'epochs': 1, 'batch_size': 20, 'backfill_points': 3},"
        " TrialData(f(6), f(6), f(6), f(6)))\n"
        "run_trial({'method': 'lambda', 'lam': 1, 'epochs': 1, 'batch_size': 20, 'backfill_points': 3},"
        " TrialData(f(6), f(8), f(6), f(8)))\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_steps_per_epoch_takes_the_first_batches_of_each_permutation():
    """An epoch of k steps sees exactly the first k batches of the seeded permutation a full epoch would."""
    seen: list[list[int]] = []

    def loss(idx):
        seen.append(idx.tolist())
        return {"loss/total": torch.tensor(float(sum(seen[-1])))}

    train([], loss, 100, epochs=2, batch_size=16, seed=3, steps_per_epoch=2)
    short = seen[:]
    seen.clear()
    full = train([], loss, 100, epochs=2, batch_size=16, seed=3)
    assert short == seen[0:2] + seen[7:9]  # 7 batches per full epoch
    assert len(full) == 2
    seen.clear()
    hist = train([], loss, 100, epochs=1, batch_size=16, seed=3, steps_per_epoch=2)
    assert hist[0]["loss/total"] == pytest.approx((sum(seen[0]) * 16 + sum(seen[1]) * 16) / 32)


def test_cosine_schedule_is_torch_adam_at_the_closed_form_rate():
    """lr_schedule="cosine": step t of T uses lr (1 + cos(pi t / T)) / 2 (reference: torch.optim.Adam with
    that rate set before each step); "constant" keeps lr; an unknown schedule is refused."""
    g = torch.Generator().manual_seed(0)
    x, init = torch.randn(12, 4, generator=g), torch.randn(3, 4, generator=g)
    ours = torch.nn.Parameter(init.clone())
    ref = torch.nn.Parameter(init.clone())
    objective = lambda w: (x @ w.T).sin().pow(2).mean()  # noqa: E731
    train([ours], lambda idx: {"loss/total": objective(ours)}, 12, epochs=4, batch_size=3, lr=0.05,
          lr_schedule="cosine")
    opt = torch.optim.Adam([ref], lr=0.05, foreach=False)
    total = 16  # 4 epochs of 4 batches
    for t in range(total):
        opt.param_groups[0]["lr"] = 0.05 * 0.5 * (1 + math.cos(math.pi * t / total))
        opt.zero_grad()
        objective(ref).backward()
        opt.step()
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"`lr_schedule` = 'step' is not allowed; allowed values: constant, cosine"):
        train([ours], lambda idx: {"loss/total": objective(ours)}, 12, epochs=1, batch_size=3, lr_schedule="step")
