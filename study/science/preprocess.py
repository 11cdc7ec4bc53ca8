"""Per-model feature preprocessing of a trial: normalise, centre, PCA-reduce.

One `Preprocess` per model (old, new) is fitted on that model's train split and
applied to every split of the same model (train batches, evaluation split,
zero-shot sets), in this order:

1. cast to float32;
2. with `normalize`, L2-normalise each row;
3. with `center`, subtract the train split's mean of step 2;
4. with `pca = k` and a feature dim above k, project onto the k leading
   principal directions of step 3's train rows (eigenvectors of their
   covariance, fitted on at most `PCA_FIT_ROWS` seeded rows; no further mean
   subtraction, so without `center` the paper's uncentred geometry is kept) and,
   with `normalize`, L2-normalise again, so cosine retrieval and an orthogonal B
   still act on unit vectors.

The train split is read in chunks, never copied whole, so memory-mapped cache
entries of any size stay on disk.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as Fn
from torch import Tensor

__all__ = ["PCA_FIT_ROWS", "Preprocess", "as_tensor", "sample_rows"]

PCA_FIT_ROWS = 100_000  # rows the principal directions are fitted on (seeded sample beyond that)
_CHUNK = 65536  # rows per pass over a train split


def as_tensor(x: Any) -> Tensor:
    """A CPU tensor over the array's own memory (any dtype; no copy for a read-only memory map)."""
    with warnings.catch_warnings():
        # Cached features are read-only memory maps; they are never written (normalising,
        # casting and shifting make new tensors), so share them instead of copying.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(np.asarray(x))


def sample_rows(n: int, limit: int, seed: int) -> Tensor | None:
    """None when all `n` rows fit in `limit`, else `limit` seeded row indices in row order."""
    if n <= limit:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


class Preprocess:
    """Steps 1-4 of the module docstring for one model, fitted on its train split `x` ([N, D], any dtype)."""

    def __init__(self, x: Any, *, normalize: bool, center: bool, pca: int | None, seed: int,
                 device: torch.device) -> None:
        self.normalize, self.device = normalize, device
        self.shift: Tensor | None = None
        self.basis: Tensor | None = None  # [D, k] principal directions, leading first
        rows = as_tensor(x)
        n, dim = rows.shape
        if center:
            total = torch.zeros(dim, dtype=torch.float64)
            for a in range(0, n, _CHUNK):
                total += self(rows[a:a + _CHUNK]).double().sum(0).cpu()
            self.shift = (total / n).float().to(device)
        if pca is not None and dim > pca:
            self.basis = self._principal(rows, pca, seed).to(device)

    @property
    def dim(self) -> int | None:
        """Output dim when reduced, else None (the input dim is kept)."""
        return None if self.basis is None else int(self.basis.shape[1])

    def _principal(self, rows: Tensor, k: int, seed: int) -> Tensor:
        """The k leading eigenvectors of the covariance of the preprocessed train rows (at most
        `PCA_FIT_ROWS`, accumulated in float64 a chunk at a time), each signed so that its
        largest-magnitude coordinate is positive (deterministic across eigensolvers)."""
        n, dim = rows.shape
        idx = sample_rows(n, PCA_FIT_ROWS, seed)
        m = n if idx is None else len(idx)
        gram = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)
        total = torch.zeros(dim, dtype=torch.float64, device=self.device)
        for a in range(0, m, _CHUNK):
            chunk = rows[a:a + _CHUNK] if idx is None else rows[idx[a:a + _CHUNK]]
            z = self(chunk).double()
            gram += z.mT @ z
            total += z.sum(0)
        mean = total / m
        _, vectors = torch.linalg.eigh(gram - m * torch.outer(mean, mean))
        top = vectors[:, -k:].flip(1)
        signs = torch.sign(top.gather(0, top.abs().argmax(0, keepdim=True)))
        return (top * signs).float()

    def __call__(self, rows: Tensor) -> Tensor:
        """Rows of this model (any dtype, any device) preprocessed on `self.device` as float32."""
        out = rows.to(device=self.device, dtype=torch.float32)
        out = Fn.normalize(out, dim=1) if self.normalize else out
        if self.shift is not None:
            out = out - self.shift
        if self.basis is not None:
            out = out @ self.basis
            out = Fn.normalize(out, dim=1) if self.normalize else out
        return out
