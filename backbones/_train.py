"""Class-extension backbones trained by this project: recipe -> deterministic checkpoint.

A trained model is a timm trunk (num_classes=0, `in_chans` from the recipe)
followed by a Linear embedding; a classifier head is used during training
only and saved apart. Checkpoints are plain dicts written with torch.save
and read back with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import contextlib
import io
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn as nn
from filelock import FileLock
from tqdm.auto import tqdm

from ._cache import atomic_write_bytes, content_key
from ._datasets import load_dataset
from ._registry import TrainCfg
from ._transforms import Preprocess
from ._weights import state_dict_digest

TRAINER_VERSION = 1  # bump when training code changes what a recipe produces


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or its tensors do not match its digest."""


def train_digest(cfg: TrainCfg) -> str:
    """Short hex digest of the recipe (and trainer version): the checkpoint's cache key."""
    return content_key({"trainer_version": TRAINER_VERSION, **asdict(cfg)})[:16]


def train_preprocess(cfg: TrainCfg) -> Preprocess:
    """The preprocessing used in training, and so for extraction too."""
    return Preprocess(cfg.image_size, 1.0, "bilinear", (0.5,) * cfg.in_chans, (0.5,) * cfg.in_chans)


class EmbeddingNet(nn.Module):
    """timm trunk (pooled features) -> Linear embedding of size `cfg.embed_dim`.

    Adapted to small images through `in_chans` and `image_size` alone: the
    stock ResNet stem at 32 px ends on a 1x1 map and still reaches 0.96
    leave-one-out 1-NN on MNIST test; dropping its max-pool doubled the cost
    without gain (measured, 2 cores).
    """

    def __init__(self, cfg: TrainCfg) -> None:
        super().__init__()
        self.trunk = timm.create_model(cfg.arch, pretrained=False, num_classes=0, in_chans=cfg.in_chans)
        self.embed = nn.Linear(self.trunk.num_features, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.trunk(x))


@contextlib.contextmanager
def _reproducible(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's RNGs, ask for deterministic kernels and use one intra-op thread
    (CPU float sums depend on the thread count); all restored afterwards."""
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    threads = torch.get_num_threads()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])


def _training_tensors(cfg: TrainCfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed images of the recipe's classes (first `max_per_class` of each) and
    labels renumbered 0..k-1 in `cfg.classes` order."""
    data = load_dataset(cfg.dataset, "train")
    picked: list[np.ndarray] = []
    for c in cfg.classes:
        idx = np.flatnonzero(data.labels == c)
        if len(idx) == 0:
            raise ValueError(f"class {c} has no images in {cfg.dataset!r} train")
        picked.append(idx[: cfg.max_per_class])
    sel = np.sort(np.concatenate(picked))
    prep = train_preprocess(cfg)
    x = prep.batch([data.images[i] for i in sel])
    remap = {c: k for k, c in enumerate(cfg.classes)}
    y = torch.tensor([remap[int(c)] for c in data.labels[sel]], dtype=torch.int64)
    return x, y


@torch.no_grad()
def _recalibrate_batchnorm(net: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int) -> None:
    """Recompute BatchNorm running statistics as exact averages over the final weights.

    After a short training run the running averages still carry the early,
    fast-changing weights; eval-mode embeddings suffer (1-NN on MNIST test at
    test size: 0.77 without, 0.95 with).
    """
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    net.train()
    for chunk in torch.tensor_split(x, -(-len(x) // batch_size)):  # near-equal sizes, none of 1
        net(chunk.to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def train(cfg: TrainCfg, *, device: str | torch.device = "cpu", progress: bool = True) -> dict[str, Any]:
    """Train `cfg` and return its checkpoint dict (config, state_dict, head, digest, metrics).

    Same recipe on the same device type and torch build -> the same digest,
    whatever the machine's core count (training uses one intra-op thread).
    """
    device = torch.device(device)
    t0 = time.perf_counter()
    x, y = _training_tensors(cfg)
    n, bs = len(y), cfg.batch_size
    starts = range(0, max(n - bs, 0) + 1, bs)  # full batches only (BatchNorm); one if n < bs
    with _reproducible(cfg.seed, device):
        net = EmbeddingNet(cfg).to(device)
        head = nn.Linear(cfg.embed_dim, len(cfg.classes)).to(device)
        opt = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=cfg.lr)
        order = torch.Generator().manual_seed(cfg.seed)
        net.train()
        for epoch in range(1, cfg.epochs + 1):
            perm = torch.randperm(n, generator=order)
            seen = correct = 0
            total_loss = 0.0
            bar = tqdm(starts, desc=f"train {cfg.arch} epoch {epoch}/{cfg.epochs}", unit="batch",
                       disable=not progress, leave=True)
            for s in bar:
                idx = perm[s:s + bs]
                xb, yb = x[idx].to(device), y[idx].to(device)
                logits = head(net(xb))
                loss = nn.functional.cross_entropy(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                seen += len(yb)
                correct += int((logits.argmax(1) == yb).sum())
                total_loss += float(loss.detach()) * len(yb)
                bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
            bar.close()
        _recalibrate_batchnorm(net, x, device, bs)
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    return {
        "format": 1,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
        "trainer_version": TRAINER_VERSION,
        "train_digest": train_digest(cfg),
        "state_dict": state,
        "head_state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
        "digest": state_dict_digest(state),
        "metrics": {
            "train_loss": total_loss / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "images": n,
            "seconds": time.perf_counter() - t0,
        },
    }


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> Path:
    """Atomically write a checkpoint dict with torch.save."""
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with weights_only=True and verify its tensors against its digest."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        digest = ckpt["digest"]
        state = ckpt["state_dict"]
    except FileNotFoundError:
        raise
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from err
    if state_dict_digest(state) != digest:
        raise CheckpointError(f"{path}: tensors do not match the recorded digest {digest}")
    return ckpt


def checkpoint_path(root: Path, cfg: TrainCfg) -> Path:
    """Where the checkpoint of `cfg` lives under cache root `root`."""
    return root / "checkpoints" / f"{cfg.arch}-{train_digest(cfg)}.pt"


def _try_load(path: Path, cfg: TrainCfg, *, warn: bool) -> dict[str, Any] | None:
    try:
        ckpt = load_checkpoint(path)
    except FileNotFoundError:
        return None
    except CheckpointError as err:
        if warn:
            warnings.warn(f"{err}; retraining", RuntimeWarning, stacklevel=3)
        return None
    if ckpt.get("train_digest") != train_digest(cfg):
        if warn:
            warnings.warn(f"{path}: recipe differs; retraining", RuntimeWarning, stacklevel=3)
        return None
    return ckpt


def ensure_checkpoint(
    root: Path, cfg: TrainCfg, *, device: str | torch.device = "cpu", progress: bool = True
) -> tuple[Path, dict[str, Any]]:
    """The verified checkpoint of `cfg` under `root`, training it first if absent or bad.

    A file lock makes concurrent callers train once.
    """
    path = checkpoint_path(root, cfg)
    ckpt = _try_load(path, cfg, warn=False)
    if ckpt is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            ckpt = _try_load(path, cfg, warn=True)
            if ckpt is None:
                ckpt = train(cfg, device=device, progress=progress)
                save_checkpoint(ckpt, path)
    return path, ckpt
