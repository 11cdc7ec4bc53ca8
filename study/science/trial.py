"""One trial: train the adapters of one method on cached features and evaluate them.

    from study.science.trial import run_trial, TrialData
    result = run_trial({"method": "lambda", "lam": 12}, data, on_epoch=print)
    result.metrics["B/old/top1"], result.state["B.weight"], result.curves["backfill/paper"]

`run_trial` is what a Ray Tune trial calls and what a user calls in a notebook:
it takes a config and arrays and returns floats and tensors. It imports neither
Ray nor MLflow. The metric keys are documented in `study.science.keys`.

Protocol (see `study.science.keys` for every key):
1. Features are cast to float32 and, with `normalize=True` (default),
   L2-normalised; with `center=True` each model's mean train feature is then
   subtracted from all of its features (zero-shot sets included); with `pca = k` a model's features above k
   dims are projected onto their k leading principal components (fitted on its train split) and
   re-normalised (`study.science.preprocess`). The train split trains the adapters of the method
   (`study.science.config.METHODS`); "independent" trains nothing.
2. On the evaluation split every row old/old ... B/B is scored leave-one-out
   (queries = gallery = the split's images; a query never retrieves its own
   image). New-side vectors meet old features truncated to min(d, n) dims.
   On a CUDA trial this and steps 4-5 run on its device (`study.science.metrics`' torch
   path: same scores, tie rule and numbers), on a CPU trial in NumPy.
3. ECC (strict >) and its margin for new/old and B/old against old/old;
   gain/B/B; orth/B = ||W^T W - I||_F of the trained B.
4. Zero-shot retention on each `zero_shot` set (new-model features only):
   top1(B(new)/B(new)) - top1(new/new), and their mean.
5. Partial backfilling on the evaluation split: queries B(h_new); the gallery
   starts as F(h_old) and items turn into B(h_new) in the paper's order (largest
   distance of F(h_old) to its class mean first; with distance="cosine" measured
   between L2-normalised F(h_old), the geometry retrieval uses) or a random one
   (seeded by `seed`); M = `backfill_metric` (default mAP) at `backfill_points`
   betas in [0, 1], and the area under each curve (`metrics.curve_area`). For
   "independent" the curve is computed with no adapters: queries h_new, an h_old
   gallery turning into h_new (truncated to min(d, n) dims when d != n).
6. With `index` entries: the rows old/old, B/old, F/old, F/F, B/F and the paper-order backfill
   again inside faiss indexes trained on the train split's old (or F-mapped) features
   (`study.science.index_eval`; keys `index/...`).
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from study.science import keys as K
from study.science import metrics
from study.science.adapters import (
    backward_weight,
    export_state,
    load_adapters,
    make_backward,
    make_forward,
    orthogonality_deviation,
    truncate_pair,
)
from study.science.config import TrialConfig
from study.science.losses import LOSSES
from study.science.preprocess import Preprocess, as_tensor, sample_rows
from study.science.regularizers import build_regularizer
from study.science.trainer import DivergedError, resolve_device, train

__all__ = ["TrialData", "TrialResult", "run_trial", "fit_preprocess", "normalize_rows", "load_adapters", "DivergedError",
           "save_checkpoint", "load_checkpoint"]

NAN = float("nan")


def _shape(x: Any) -> tuple[int, ...]:
    """The shape of an array-like without copying it (arrays, memory maps, tensors, lists)."""
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


@dataclass
class TrialData:
    """The cached features of one trial.

    Each item is any object with `.x` (float [N, D]) and `.y` (int [N]), e.g.
    `backbones.Features`. old_* are phi_old's features (d-dim), new_* phi_new's
    (n-dim) of the *same images in the same order* (labels must match).
    `zero_shot` maps a set name (no '/', not 'mean') to new-model features of a
    held-out set, used only for zero-shot retention. The train arrays are never
    copied whole: a trial reads (and normalises) them one batch at a time, so
    memory-mapped cache entries of any size stay on disk and in the page cache,
    shared by every trial of a node. float16 features are cast to float32 per batch.
    """

    old_train: Any
    new_train: Any
    old_eval: Any
    new_eval: Any
    zero_shot: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split in ("train", "eval"):
            old, new = getattr(self, f"old_{split}"), getattr(self, f"new_{split}")
            os_, ns = _shape(old.x), _shape(new.x)
            if len(os_) != 2 or len(ns) != 2 or os_[0] != ns[0]:
                raise ValueError(
                    f"`old_{split}.x` and `new_{split}.x` must be [N, d] and [N, n] over the same N, "
                    f"got {os_} and {ns}"
                )
            if not np.array_equal(np.asarray(old.y), np.asarray(new.y)):
                raise ValueError(f"`old_{split}.y` and `new_{split}.y` differ: both must be the same images in order")
        if _shape(self.old_train.x)[1] != _shape(self.old_eval.x)[1]:
            raise ValueError("`old_train` and `old_eval` have different feature dims")
        if _shape(self.new_train.x)[1] != _shape(self.new_eval.x)[1]:
            raise ValueError("`new_train` and `new_eval` have different feature dims")
        for name, z in self.zero_shot.items():
            K.check_zero_shot_name(name)
            if _shape(z.x)[1] != self.n:
                raise ValueError(
                    f"zero-shot set {name!r} has dim {_shape(z.x)[1]}, new features have {self.n}"
                )

    @property
    def d(self) -> int:
        """Old feature dim."""
        return int(_shape(self.old_train.x)[1])

    @property
    def n(self) -> int:
        """New feature dim."""
        return int(_shape(self.new_train.x)[1])


@dataclass
class TrialResult:
    """metrics: flat dict of floats (keys in `study.science.keys`); state: the adapters' tensors
    (`study.science.adapters.export_state`, for torch.save / `load_adapters`; with `pca`, also `old.pca` / `new.pca`,
    the [dim, k] bases a model's normalised features are multiplied by before B or F); curves: lists of
    floats: `backfill/beta`, `backfill/paper`, `backfill/random`, per-epoch `loss/*`,
    and per-epoch cheap eval values (`B/old/top1`, ..., with `eval_epoch`); config: the
    trial's config as a dict (stored beside the weights)."""

    metrics: dict[str, float]
    state: dict[str, Tensor]
    curves: dict[str, list[float]]
    config: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------
def _float32(x: Any, device: torch.device | None = None) -> Tensor:
    return as_tensor(x).to(device=device, dtype=torch.float32)


def normalize_rows(x: Any) -> np.ndarray:
    """float32 rows L2-normalised exactly as a trial with `normalize=True` does it (torch's F.normalize)."""
    return Fn.normalize(_float32(x), dim=1).numpy()


class _TrainRows:
    """A train split read batch by batch: rows gathered from the (memory-mapped) array and
    preprocessed by `prep` (`study.science.preprocess`: normalise, centre, PCA) on its device."""

    def __init__(self, features: Any, prep: Preprocess) -> None:
        self.x = as_tensor(features.x)
        self.prep = prep
        self.shape = (self.x.shape[0], prep.dim or self.x.shape[1])

    def __getitem__(self, idx: Tensor) -> Tensor:
        return self.prep(self.x[idx.cpu()])

    def sample(self, limit: int, seed: int) -> Tensor:
        """Every prepared row if there are at most `limit`, else `limit` of them (seeded, in row order)."""
        idx = sample_rows(self.shape[0], limit, seed)
        return self.prep(self.x) if idx is None else self[idx]


def _tensor(features: Any, prep: Preprocess) -> tuple[Tensor, Tensor]:
    """A split's features preprocessed by its model's `prep`; int64 labels on the same device."""
    x = prep(as_tensor(features.x))
    y = torch.as_tensor(np.asarray(features.y).astype(np.int64), device=x.device)
    return x, y


class _Frozen:
    """B or F evaluated with its weight computed once (exp(P) once for the orthogonal B)."""

    def __init__(self, module: nn.Module | None, n: int) -> None:
        self.identity = isinstance(module, nn.Identity)
        if module is None or self.identity:
            self.weight, self.bias = None, None
            return
        with torch.no_grad():
            self.weight = backward_weight(module, n).detach().clone()
            b = getattr(module, "bias", None)
            self.bias = b.detach().clone() if b is not None else None

    def __call__(self, x: Tensor) -> Tensor:
        if self.identity:
            return x
        with torch.no_grad():
            out = x @ self.weight.mT
            return out + self.bias if self.bias is not None else out


def _np(x: Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


def _top1(cfg: TrialConfig, query: np.ndarray, gallery: np.ndarray, labels: np.ndarray,
          device: torch.device | None) -> float:
    """Leave-one-out CMC top-1 alone (zero-shot retention, the cheap per-epoch rows): through faiss on a
    CPU trial with cosine from `metrics.FAISS_TOP1_MIN_ROWS` rows on (where it measured faster; same
    tie rule), else `metrics.retrieval`."""
    if device is None and cfg.distance == "cosine" and len(gallery) >= metrics.FAISS_TOP1_MIN_ROWS:
        from study.science import index_eval  # imports faiss

        return index_eval.top1_leave_one_out(query, gallery, labels, num_threads=cfg.num_threads)
    return float(metrics.retrieval(query, gallery, labels, labels, leave_one_out=True, distance=cfg.distance,
                                   topk=(1,), device=device)["top1"])


def _metrics_device(device: torch.device) -> torch.device | None:
    """The `device` of `study.science.metrics`: a CUDA trial's evaluation runs there (the torch path),
    a CPU trial's in NumPy (faster on a CPU: benchmarks/results/eval_paths.json)."""
    return device if device.type == "cuda" else None


class _Evaluator:
    """Retrieval rows on the evaluation split for the current B and F."""

    def __init__(self, cfg: TrialConfig, old: Tensor, new: Tensor, y: Tensor) -> None:
        self.cfg = cfg
        self.old, self.new = old, new
        self.y = y.cpu().numpy()
        self.d, self.n = old.shape[1], new.shape[1]
        self.old_np, self.new_np = _np(old), _np(new)
        self.device = _metrics_device(old.device)

    def _score(self, query: np.ndarray, gallery: np.ndarray, topk=None) -> dict[str, float]:
        if topk is not None and tuple(topk) == (1,):  # the cheap per-epoch rows: top-1 alone, no mAP
            return {"top1": _top1(self.cfg, query, gallery, self.y, self.device)}
        return metrics.retrieval(
            query, gallery, self.y, self.y, leave_one_out=True,
            distance=self.cfg.distance, topk=topk or self.cfg.topk, device=self.device,
        )

    def sides(self, B: _Frozen | None, F: _Frozen | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        b_new = _np(B(self.new)) if B is not None else None
        f_old = _np(F(self.old)) if F is not None else None
        return b_new, f_old

    def pairs(self, b_new, f_old) -> dict[str, tuple[np.ndarray, np.ndarray] | None]:
        old, new = self.old_np, self.new_np
        return {
            "old/old": (old, old),
            "new/new": (new, new),
            "new/old": truncate_pair(new, old),
            "F/old": truncate_pair(f_old, old) if f_old is not None else None,
            "F/F": (f_old, f_old) if f_old is not None else None,
            "B/F": (b_new, f_old) if b_new is not None and f_old is not None else None,
            "B/old": truncate_pair(b_new, old) if b_new is not None else None,
            "B/B": (b_new, b_new) if b_new is not None else None,
        }

    def rows(self, b_new, f_old, only: tuple[str, ...] | None = None, topk=None) -> dict[str, float]:
        stats = K.stat_names(topk or self.cfg.topk)
        out: dict[str, float] = {}
        for row, pair in self.pairs(b_new, f_old).items():
            if only is not None and row not in only:
                continue
            if pair is None:
                out.update({f"{row}/{s}": NAN for s in stats})
                continue
            q, g = pair
            res = self._score(q, g, topk)
            out.update({f"{row}/{s}": float(res.get(s, NAN)) for s in stats})
        return out


def _orth(B: nn.Module | None, frozen: _Frozen | None) -> float:
    """orth/B: D(W) of the trained B in float64; 0 for the identity, NaN without B."""
    if B is None:
        return NAN
    if isinstance(B, nn.Identity):
        return 0.0
    return float(orthogonality_deviation(frozen.weight.double()))


def _zero_shot(cfg: TrialConfig, zero_shot: Mapping[str, Any], B: _Frozen | None, device,
               prep: Preprocess) -> dict[str, float]:
    out: dict[str, float] = {}
    deltas = []
    on = _metrics_device(device)

    def top1(x: np.ndarray, labels: np.ndarray) -> float:
        return _top1(cfg, x, x, labels, on)

    for name, feats in zero_shot.items():
        z, y = _tensor(feats, prep)
        yn = y.cpu().numpy()
        new_top1 = top1(_np(z), yn)
        if B is None:
            b_top1 = NAN
        elif B.identity:
            b_top1 = new_top1
        else:
            b_top1 = top1(_np(B(z)), yn)
        out[f"zs/{name}"] = b_top1 - new_top1
        out[f"zs/{name}/new_top1"] = new_top1
        out[f"zs/{name}/B_top1"] = b_top1
        deltas.append(b_top1 - new_top1)
    out[K.ZS_MEAN] = float(np.mean(deltas)) if deltas else NAN
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def _orders(cfg: TrialConfig, y: np.ndarray, old_side: np.ndarray) -> dict[str, np.ndarray]:
    # the paper's order in the retrieval geometry: with cosine, distances between unit vectors
    ordering_side = _unit(old_side) if cfg.distance == "cosine" else old_side
    return {kind: metrics.backfill_order(ordering_side, y, kind=kind, seed=cfg.seed) for kind in ("paper", "random")}


def _backfill(cfg: TrialConfig, y: np.ndarray, query: np.ndarray, old_side: np.ndarray,
              new_side: np.ndarray, device: torch.device | None) -> tuple[dict[str, float], dict[str, list[float]]]:
    orders = _orders(cfg, y, old_side)
    betas, values = metrics.backfill_curves(query, old_side, new_side, y, orders, points=cfg.backfill_points,
                                            distance=cfg.distance, metric=cfg.backfill_metric, device=device)
    curves: dict[str, list[float]] = {K.CURVE_BETA: [float(b) for b in betas]}
    out: dict[str, float] = {}
    for kind, key, curve_key in (("paper", K.BACKFILL_AUC_PAPER, K.CURVE_PAPER),
                                 ("random", K.BACKFILL_AUC_RANDOM, K.CURVE_RANDOM)):
        curves[curve_key] = [float(v) for v in values[kind]]
        out[key] = metrics.curve_area(betas, values[kind])
    return out, curves


# ---------------------------------------------------------------------------
def fit_preprocess(cfg: TrialConfig, x: Any, device: torch.device) -> Preprocess:
    """One model's preprocessing under `cfg`'s settings, fitted on its train rows `x`."""
    return Preprocess(x, normalize=cfg.normalize, center=cfg.center, pca=cfg.pca, seed=cfg.seed, device=device)


def run_trial(
    config: TrialConfig | Mapping[str, Any],
    data: TrialData,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    preps: Mapping[str, Preprocess] | None = None,
) -> TrialResult:
    """Train the method's adapters on `data`'s train split and evaluate everything.

    `on_epoch(epoch, metrics)` is called after each training epoch with the
    keys of `study.science.keys.EPOCH_KEYS` ("independent" trains nothing and calls it
    never). `preps`: the "old" and "new" models' preprocessing, already fitted on
    their train splits with this config's settings (a sequence trial fits each
    model's once); fitted here when None. Raises `DivergedError` when a loss
    becomes NaN/inf, `ValueError` for a bad config or inconsistent data.
    """
    cfg = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(config)
    spec = cfg.spec
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    # each model's preprocessing, fitted on its train split and applied to all of its splits
    if preps is None:
        preps = {side: fit_preprocess(cfg, getattr(data, f"{side}_train").x, device) for side in ("old", "new")}
    old_tr = _TrainRows(data.old_train, preps["old"])
    new_tr = _TrainRows(data.new_train, preps["new"])
    d, n = old_tr.shape[1], new_tr.shape[1]
    y_tr = torch.as_tensor(np.asarray(data.old_train.y).astype(np.int64), device=device)
    old_ev, y_ev = _tensor(data.old_eval, preps["old"])
    new_ev, _ = _tensor(data.new_eval, preps["new"])
    evaluator = _Evaluator(cfg, old_ev, new_ev, y_ev)

    gen = torch.Generator().manual_seed(cfg.seed)
    B = make_backward(spec.backward, n, init=cfg.init, generator=gen).to(device) if spec.backward else None
    F = make_forward(d, n, init=cfg.init, generator=gen).to(device) if spec.forward else None
    regularizer = build_regularizer(spec.regularizer, cfg)

    curves: dict[str, list[float]] = {k: [] for k in K.LOSS_KEYS}
    cheap: dict[str, float] = {k: NAN for k in K.CHEAP_EVAL_KEYS}
    cheap[K.EVAL_EPOCH] = NAN
    for k in (*K.CHEAP_EVAL_KEYS, K.EVAL_EPOCH):
        curves[k] = []
    history: list[dict[str, float]] = []

    t0 = time.perf_counter()
    if spec.loss is not None:
        loss_fn = LOSSES[spec.loss]

        def batch_loss(idx: Tensor) -> dict[str, Tensor]:
            return loss_fn(old_tr[idx], new_tr[idx], y_tr[idx], B, F, regularizer, cfg)

        def epoch_end(epoch: int, means: dict[str, float]) -> None:
            if epoch == 1 or epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                B_now = _Frozen(B, n)
                b_new, f_old = evaluator.sides(B_now, _Frozen(F, n))
                rows = evaluator.rows(b_new, f_old, only=K.CHEAP_EVAL_ROWS, topk=(1,))
                rows[K.ORTH] = _orth(B, B_now)
                rows[K.ZS_MEAN] = _zero_shot(cfg, data.zero_shot, B_now, device, preps["new"])[K.ZS_MEAN]
                cheap.update({k: rows[k] for k in K.CHEAP_EVAL_KEYS})
                cheap[K.EVAL_EPOCH] = float(epoch)
                for k in (*K.CHEAP_EVAL_KEYS, K.EVAL_EPOCH):
                    curves[k].append(cheap[k])
            means.update(cheap)
            for k in K.LOSS_KEYS:
                curves[k].append(means[k])
            if on_epoch is not None:
                on_epoch(epoch, dict(means))

        params = [p for m in (B, F) if m is not None for p in m.parameters()]
        history = train(
            params, batch_loss, old_tr.shape[0], epochs=cfg.epochs, batch_size=cfg.batch_size,
            lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed, device=device, on_epoch=epoch_end,
            steps_per_epoch=cfg.steps_per_epoch, lr_schedule=cfg.lr_schedule,
        )
    train_s = time.perf_counter() - t0

    # ---- final evaluation -------------------------------------------------
    t1 = time.perf_counter()
    B_eval = _Frozen(B, n) if B is not None else None
    F_eval = _Frozen(F, n) if F is not None else None
    b_new, f_old = evaluator.sides(B_eval, F_eval)
    out: dict[str, float] = evaluator.rows(b_new, f_old)

    for row in K.ECC_ROWS:
        v, ref = out[f"{row}/top1"], out["old/old/top1"]
        out[K.ecc_key(row)] = NAN if math.isnan(v) else float(metrics.ecc(v, ref))
        out[K.ecc_margin_key(row)] = metrics.ecc_margin(v, ref)
    out[K.GAIN] = out["B/B/top1"] - out["new/new/top1"]
    out[K.ORTH] = _orth(B, B_eval)
    out.update(_zero_shot(cfg, data.zero_shot, B_eval, device, preps["new"]))

    y_np = evaluator.y
    if b_new is not None and f_old is not None:
        bf_sides = (b_new, f_old, b_new)
    else:  # no adapters: the (truncated) old gallery turns into the new one
        new_t, old_t = truncate_pair(evaluator.new_np, evaluator.old_np)
        bf_sides = (new_t, old_t, new_t)
    bf, bf_curves = _backfill(cfg, y_np, *bf_sides, evaluator.device)
    out.update(bf)
    curves.update(bf_curves)
    if cfg.index:
        from study.science import index_eval
        index_train = old_tr.sample(index_eval.MAX_TRAIN_ROWS, cfg.seed)
        old_tr_np = _np(index_train)
        start_train = _np(F_eval(index_train)) if f_old is not None else old_tr_np[:, :bf_sides[1].shape[1]]
        backfill = index_eval.Backfill(*bf_sides, start_train=start_train,
                                       order=_orders(cfg, y_np, bf_sides[1])["paper"], points=cfg.backfill_points)
        ix, ix_curves = index_eval.evaluate(cfg.index, y=y_np, old_train=old_tr_np, old=evaluator.old_np, b_new=b_new,
                                            f_old=f_old, backfill=backfill, topk=cfg.topk, distance=cfg.distance,
                                            num_threads=cfg.num_threads)
        out.update(ix)
        curves.update(ix_curves)

    last = history[-1] if history else {}
    for k in K.LOSS_KEYS:
        out[k] = float(last.get(k, NAN))
    out[K.EPOCH] = float(len(history))
    out["time/train_s"] = train_s
    out["time/eval_s"] = time.perf_counter() - t1

    return TrialResult(
        metrics={k: float(out[k])
                 for k in (*K.final_keys(data.zero_shot, cfg.topk), *K.index_keys(cfg.index, cfg.topk))},
        state={**export_state(B, F), **{f"{side}.pca": p.basis.cpu() for side, p in preps.items()
                                        if p.basis is not None}},
        curves=curves,
        config=cfg.to_dict(),
    )


# ---------------------------------------------------------------------------
def save_checkpoint(result: TrialResult, folder: str | Path) -> None:
    """Write a trial's checkpoint into `folder`: the adapters (`keys.ADAPTERS_FILE`), its resolved
    config (`keys.CONFIG_FILE`) and its curves (`keys.CURVES_FILE`)."""
    folder = Path(folder)
    torch.save(result.state, folder / K.ADAPTERS_FILE)
    (folder / K.CONFIG_FILE).write_text(json.dumps(result.config, indent=1))
    (folder / K.CURVES_FILE).write_text(json.dumps(result.curves))


def load_checkpoint(folder: str | Path) -> tuple[TrialConfig, nn.Linear | None, nn.Linear | None]:
    """The trial's config and its B and F (frozen, as `load_adapters` builds them) from a folder that
    `save_checkpoint` wrote (a Ray checkpoint, or the `adapters/` artifacts of its MLflow run).
    With `config.pca`, B and F act on the reduced features: each model's normalised features
    times its basis in the same `adapters.pt` (`old.pca`, `new.pca`), normalised again."""
    folder = Path(folder)
    config = TrialConfig.from_dict(json.loads((folder / K.CONFIG_FILE).read_text()))
    B, F = load_adapters(torch.load(folder / K.ADAPTERS_FILE, weights_only=True))
    return config, B, F
