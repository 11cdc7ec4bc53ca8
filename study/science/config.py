"""Configuration of one trial: the method, its hyper-parameters and how to evaluate it.

`TrialConfig` is the single typed description of a trial. Every value the paper
gives is a default here with a "paper" note; every value the paper leaves open is
a config field with a default that is ours, and its comment says why.

`METHODS` is the method registry: one `MethodSpec` entry per method names which
backward adapter B is built, whether a forward adapter F is trained, which loss
and which regularizer on W(B) are used. Adding a method is one entry here (plus,
if it needs one, a new adapter kind in `study.science.adapters.BACKWARD_KINDS`, a
regularizer in `study.science.regularizers.REGULARIZERS` or a loss in
`study.science.losses.LOSSES`).

This module imports neither torch nor Ray nor MLflow, so the study spec parser
and the CLI can validate configs cheaply.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # study.science.index_eval imports faiss: only configs with an index load it
    from study.science.index_eval import IndexSpec

__all__ = ["MethodSpec", "METHODS", "list_methods", "TrialConfig"]


@dataclass(frozen=True)
class MethodSpec:
    """How a method is built. Strings are keys of the registries named per field."""

    backward: str | None  # key of study.science.adapters.BACKWARD_KINDS; None: no B at all (B rows NaN)
    forward: bool  # whether an affine F: R^d -> R^n is trained
    loss: str | None  # key of study.science.losses.LOSSES; None: nothing is trained
    regularizer: str | None  # key of study.science.regularizers.REGULARIZERS on W of B; None: none
    order: int  # position in lists and report tables (the paper's table order: baselines first, lambda, affine)
    needs_lam: bool = False  # the config must give `lam`
    doc: str = ""


METHODS: dict[str, MethodSpec] = {
    "orthogonal": MethodSpec(
        "orthogonal", True, "compat", None, order=2,
        doc="B_perp = exp(P), P skew-symmetric, no bias; preserves the new space exactly (ZS = 0).",
    ),
    "affine": MethodSpec(
        "affine", True, "compat", None, order=6,
        doc="B(x) = W x + b unconstrained: lambda = infinity.",
    ),
    "lambda": MethodSpec(
        "affine", True, "compat", "lambda", needs_lam=True, order=5,
        doc="affine B + sigmoid(alpha (D - lam)) D with D = ||W^T W - I||_F (the paper's method).",
    ),
    "soft_orthogonality": MethodSpec(
        "affine", True, "compat", "soft_orthogonality", order=3,
        doc="affine B + D(W) = ||W^T W - I||_F (SO baseline, the lambda = 0, alpha -> inf limit).",
    ),
    "srip": MethodSpec(
        "affine", True, "compat", "srip", order=4,
        doc="affine B + spectral norm of W^T W - I by power iteration (SRIP baseline).",
    ),
    "independent": MethodSpec(
        None, False, None, None, order=0,
        doc="no adapters: old/old, new/new, new/old only; F and B rows are NaN.",
    ),
    "fct": MethodSpec(
        "identity", True, "fct", None, order=1,
        doc="FCT: F trained with MSE to the raw new features; B is the identity (new features as they are).",
    ),
}


def list_methods() -> list[str]:
    """Names of the registered methods, by `MethodSpec.order` (then by name)."""
    return sorted(METHODS, key=lambda name: (METHODS[name].order, name))


LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")
"""Learning-rate schedules of `study.science.trainer.train` (see its docstring)."""

_CHOICES: dict[str, tuple[str, ...]] = {
    "init": ("identity", "torch"),
    "distance": ("cosine", "l2"),
    "backfill_metric": ("top1", "top5", "mAP"),
    "device": ("auto", "cpu", "cuda"),
    "lr_schedule": LR_SCHEDULES,
}


@dataclass
class TrialConfig:
    """Everything one trial needs besides the features.

    Build it from a plain dict (what Ray Tune or a YAML file gives) with
    `TrialConfig.from_dict`, which rejects unknown keys and wrong types with a
    `ValueError` naming the key path and what is allowed. `to_dict` gives the
    flat dict back (e.g. for MLflow params).
    """

    # --- the method -------------------------------------------------------
    method: str  # a key of METHODS (required)
    lam: float | None = None  # lambda (absolute Frobenius value); required for "lambda", ignored otherwise
    alpha: float = 30.0  # ours (paper silent): sigmoid sharpness. The penalty is ~0 below lam - 0.3 and ~D above
    #   lam + 0.1, so D(W) settles a few tenths below lam (paper: 12.05 for lam = 12). Measured on synthetic pairs:
    #   alpha = 10 left D up to 0.8 below lam; alpha = 100 made a wall that hurt Adam's fit.
    seed: int = 0  # seeds the init, the batch order, SRIP's start vector and the random backfill order

    # --- optimisation (paper: Adam, lr 1e-3) -------------------------------
    lr: float = 1e-3  # paper
    lr_schedule: str = "constant"  # paper (no schedule given); "cosine": lr * (1 + cos(pi t / T)) / 2 over the T
    #   steps of the run, so a short run ends at rest on its plateau instead of in Adam's lr-sized jitter
    weight_decay: float = 0.0  # ours: no decay; it would pull W towards 0, i.e. away from orthogonal
    epochs: int = 40  # ours: 640 Adam steps at N = 4000, batch 256. Enough for D(W) to reach lam up to ~12 on
    #   the MNIST pair; the unregularised affine B keeps drifting (D = 13 after 40 epochs, 27 after 160), so where
    #   the lambda sweep meets "affine" depends on this value
    steps_per_epoch: int | None = None  # ours: None = every batch of the train split per epoch; k = the first k
    #   batches of each epoch's permutation (splits of millions of rows, capacity dry runs)
    batch_size: int = 256  # ours: big enough for several positives per class in L_C at 10 classes
    init: str = "identity"  # ours: B = I (orthogonal, D = 0: every method starts admissible), F = I_{n x d}
    #   zero-padded (F(h_old) ~ B(h_new) ~ h_old at the optimum); "torch": nn.Linear's default init
    #   (B orthogonal: a random orthogonal matrix)

    # --- loss: L = w1 L_F + w2 L_B + w3 L_C + reg_weight L_reg --------------
    w1: float = 1.0  # ours: weight of L_F = ||F(h_old) - B(h_new)||^2
    w2: float = 1.0  # ours: weight of L_B = ||B(h_new) - h_old||^2
    w3: float = 1.0  # ours: weight of L_C (multi-positive contrastive, two terms)
    reg_weight: float = 1.0  # paper: weight of L_lam is 1 (1e-2 or less makes it inert)
    temperature: float = 0.1  # ours: StableRep / SupCon's usual value
    normalize: bool = True  # ours: L2-normalise every feature first, so an orthogonal B can match the old
    #   space without charging a scale difference to D(W) and lambda means the same for every backbone pair
    center: bool = False  # ours: after normalising, subtract each model's mean train feature (old and new
    #   separately; the new mean also shifts the zero-shot sets). Off = the paper's literal setup. On the MNIST
    #   pair it let the bias-free orthogonal B reach B/old 86 instead of 80 and steadied B/F, but it also
    #   changes old/old and new/new, which are measured on the same preprocessed features
    pca: int | None = None  # ours: k = reduce each model's features above k dims to their k leading principal
    #   components of its train split (then re-normalised; `study.science.preprocess`). The regulariser's and exp(P)'s n^3
    #   terms shrink by (n/k)^3: the offline default's lever to train 1280-d Lite features to their plateau on a
    #   laptop (docs/convergence.md). None = the features as they are (the paper)
    srip_iters: int = 10  # ours: power iterations per step for SRIP (matrix-vector products, cheap)

    # --- evaluation --------------------------------------------------------
    distance: str = "cosine"  # ours: retrieval distance, "cosine" or "l2"
    topk: tuple[int, ...] = (1, 5)  # paper reports CMC top-1 (and top-5); must contain 1
    backfill_points: int = 21  # ours: beta = 0, 0.05, ..., 1
    backfill_metric: str = "mAP"  # ours: the M of the backfill curve ("top1", "top5" or "mAP"). mAP because the
    #   order only matters through items that intrude into other classes' rankings: on the MNIST pair the paper
    #   order beat random by ~2 mAP points, while top-1 (set by the one nearest item) could not tell them apart
    eval_every: int = 5  # ours: cheap eval (B/old, B/B, B/F top-1, orth/B, zs/mean) every k epochs, and at the first and last
    index: tuple[IndexSpec, ...] = ()  # faiss index kinds to evaluate in (`study.science.index_eval`): entries
    #   {factory, name, nprobe, efSearch, recall_k}; a space's top-level `index:` section fills it. Empty: none

    # --- runtime -----------------------------------------------------------
    device: str = "auto"  # "auto": CUDA when available, else CPU; "cuda" falls back to CPU with a warning
    num_threads: int | None = None  # torch.set_num_threads for this process; None leaves it as it is. On a
    #   shared CPU use 1: with 2 threads under contention, the small per-step ops ran up to 100x slower

    # ------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.topk = tuple(self.topk)
        self.index = _index_specs("config.index", self.index)
        self.validate()

    @property
    def spec(self) -> MethodSpec:
        """The registry entry of `method`."""
        return METHODS[self.method]

    def validate(self, path: str = "config") -> None:
        """Raise ValueError naming `path.key`, the value and what is allowed."""
        if self.method not in METHODS:
            raise ValueError(_unknown(f"{path}.method", self.method, list(METHODS)))
        for key, allowed in _CHOICES.items():
            value = getattr(self, key)
            if value not in allowed:
                raise ValueError(_unknown(f"{path}.{key}", value, list(allowed)))
        if self.spec.needs_lam and self.lam is None:
            raise ValueError(
                f"`{path}.lam` is required for method {self.method!r}: give a number >= 0 "
                "(an absolute Frobenius norm; inf means affine)"
            )
        if self.lam is not None and not (self.lam >= 0):
            raise ValueError(f"`{path}.lam` must be >= 0 (inf allowed), got {self.lam!r}")
        _positive(path, "alpha", self.alpha)
        _positive(path, "lr", self.lr)
        _positive(path, "temperature", self.temperature)
        for key in ("weight_decay", "w1", "w2", "w3", "reg_weight"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"`{path}.{key}` must be a finite number >= 0, got {value!r}")
        for key in ("epochs", "batch_size", "srip_iters", "eval_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"`{path}.{key}` must be an integer >= 1, got {getattr(self, key)!r}")
        if self.backfill_points < 2:
            raise ValueError(f"`{path}.backfill_points` must be >= 2, got {self.backfill_points!r}")
        if 1 not in self.topk or any(k < 1 for k in self.topk):
            raise ValueError(f"`{path}.topk` must hold positive integers including 1, got {self.topk!r}")
        if self.backfill_metric.startswith("top") and int(self.backfill_metric[3:]) not in self.topk:
            raise ValueError(
                f"`{path}.backfill_metric` {self.backfill_metric!r} needs k in `{path}.topk` {self.topk!r}"
            )
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"`{path}.steps_per_epoch` must be None or >= 1, got {self.steps_per_epoch!r}")
        names = [spec.name for spec in self.index]
        if len(set(names)) != len(names):
            raise ValueError(f"`{path}.index` names an index twice ({', '.join(names)}): "
                             "give each entry its own `name`")
        if self.pca is not None and self.pca < 1:
            raise ValueError(f"`{path}.pca` must be None or an integer >= 1, got {self.pca!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"`{path}.num_threads` must be None or >= 1, got {self.num_threads!r}")

    # ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str = "config") -> "TrialConfig":
        """Build from a plain mapping; unknown keys and wrong types raise ValueError.

        Integral floats are accepted for integer fields (search libraries
        sometimes give 40.0); booleans are never taken for numbers.
        """
        if isinstance(data, TrialConfig):
            return data
        if not isinstance(data, Mapping):
            raise ValueError(f"`{path}` must be a mapping, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in fields:
                raise ValueError(_unknown(f"{path}.{key}", None, sorted(fields), what="key"))
            kwargs[key] = _coerce(f"{path}.{key}", value, fields[key].type)
        cfg = cls.__new__(cls)
        for name, f in fields.items():
            if name in kwargs:
                setattr(cfg, name, kwargs[name])
            elif f.default is not dataclasses.MISSING:
                setattr(cfg, name, f.default)
            else:
                raise ValueError(
                    f"missing key `{path}.{name}`; allowed values: {', '.join(map(repr, list_methods()))}"
                    if name == "method" else f"missing key `{path}.{name}`"
                )
        cfg.validate(path)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (topk as a list, index as a list of entry dicts)."""
        d = dataclasses.asdict(self)
        d["topk"] = list(self.topk)
        d["index"] = [spec.to_dict() for spec in self.index]
        return d


# ---------------------------------------------------------------------------
def _unknown(where: str, value: Any, allowed: list[str], what: str = "value") -> str:
    name = where.rsplit(".", 1)[-1] if what == "key" else str(value)
    close = difflib.get_close_matches(name, [str(a) for a in allowed], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    if what == "key":
        return f"unknown key `{where}`{hint} Allowed keys: {', '.join(allowed)}"
    return f"`{where}` = {value!r} is not allowed{hint} Allowed values: {', '.join(map(repr, allowed))}"


def _positive(path: str, key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"`{path}.{key}` must be a finite number > 0, got {value!r}")


def _coerce(where: str, value: Any, annotation: str) -> Any:
    """Check/convert one value against the dataclass field's annotation string."""
    ann = annotation.replace(" ", "")
    optional = ann.endswith("|None")
    base = ann[: -len("|None")] if optional else ann
    if value is None:
        if optional:
            return None
        raise ValueError(f"`{where}` must not be None (expected {base})")
    if base == "str":
        if not isinstance(value, str):
            raise ValueError(f"`{where}` must be a string, got {value!r}")
        return value
    if base == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"`{where}` must be true or false, got {value!r}")
        return value
    if base == "int":
        return _as_int(where, value)
    if base == "float":
        if isinstance(value, str):  # YAML gives "inf" / "1e-3" as strings sometimes
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"`{where}` must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"`{where}` must be a number, got {value!r}")
        return float(value)
    if base == "tuple[int,...]":
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise ValueError(f"`{where}` must be a list of integers, got {value!r}")
        return tuple(_as_int(f"{where}[{i}]", v) for i, v in enumerate(value))
    if base == "tuple[IndexSpec,...]":
        return _index_specs(where, value)
    raise TypeError(f"no coercion for annotation {annotation!r} of `{where}`")  # pragma: no cover


def _as_int(where: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"`{where}` must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(f"`{where}` must be an integer, got {value!r}")


def _index_specs(where: str, value: Any) -> tuple["IndexSpec", ...]:
    """The `index` entries as `study.science.index_eval.IndexSpec`s (keys and types checked, no dims needed)."""
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
        raise ValueError(f"`{where}` must be a list of index entries such as {{factory: IVF64,PQ16}}, got {value!r}")
    value = list(value)
    if not value:
        return ()
    from study.science.index_eval import IndexSpec, IndexSpecError
    out = []
    for i, entry in enumerate(value):
        try:
            out.append(IndexSpec.from_dict(entry))
        except IndexSpecError as err:
            raise ValueError(f"`{where}[{i}].{err.key}` {err.message}") from None
    return tuple(out)
