"""The torch path of `study.science.metrics`: exact retrieval and backfill curves on a torch device.

Reached through ``study.science.metrics.retrieval(..., device=...)`` and
``study.science.metrics.backfill_curves(..., device=...)`` (a trial on CUDA passes its
device). It shares the NumPy path's input checks, normalisation, score blocks (the
matmul runs on the device, in full float32: no TF32), positive tables and AP
bookkeeping; only the ranking of a block is done here, with the module's tie rule
(rank of item j = ``1 + #{k: s_k > s_j} + #{k < j: s_k == s_j}``):

- each row's positives' scores are sorted (W of them, W = largest class);
- one binary search of every gallery score into them gives
  ``left_k = #{j: v_j < s_k}``, and a per-row histogram of ``left`` gives
  ``#{k: s_k > v_j}`` for every positive by a suffix sum;
- the items whose score equals some positive's (``v[left_k] == s_k``) are
  listed sparsely, keyed by (row, value, gallery index) and sorted; two binary
  searches per positive in that list count the equal-scoring items with a lower
  index.

No row is sorted whole: O(N log W) per row, and at most 26 bytes per score of a
block (every item tied; ~14 on real features). Block rows: on CUDA from the
free memory (``torch.cuda.mem_get_info``), on the CPU the NumPy path's fixed
budget. On the CPU the NumPy path is faster (benchmarks/bench_eval_paths.py),
so a CPU trial keeps it.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from study.science import backfill as BF
from study.science import retrieval as R

__all__ = ["retrieval_torch", "backfill_torch"]

# Share of the free CUDA memory one block may take, and what it takes per score: the
# score, the int32 binary search and histogram index, a slice's int64 gather index, and
# (worst case: every item tied) the sparse tie listing of a slice (40 bytes an entry
# over a quarter of the block); per row, the histogram and its suffix sums (int64,
# width + 1 each). The backfill path also holds the old- and new-side scores. At most
# 2^30 scores a block (int32 indices stay in range; torch's nonzero wants < 2^31).
_CUDA_MEMORY_SHARE = 0.5
_BYTES_PER_SCORE = 26
_TIE_SLICES = 4
_MAX_BLOCK_SCORES = 1 << 30


def _block_rows(n_query: int, n_gallery: int, width: int, device: torch.device, extra_scores: int) -> int:
    """Query rows per block: a share of the free memory on CUDA, the NumPy path's budget elsewhere.
    `width`: most positives of a query; `extra_scores` more float32 scores held per score."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        per_row = (_BYTES_PER_SCORE + 4 * extra_scores) * n_gallery + 24 * (width + 1)
        rows = int(free * _CUDA_MEMORY_SHARE) // per_row
    else:
        rows = R._default_chunk(n_query, n_gallery, blocks=1 + extra_scores)
    return max(1, min(n_query, rows, _MAX_BLOCK_SCORES // n_gallery))


@contextlib.contextmanager
def _full_fp32() -> Iterator[None]:
    """float32 matmuls in full precision (TF32 would move scores far beyond the last bit)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _to(device: torch.device) -> Callable[[np.ndarray], Tensor]:
    def put(a: np.ndarray) -> Tensor:
        with warnings.catch_warnings():  # read-only inputs (Ray's object store) are only read
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(a).to(device)
    return put


def _equal_before(s: Tensor, left: Tensor, v: Tensor, pidx: Tensor) -> Tensor:
    """``#{k < p: s_k == v_p}`` for every positive (gallery index `pidx`, score `v`, rows sorted
    by `v`) of each score row `s`; `left` = ``searchsorted(v, s)``."""
    b, n = s.shape
    w = v.shape[1]
    out = torch.empty_like(pidx)
    group = torch.searchsorted(v, v)     # a value's group: its first sorted position
    above_all = torch.full((b, 1), torch.inf, device=s.device)
    step = max(1, -(-b // _TIE_SLICES))
    for a in range(0, b, step):
        lo = left[a:a + step]
        # v[left_k] is the lowest positive score >= s_k: item k ties with a positive iff it equals it
        tied = torch.cat([v[a:a + step], above_all[a:a + step]], 1).gather(1, lo.long()) == s[a:a + step]
        r, k = tied.nonzero(as_tuple=True)
        key = ((r * w + lo[r, k]) * n + k).sort().values
        base = (torch.arange(lo.shape[0], device=s.device)[:, None] * w + group[a:a + step]) * n
        out[a:a + step] = torch.searchsorted(key, base + pidx[a:a + step]) - torch.searchsorted(key, base)
    return out


def _positive_ranks(s: Tensor, pidx: Tensor, valid: Tensor) -> Tensor:
    """Ranks (1-based, the module's tie rule) of each row's positives, sorted ascending; padding
    entries ``_NO_RANK``. The contract of ``study.science.retrieval._positive_ranks``: excluded items of
    the score block `s` are already ``-inf``."""
    b = s.shape[0]
    w = pidx.shape[1]
    v, o = torch.where(valid, s.gather(1, pidx), torch.inf).sort(dim=1)   # padding last (+inf)
    pidx, valid = pidx.gather(1, o), valid.gather(1, o)
    left = torch.searchsorted(v, s, out_int32=True)                         # #{j: v_j < s_k}
    offset = (torch.arange(b, device=s.device, dtype=torch.int32) * (w + 1))[:, None]
    hist = torch.bincount((left + offset).view(-1), minlength=b * (w + 1)).view(b, w + 1)
    above = hist.flip(1).cumsum(1).flip(1)[:, 1:]                           # #{k: s_k > v_j}
    ranks = 1 + above + _equal_before(s, left, v, pidx)
    return ranks.masked_fill(~valid, R._NO_RANK).sort(dim=1).values


class _TorchRanking(R._Ranking):
    """``study.science.retrieval._Ranking`` with each block ranked on its device."""

    def __init__(self, query_labels: np.ndarray, gallery_labels: np.ndarray, leave_one_out: bool,
                 device: torch.device) -> None:
        super().__init__(query_labels, gallery_labels, leave_one_out)
        self.device = device

    def add_block(self, q0: int, block: Tensor) -> None:
        """Rank the score rows q0:q0+len(block) (modifies `block`: leave-one-out items -> -inf)."""
        rows = np.arange(q0, q0 + block.shape[0])
        pidx, valid = self._positives(rows)
        if self.leave_one_out:
            block.diagonal(q0).fill_(-torch.inf)
        ranks = _positive_ranks(block, torch.from_numpy(pidx).to(self.device),
                                torch.from_numpy(valid).to(self.device))
        self._record(rows, ranks.cpu().numpy(), valid.sum(axis=1))


def retrieval_torch(q: np.ndarray, g: np.ndarray, same: bool, ql: np.ndarray, gl: np.ndarray,
                    ks: tuple[int, ...], *, leave_one_out: bool, distance: str, chunk_size: int | None,
                    device: str | torch.device) -> dict[str, float]:
    """``study.science.metrics.retrieval`` on `device`, from its checked inputs."""
    dev = torch.device(device)
    ranking = _TorchRanking(ql, gl, leave_one_out, dev)
    rows = (_block_rows(q.shape[0], g.shape[0], ranking.pos.width, dev, extra_scores=0)
            if chunk_size is None else chunk_size)
    with _full_fp32(), torch.no_grad():
        for q0, block in R._score_blocks(q, g, same, distance, rows, put=_to(dev)):
            ranking.add_block(q0, block)
    return ranking.summary(ks)


def backfill_torch(bf: BF._Backfill, *, chunk_size: int | None,
                   device: str | torch.device) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``study.science.metrics.backfill_curves`` on `device`, from its checked inputs."""
    dev = torch.device(device)
    n = bf.q.shape[0]
    rankings = {pt: _TorchRanking(bf.y, bf.y, True, dev) for pt in bf.masks}
    width = next(iter(rankings.values())).pos.width
    rows = _block_rows(n, n, width, dev, extra_scores=2) if chunk_size is None else chunk_size
    with _full_fp32(), torch.no_grad():
        for q0, pt, block in bf.blocks(rows, torch.where, put=_to(dev)):
            rankings[pt].add_block(q0, block)
    return bf.result(rankings)
