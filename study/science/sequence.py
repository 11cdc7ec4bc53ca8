"""A sequence trial: T models, oldest first, updated T-1 times; the compatibility matrix across them.

    from study.science.sequence import SequenceData, run_sequence_trial
    result = run_sequence_trial({"method": "lambda", "lam": 12}, data, compose="direct")
    result.metrics["seq/top1/2/0"], result.metrics["seq/AC/top1"], result.state["step2.B.weight"]

Protocol (keys in `study.science.keys`, section "Keys of a sequence trial"):
1. Update t (t = 1 .. T-1) is an ordinary pair trial (`study.science.trial.run_trial`) with old = model t-1 and
   new = model t on the train split: it trains B_t (model t -> model t-1) and F_t (t-1 -> t) and
   reports every pair key, as `step<t>/<key>`.
2. The map i -> j (j < i) is B_{j+1} o ... o B_i, one linear map (its matrix and bias composed in
   float64); between two B's the output is cut to (or zero-padded to) the next model's dim. The old
   gallery is never re-embedded: M[i][j] scores model i's mapped eval queries against model j's eval
   features, leave-one-out, as the trial's rows are (same preprocessing, distance, tie rule).
3. AC / AM of the matrix (`metrics.ac_am`, strict >), zero-shot retention of every map on model i's
   zero-shot features, and D(W) = ||W^T W - I||_F of every map's matrix.
4. With `compose="direct"` a pair trial straight from model j to model i trains one more B for
   every j < i - 1, and the same keys are reported under `seq/direct/`.

No Ray, no MLflow.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from study.science import keys as K
from study.science import metrics
from study.science.adapters import orthogonality_deviation, truncate_pair
from study.science.config import TrialConfig
from study.science.preprocess import Preprocess
from study.science.trainer import resolve_device
from study.science.trial import (
    TrialData,
    TrialResult,
    _Frozen,
    _metrics_device,
    _np,
    _tensor,
    _zero_shot,
    fit_preprocess,
    run_trial,
)

__all__ = ["SequenceData", "run_sequence_trial", "compose_maps"]

NAN = float("nan")


@dataclass
class SequenceData:
    """The cached features of a sequence of T >= 3 models, oldest first.

    `train[t]` / `eval[t]`: model t's features (`.x` [N, n_t], `.y`) of the train / eval split, the
    same images in the same order for every model. `zero_shot[name][t - 1]`: model t's features of
    zero-shot set `name` (t = 1 .. T-1; model 0 is never mapped).
    """

    train: list[Any]
    eval: list[Any]
    zero_shot: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.train) < 3 or len(self.train) != len(self.eval):
            raise ValueError(f"a sequence needs >= 3 models with a train and an eval split each, got "
                             f"{len(self.train)} train and {len(self.eval)} eval")
        for name, sets in self.zero_shot.items():
            if len(sets) != self.t - 1:
                raise ValueError(f"zero-shot set {name!r} needs features of models 1 .. {self.t - 1}, got {len(sets)}")

    @property
    def t(self) -> int:
        return len(self.train)

    def pair(self, old: int, new: int) -> TrialData:
        """The TrialData of the update old -> new (checks that the images match)."""
        zs = {name: sets[new - 1] for name, sets in self.zero_shot.items()}
        return TrialData(self.train[old], self.train[new], self.eval[old], self.eval[new], zs)


def _step_map(state: Mapping[str, Tensor], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(W [n, n], b [n]) in float64 of a pair trial's B (`export_state`; no `B.weight`: fct's identity)."""
    w = state.get("B.weight")
    b = state.get("B.bias")
    W = np.eye(n) if w is None else w.double().numpy()
    return W, np.zeros(n) if b is None else b.double().numpy()


def _resize(dim_out: int, dim_in: int) -> np.ndarray:
    """The [dim_out, dim_in] matrix that keeps the first min(dim_out, dim_in) coordinates."""
    P = np.zeros((dim_out, dim_in))
    m = min(dim_out, dim_in)
    P[:m, :m] = np.eye(m)
    return P


def compose_maps(maps: list[tuple[np.ndarray, np.ndarray]], dims: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """One affine map x -> W x + b from maps applied in order (`maps[0]` first); `dims[k]` is the
    input dim the k-th map expects (and `dims[-1]` the output's), outputs resized between them."""
    W, b = np.eye(dims[0]), np.zeros(dims[0])
    for k, (Wk, bk) in enumerate(maps):
        W, b = Wk @ W, Wk @ b + bk
        P = _resize(dims[k + 1], W.shape[0])
        W, b = P @ W, P @ b
    return W, b


def _deviation(W: np.ndarray) -> float:
    """||W^T W - I||_F, with the smaller Gram matrix when W is not square."""
    Wt = torch.from_numpy(W)
    return float(orthogonality_deviation(Wt.mT if W.shape[0] < W.shape[1] else Wt))


def _frozen(W: np.ndarray, b: np.ndarray, device: torch.device) -> _Frozen:
    lin = nn.Linear(W.shape[1], W.shape[0], bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(W))
        lin.bias.copy_(torch.from_numpy(b))
    return _Frozen(lin.to(device), W.shape[0])


class _Models:
    """Every model's eval features (preprocessed as a trial does: `study.science.preprocess`) and labels."""

    def __init__(self, cfg: TrialConfig, data: SequenceData, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.preps = [fit_preprocess(cfg, tr.x, device) for tr in data.train]
        ev = [_tensor(e, p) for e, p in zip(data.eval, self.preps)]
        self.x = [x for x, _ in ev]
        self.y = ev[0][1].cpu().numpy()
        self.dims = [int(x.shape[1]) for x in self.x]
        self.on = _metrics_device(device)

    def pair_preps(self, old: int, new: int) -> dict[str, Preprocess]:
        """The fitted preprocessing of the update old -> new, for `run_trial` (each model's fitted once)."""
        return {"old": self.preps[old], "new": self.preps[new]}

    def score(self, query: np.ndarray, gallery: np.ndarray) -> dict[str, float]:
        q, g = truncate_pair(query, gallery)
        return metrics.retrieval(q, g, self.y, self.y, leave_one_out=True, distance=self.cfg.distance,
                                 topk=self.cfg.topk, device=self.on)


def _evaluate(models: _Models, data: SequenceData, maps: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]],
              compose: str) -> dict[str, float]:
    """Matrix, AC/AM, zero-shot retention and D(W) of the maps i -> j (keys under `compose`'s prefix)."""
    cfg, t = models.cfg, data.t
    out: dict[str, float] = {}
    mats = {s: np.full((t, t), NAN) for s in K.SEQ_STATS}
    for i in range(t):
        own = _np(models.x[i])
        res = models.score(own, own)
        for s in K.SEQ_STATS:
            mats[s][i, i] = res[s]
        for j in range(i):
            W, b = maps[(i, j)]
            f = _frozen(W, b, models.device)
            res = models.score(_np(f(models.x[i])), _np(models.x[j]))
            for s in K.SEQ_STATS:
                mats[s][i, j] = res[s]
            zs = _zero_shot(cfg, {n: sets[i - 1] for n, sets in data.zero_shot.items()}, f, models.device,
                            models.preps[i])
            for name in data.zero_shot:
                out[K.seq_zs_key(i, j, name, compose)] = zs[f"zs/{name}"]
            out[K.seq_zs_key(i, j, compose=compose)] = zs[K.ZS_MEAN]
            out[K.seq_orth_key(i, j, compose)] = _deviation(W)
    for s, m in mats.items():
        for i in range(t):
            for j in range(i + 1):
                out[K.seq_matrix_key(s, i, j, compose)] = float(m[i, j])
        ac, am = metrics.ac_am(m)
        out[K.seq_summary_key("AC", s, compose)] = ac
        out[K.seq_summary_key("AM", s, compose)] = am
    return out


def run_sequence_trial(config: TrialConfig | Mapping[str, Any], data: SequenceData,
                       compose: str = "chain") -> TrialResult:
    """Train one adapter set per update of `data`'s models, in order, and score the matrix.

    `compose`: "chain" (the maps i -> j are compositions of the consecutive B's) or "direct" (also one
    adapter trained straight from i to j, keys `seq/direct/...`). The result's `state` holds each
    update's adapters as `step<t>.<key>` (and `direct<i>-<j>.<key>`), `curves` each update's curves
    as `step<t>/<key>`. Raises ValueError for a method without a backward adapter.
    """
    cfg = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(config)
    if cfg.spec.backward is None:
        raise ValueError(f"method {cfg.method!r} trains no backward adapter: a sequence composes them")
    if compose not in K.COMPOSE_MODES:
        raise ValueError(f"unknown compose {compose!r}; allowed: {', '.join(K.COMPOSE_MODES)}")
    t0 = time.perf_counter()
    models = _Models(cfg, data, resolve_device(cfg.device))
    dims = models.dims
    out: dict[str, float] = {}
    state: dict[str, Tensor] = {}
    curves: dict[str, list[float]] = {}
    steps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for t in range(1, data.t):
        res = run_trial(cfg, data.pair(t - 1, t), preps=models.pair_preps(t - 1, t))
        out.update({K.step_key(t, k): v for k, v in res.metrics.items()})
        state.update({f"step{t}.{k}": v for k, v in res.state.items()})
        curves.update({K.step_key(t, k): v for k, v in res.curves.items()})
        steps[t] = _step_map(res.state, dims[t])

    def chain(i: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        return compose_maps([steps[k] for k in range(i, j, -1)], [dims[k] for k in range(i, j - 1, -1)])

    lower = [(i, j) for i in range(data.t) for j in range(i)]
    out.update(_evaluate(models, data, {ij: chain(*ij) for ij in lower}, "chain"))
    if compose == "direct":
        direct = {}
        for i, j in lower:
            if j == i - 1:
                direct[(i, j)] = chain(i, j)
                continue
            res = run_trial(cfg, data.pair(j, i), preps=models.pair_preps(j, i))
            state.update({f"direct{i}-{j}.{k}": v for k, v in res.state.items()})
            direct[(i, j)] = compose_maps([_step_map(res.state, dims[i])], [dims[i], dims[j]])
        out.update(_evaluate(models, data, direct, "direct"))
    out[K.SEQ_TIME] = time.perf_counter() - t0
    keys = K.sequence_keys(data.t, data.zero_shot, cfg.topk, compose)
    return TrialResult(metrics={k: float(out[k]) for k in keys}, state=state, curves=curves,
                       config={**cfg.to_dict(), "compose": compose})
