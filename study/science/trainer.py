"""A small trainer over cached feature tensors: Adam, epochs, mini-batches, seed.

`Adam` is torch.optim.Adam's update written out (the same arithmetic, in the
same order, as its default CPU path): building any torch.optim optimizer makes
torch import torch._dynamo, ~150 MiB of private memory and ~1.7 s in every
fresh process, which each Ray trial worker would pay for nothing.

No DataLoader: the features already sit on the device, and each epoch indexes
them with a seeded permutation. The batch order depends only on `seed`, so on
the CPU a run is bit-for-bit repeatable for a given seed and thread count.
Parametrized modules (the orthogonal B) are evaluated once per step inside
`torch.nn.utils.parametrize.cached()`, so exp(P) is computed once per step
however many times the loss calls B.

A non-finite loss stops training with `DivergedError("diverged at epoch k: ...")`.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable

import torch
from torch import Tensor
from torch.nn.utils import parametrize

from study.science.config import LR_SCHEDULES

__all__ = ["Adam", "DivergedError", "resolve_device", "train"]


class DivergedError(RuntimeError):
    """Raised when a training loss is NaN or infinite; `.epoch` is 1-based."""

    def __init__(self, epoch: int, detail: str) -> None:
        self.epoch = epoch
        super().__init__(f"diverged at epoch {epoch}: {detail}")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> CUDA if available else CPU; "cuda" without CUDA falls back to CPU with a warning."""
    device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        warnings.warn("device 'cuda' asked for but CUDA is not available: using the CPU", stacklevel=2)
        return torch.device("cpu")
    return torch.device(device)


class Adam:
    """Adam with L2 weight decay: torch.optim.Adam(amsgrad=False, maximize=False, foreach=False)'s step."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        self.params = list(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.steps = [0] * len(self.params)   # per parameter, as torch counts them

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        for i, (p, m, v) in enumerate(zip(self.params, self.exp_avg, self.exp_avg_sq)):
            if p.grad is None:
                continue
            self.steps[i] += 1
            step = float(self.steps[i])
            grad = p.grad if self.weight_decay == 0 else p.grad.add(p, alpha=self.weight_decay)
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step_size = self.lr / (1 - beta1**step)
            denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(self.eps)
            p.addcdiv_(m, denom, value=-step_size)


def train(
    params: Iterable[torch.nn.Parameter],
    batch_loss: Callable[[Tensor], dict[str, Tensor]],
    n_samples: int,
    *,
    epochs: int,
    batch_size: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    num_threads: int | None = None,
    steps_per_epoch: int | None = None,
    lr_schedule: str = "constant",
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Minimise `batch_loss(idx)["loss/total"]` with Adam over `epochs` passes.

    With `steps_per_epoch`, an epoch is the first that many batches of its permutation
    (for train splits of millions of rows); None: a full pass.

    batch_loss gets a LongTensor of sample indices on `device` and returns a dict
    of scalar tensors including "loss/total"; every key is averaged over the
    epoch's samples (weighted by batch size). After each epoch
    `on_epoch(epoch, means)` is called (epoch is 1-based; `means` also holds
    "epoch") and may add keys to `means`. Returns the list of per-epoch dicts.
    `num_threads`, if given, calls torch.set_num_threads (process-wide). `lr_schedule`
    (`LR_SCHEDULES`): "constant" keeps `lr`; "cosine" gives step t of T the rate
    lr * (1 + cos(pi t / T)) / 2, from `lr` down to ~0 at the last step.
    """
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"`lr_schedule` = {lr_schedule!r} is not allowed; allowed values: {', '.join(LR_SCHEDULES)}")
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    device = torch.device(device)
    params = [p for p in params if p.requires_grad]
    opt = Adam(params, lr=lr, weight_decay=weight_decay) if params else None
    gen = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    starts = range(0, n_samples, batch_size)[:steps_per_epoch]  # the batches of every epoch
    total_steps, done = epochs * len(starts), 0
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(n_samples, generator=gen).to(device)
        sums: dict[str, Tensor] = {}
        seen = 0
        for step, start in enumerate(starts):
            if opt is not None and lr_schedule == "cosine":
                opt.lr = lr * 0.5 * (1.0 + math.cos(math.pi * done / total_steps))
            done += 1
            idx = perm[start : start + batch_size]
            seen += len(idx)
            with parametrize.cached():
                losses = batch_loss(idx)
                total = losses["loss/total"]
                if not bool(torch.isfinite(total)):
                    raise DivergedError(epoch, f"loss/total = {total.item()} at step {step + 1} of the epoch")
                if opt is not None and total.requires_grad:
                    opt.zero_grad()
                    total.backward()
                    opt.step()
            for k, v in losses.items():
                v = v.detach() * len(idx)
                sums[k] = sums[k] + v if k in sums else v
        means = {k: float(v) / seen for k, v in sums.items()}
        bad = [k for k, v in means.items() if not math.isfinite(v)]
        if bad:
            raise DivergedError(epoch, ", ".join(f"{k} = {means[k]}" for k in bad))
        means["epoch"] = float(epoch)
        if on_epoch is not None:
            on_epoch(epoch, means)
        history.append(means)
    if opt is not None:
        opt.zero_grad()  # gradients are not needed after training: free them before evaluation
    return history
