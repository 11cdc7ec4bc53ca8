"""Search-space YAML -> a validated, typed :class:`StudySpec` (no Ray, no MLflow).

The schema (every key, its type and default) is documented in
``search_spaces/README.md``. Validation happens here, before anything is
started or written: any problem raises :class:`SpaceError`, whose message is
one line naming the file, the key path and what is allowed.
"""
from __future__ import annotations

import difflib
import hashlib
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from study.science import keys as K
from study.science.config import METHODS, TrialConfig, list_methods

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
SCHEDULERS = ("none", "asha")
SEARCHES = ("grid", "optuna")
MODES = ("max", "min")
# Keys of a trial config that come from the space rather than `train:`.
TRIAL_KEYS = ("method", "lam", "alpha", "seed")


class SpaceError(ValueError):
    """A search space that cannot run. ``str(err)`` is the one-line message for the user."""

    def __init__(self, file: str | Path, keypath: str, message: str) -> None:
        self.file, self.keypath, self.message = str(file), keypath, message
        where = f"{self.file}: {keypath}: " if keypath else f"{self.file}: "
        super().__init__(where + message)


@dataclass(frozen=True)
class FeatureKey:
    """One unit of feature extraction: a backbone on one split of one data set."""

    backbone: str
    dataset: str
    split: str

    def __str__(self) -> str:
        return f"{self.backbone}|{self.dataset}|{self.split}"


@dataclass(frozen=True)
class ZeroShotSet:
    dataset: str
    split: str

    def __str__(self) -> str:
        return f"{self.dataset}:{self.split}"


@dataclass(frozen=True)
class Pair:
    old: str
    new: str
    zero_shot: tuple[ZeroShotSet, ...] | None = None  # None: the study-wide list

    @property
    def name(self) -> str:
        return f"{self.old}->{self.new}"

    def zero_shot_sets(self, study_wide: tuple[ZeroShotSet, ...]) -> tuple[ZeroShotSet, ...]:
        """This pair's zero-shot sets: its own list if it has one, else the study-wide one."""
        return study_wide if self.zero_shot is None else self.zero_shot


@dataclass(frozen=True)
class ModelSequence:
    """T >= 3 backbones, oldest first: a deployed model updated T-1 times (`study.science.sequence`)."""

    models: tuple[str, ...]
    zero_shot: tuple[ZeroShotSet, ...] | None = None  # None: the study-wide list

    @property
    def name(self) -> str:
        return "->".join(self.models)

    def zero_shot_sets(self, study_wide: tuple[ZeroShotSet, ...]) -> tuple[ZeroShotSet, ...]:
        """This sequence's zero-shot sets: its own list if it has one, else the study-wide one."""
        return study_wide if self.zero_shot is None else self.zero_shot


@dataclass(frozen=True)
class Downstream:
    dataset: str
    train: str
    eval: str


@dataclass(frozen=True)
class Scheduler:
    kind: str = "none"
    grace_period: int = 2
    reduction_factor: int = 2


@dataclass(frozen=True)
class Search:
    kind: str = "grid"
    n_trials: int = 16
    lam: tuple[float, float] = (0.0, 40.0)
    alpha: tuple[float, float] = (0.1, 10.0)
    metrics: tuple[str, ...] = ("B/old/top1", "zs/mean")
    modes: tuple[str, ...] = ("max", "max")


@dataclass(frozen=True)
class StudySpec:
    """A validated study: what to train, on what, and how to run it."""

    name: str
    path: Path
    sha256: str
    text: str
    pairs: tuple[Pair, ...]
    datasets: tuple[Downstream, ...]
    zero_shot: tuple[ZeroShotSet, ...]
    methods: tuple[str, ...]
    lambdas: tuple[float, ...]
    alphas: tuple[float, ...]
    seeds: tuple[int, ...]
    train: dict[str, Any] = field(default_factory=dict)
    cpu: float = 1.0
    gpu: float = 0.0
    metric: str = "B/old/top1"
    mode: str = "max"
    scheduler: Scheduler = Scheduler()
    search: Search = Search()
    max_concurrent: int | None = None
    max_failures: int = 1
    description: str = ""
    feature_dtype: str = "float32"  # storage (and read) precision of every feature key
    sequences: tuple[ModelSequence, ...] = ()  # a sequence study (then `pairs` is empty)
    compose: str = "chain"  # sequences: "chain" or "direct" (study.science.keys.COMPOSE_MODES)

    def zero_shot_for(self, cell: Pair | ModelSequence) -> tuple[ZeroShotSet, ...]:
        return cell.zero_shot_sets(self.zero_shot)

    def cells(self) -> list[dict[str, Any]]:
        """The (pair or sequence, downstream set) combinations, each with its feature keys. A sequence's
        cell names it under "pair" (its models joined by "->") and lists them under "models"."""
        out = []
        for seq, ds in itertools.product(self.sequences, self.datasets):
            out.append({
                "pair": seq.name, "models": list(seq.models), "compose": self.compose,
                "dataset": ds.dataset, "train_split": ds.train, "eval_split": ds.eval,
                "zero_shot": [str(z) for z in seq.zero_shot_sets(self.zero_shot)],
            })
        for pair, ds in itertools.product(self.pairs, self.datasets):
            zs = self.zero_shot_for(pair)
            out.append({
                "pair": pair.name, "old": pair.old, "new": pair.new,
                "dataset": ds.dataset, "train_split": ds.train, "eval_split": ds.eval,
                "zero_shot": [str(z) for z in zs],
            })
        return out

    def trials(self) -> list[dict[str, Any]]:
        """The grid, expanded: one flat config dict per trial, in a stable order."""
        out = []
        for cell in self.cells():
            for method in self.methods:
                lams: tuple[float | None, ...] = self.lambdas if method == "lambda" else (None,)
                alphas: tuple[float | None, ...] = self.alphas if method == "lambda" else (None,)
                for lam, alpha, seed in itertools.product(lams, alphas, self.seeds):
                    cfg = {**cell, "method": method, "lam": lam, "alpha": alpha, "seed": seed}
                    cfg["train"] = dict(self.train)
                    out.append(cfg)
        return out

    def trial_table(self) -> dict[str, dict[str, Any]]:
        """The grid's trials by `trial_name`; ValueError when two grid points would share a name."""
        table: dict[str, dict[str, Any]] = {}
        for cfg in self.trials():
            name = trial_name(cfg)
            if name in table:
                other = table[name]
                diff = ", ".join(f"{k} {other[k]!r} and {cfg[k]!r}" for k in cfg if cfg[k] != other[k])
                raise ValueError(f"two grid points ({diff}) get the same trial name `{name}` "
                                 "(numbers keep 6 significant digits in it): make them differ there")
            table[name] = cfg
        return table

    def feature_keys(self) -> list[FeatureKey]:
        """Unique (backbone, data set, split) keys the study needs, sorted."""
        keys = set()
        for pair in self.pairs:
            for ds in self.datasets:
                for split in (ds.train, ds.eval):
                    keys.add(FeatureKey(pair.old, ds.dataset, split))
                    keys.add(FeatureKey(pair.new, ds.dataset, split))
            for z in self.zero_shot_for(pair):
                keys.add(FeatureKey(pair.new, z.dataset, z.split))
        for seq in self.sequences:
            keys.update(FeatureKey(m, ds.dataset, split) for m in seq.models for ds in self.datasets
                        for split in (ds.train, ds.eval))
            keys.update(FeatureKey(m, z.dataset, z.split) for m in seq.models[1:]
                        for z in seq.zero_shot_sets(self.zero_shot))
        return sorted(keys, key=str)

    @property
    def backbone_names(self) -> list[str]:
        return sorted({p.old for p in self.pairs} | {p.new for p in self.pairs}
                      | {m for seq in self.sequences for m in seq.models})


def trial_name(cfg: dict[str, Any]) -> str:
    """A short, readable, unique-per-grid-point trial name."""
    method = cfg["method"]
    if method == "lambda":
        method = f"lambda{cfg['lam']:g}" + (f"-a{cfg['alpha']:g}" if cfg.get("alpha") is not None else "")
    pair = cfg["pair"].replace("->", "-to-")
    return f"{pair}_{cfg['dataset']}_{method}_s{cfg['seed']}"


# ---------------------------------------------------------------------------
# Parsing and validation
# ---------------------------------------------------------------------------

class _Checker:
    """Small typed accessors that raise SpaceError with the key path."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def fail(self, keypath: str, message: str) -> SpaceError:
        return SpaceError(self.file, keypath, message)

    def mapping(self, value: Any, keypath: str, allowed: dict[str, Any], required: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, dict):
            raise self.fail(keypath or "<top level>", f"expected a mapping, got {_typename(value)}")
        for key in value:
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), list(allowed), n=1)
                dym = f"; did you mean `{hint[0]}`?" if hint else ""
                raise self.fail(_join(keypath, str(key)), f"unknown key{dym} allowed: {', '.join(allowed)}")
        for key in required:
            if key not in value:
                raise self.fail(_join(keypath, key), "required key is missing")
        return value

    def typed(self, value: Any, keypath: str, kind: type | tuple[type, ...], what: str) -> Any:
        if isinstance(value, bool) and bool not in _as_tuple(kind):
            raise self.fail(keypath, f"expected {what}, got a boolean ({value!r})")
        if not isinstance(value, kind):
            raise self.fail(keypath, f"expected {what}, got {_typename(value)} ({value!r})")
        return value

    def number(self, value: Any, keypath: str, *, low: float | None = None, low_open: bool = False,
               high: float | None = None) -> float:
        v = float(self.typed(value, keypath, (int, float), "a number"))
        if math.isnan(v):
            raise self.fail(keypath, "must be a number, got NaN")
        if low is not None and (v <= low if low_open else v < low):
            raise self.fail(keypath, f"must be {'>' if low_open else '>='} {low:g}, got {v:g}")
        if high is not None and v > high:
            raise self.fail(keypath, f"must be <= {high:g}, got {v:g}")
        return v

    def integer(self, value: Any, keypath: str, *, low: int | None = None) -> int:
        v = self.typed(value, keypath, int, "an integer")
        if low is not None and v < low:
            raise self.fail(keypath, f"must be >= {low}, got {v}")
        return v

    def choice(self, value: Any, keypath: str, allowed: tuple[str, ...] | list[str]) -> str:
        v = self.typed(value, keypath, str, "a string")
        if v not in allowed:
            hint = difflib.get_close_matches(v, list(allowed), n=1)
            dym = f" (did you mean `{hint[0]}`?)" if hint else ""
            raise self.fail(keypath, f"unknown value `{v}`{dym}; allowed: {', '.join(allowed)}")
        return v

    def seq(self, value: Any, keypath: str, item: Callable[[Any, str], Any], *, allow_scalar: bool = False,
            nonempty: bool = True) -> tuple:
        if allow_scalar and not isinstance(value, list):
            value = [value]
        self.typed(value, keypath, list, "a list")
        if nonempty and not value:
            raise self.fail(keypath, "must not be empty")
        return tuple(item(v, f"{keypath}[{i}]") for i, v in enumerate(value))

    def unique(self, values: list[Any], keypath: str) -> None:
        """Refuse a value listed twice (it would make the same trials twice, or merge them)."""
        for i, v in enumerate(values):
            if v in values[:i]:
                shown = f"{v:g}" if isinstance(v, float) else str(v)
                raise self.fail(f"{keypath}[{i}]", f"`{shown}` is listed twice (also {keypath}[{values.index(v)}]): "
                                "list each value once")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _typename(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing (null)"}.get(
        type(value), type(value).__name__)


TOP_KEYS = {
    "name": "study name ([A-Za-z0-9_.-], no slashes)",
    "description": "free text",
    "pairs": "list of {old, new[, zero_shot]}",
    "sequences": "list of [backbone, ...] (>= 3, oldest first) or {models, zero_shot}",
    "compose": "chain|direct (sequences: composed maps only, or also one adapter straight from i to j)",
    "datasets": "list of {name, train, eval}",
    "zero_shot": "list of data set names or {name, split}",
    "methods": "list of method names (study.science.config.METHODS)",
    "lambdas": "list of numbers >= 0 (method `lambda`)",
    "alpha": "number > 0 or list of them",
    "seeds": "list of integers",
    "train": "TrialConfig fields shared by every trial",
    "resources": "{cpu, gpu}",
    "optimize": "{metric, mode}",
    "scheduler": "{kind: none|asha, grace_period, reduction_factor}",
    "search": "{kind: grid|optuna, n_trials, lambda: [lo, hi], alpha: [lo, hi], metrics, modes}",
    "max_concurrent": "integer >= 1",
    "max_failures": "integer >= 0 (retries of a failed trial)",
    "features": "{dtype: float32|float16} (storage precision of the feature cache)",
    "index": "list of {factory, name, nprobe, efSearch, recall_k}: faiss indexes to evaluate in",
}


def load_space(path: str | Path) -> StudySpec:
    """Read and validate a search-space YAML file; raise :class:`SpaceError` on any problem."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(path, "", "no such file" + ("" if path.parent.is_dir() else f" (folder {path.parent} does not exist)"))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SpaceError(path, "", f"cannot read: {err}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpaceError(path, "", f"malformed YAML{where}: {problem}") from None
    return parse_space(raw, path=path, text=text)


def parse_space(raw: Any, *, path: Path, text: str = "") -> StudySpec:
    """Validate an already-parsed YAML document."""
    c = _Checker(path)
    top = c.mapping(raw, "", TOP_KEYS, required=("name", "datasets", "methods", "seeds"))
    if "sequences" in top and "pairs" in top:
        raise c.fail("sequences", "cannot be mixed with `pairs` in one study: run the pairs and the sequences "
                     "as two studies")
    if "sequences" not in top:
        c.mapping(top, "", TOP_KEYS, required=("pairs",))

    name = c.typed(top["name"], "name", str, "a string")
    if not NAME_RE.match(name) or ".." in name:
        raise c.fail("name", f"`{name}` is not allowed: use 1-100 of [A-Za-z0-9_.-], starting with a letter or digit, no `/` or `..`")

    import backbones  # here, not at the top: Ray workers import this module and need no registry
    known_bb = backbones.list_backbones()
    known_ds = backbones.list_datasets()

    def backbone(v: Any, kp: str) -> str:
        return c.choice(v, kp, known_bb)

    def dataset(v: Any, kp: str) -> str:
        """A registered data set, or a member of a family (synthetic sizes in the name)."""
        v = c.typed(v, kp, str, "a string")
        try:
            backbones.dataset_cfg(v)
            return v
        except backbones.UnknownNameError:
            pass
        except ValueError as err:
            raise c.fail(kp, str(err)) from None
        return c.choice(v, kp, [*known_ds, backbones.SYNTHETIC_PATTERN])

    def dataset_split(ds: str, split: Any, kp: str) -> str:
        return c.choice(split, kp, list(backbones.dataset_cfg(ds).splits))

    def zero_shot_item(v: Any, kp: str) -> ZeroShotSet:
        if isinstance(v, str):
            ds = dataset(v, kp)
            return ZeroShotSet(ds, _default_eval_split(ds))
        m = c.mapping(v, kp, {"name": "", "split": ""}, required=("name",))
        ds = dataset(m["name"], f"{kp}.name")
        split = dataset_split(ds, m.get("split", _default_eval_split(ds)), f"{kp}.split")
        return ZeroShotSet(ds, split)

    zero_shot = c.seq(top.get("zero_shot", []), "zero_shot", zero_shot_item, nonempty=False)
    c.unique([z.dataset for z in zero_shot], "zero_shot")

    def pair_item(v: Any, kp: str) -> Pair:
        m = c.mapping(v, kp, {"old": "", "new": "", "zero_shot": ""}, required=("old", "new"))
        zs = None
        if "zero_shot" in m:
            zs = c.seq(m["zero_shot"], f"{kp}.zero_shot", zero_shot_item, nonempty=False)
            c.unique([z.dataset for z in zs], f"{kp}.zero_shot")
        return Pair(backbone(m["old"], f"{kp}.old"), backbone(m["new"], f"{kp}.new"), zs)

    pairs = c.seq(top["pairs"], "pairs", pair_item) if "pairs" in top else ()
    c.unique([p.name for p in pairs], "pairs")

    def sequence_item(v: Any, kp: str) -> ModelSequence:
        m = c.mapping(v, kp, {"models": "", "zero_shot": ""}, required=("models",)) if isinstance(v, dict) \
            else {"models": v}
        models_kp = f"{kp}.models" if isinstance(v, dict) else kp
        models = c.seq(m["models"], models_kp, backbone)
        if len(models) < 3:
            raise c.fail(models_kp, f"needs at least 3 backbones (oldest first), got {len(models)}: "
                         "two models are a pair (`pairs:`)")
        c.unique(list(models), models_kp)
        zs = None
        if "zero_shot" in m:
            zs = c.seq(m["zero_shot"], f"{kp}.zero_shot", zero_shot_item, nonempty=False)
            c.unique([z.dataset for z in zs], f"{kp}.zero_shot")
        return ModelSequence(models, zs)

    sequences = c.seq(top["sequences"], "sequences", sequence_item) if "sequences" in top else ()
    c.unique([s.name for s in sequences], "sequences")
    if "compose" in top and not sequences:
        raise c.fail("compose", "applies to `sequences` only")
    compose = c.choice(top.get("compose", "chain"), "compose", K.COMPOSE_MODES)

    def downstream_item(v: Any, kp: str) -> Downstream:
        m = c.mapping(v, kp, {"name": "", "train": "", "eval": ""}, required=("name",))
        ds = dataset(m["name"], f"{kp}.name")
        train = dataset_split(ds, m.get("train", "train"), f"{kp}.train")
        ev = dataset_split(ds, m.get("eval", _default_eval_split(ds)), f"{kp}.eval")
        if train == ev:
            raise c.fail(f"{kp}.eval", f"must differ from the train split `{train}`")
        return Downstream(ds, train, ev)

    datasets = c.seq(top["datasets"], "datasets", downstream_item)
    c.unique([d.dataset for d in datasets], "datasets")
    methods = c.seq(top["methods"], "methods", lambda v, kp: c.choice(v, kp, list_methods()))
    c.unique(list(methods), "methods")
    lambdas = c.seq(top.get("lambdas", []), "lambdas", lambda v, kp: c.number(v, kp, low=0.0), nonempty=False)
    alphas = c.seq(top.get("alpha", TrialConfig.__dataclass_fields__["alpha"].default), "alpha",
                   lambda v, kp: c.number(v, kp, low=0.0, low_open=True), allow_scalar=True)
    seeds = c.seq(top["seeds"], "seeds", lambda v, kp: c.integer(v, kp, low=0))
    for values, keypath in ((lambdas, "lambdas"), (alphas, "alpha"), (seeds, "seeds")):
        c.unique(list(values), keypath)

    train = c.typed(top.get("train", {}) or {}, "train", dict, "a mapping")
    for key in train:
        if key in TRIAL_KEYS:
            raise c.fail(f"train.{key}", "is set per trial from the top-level keys methods/lambdas/alpha/seeds, not in `train`")
    if "index" in train:
        raise c.fail("train.index", "is set from the top-level `index:` section, not in `train`")
    c.mapping(train, "train", {f: "" for f in TrialConfig.__dataclass_fields__ if f not in (*TRIAL_KEYS, "index")})
    try:
        train_cfg = TrialConfig.from_dict({**train, "method": "affine"}, path="train")
    except (ValueError, TypeError) as err:
        raise c.fail("", str(err)) from None
    index = _index_section(c, top.get("index", []), pairs, datasets, train.get("distance", TrialConfig.distance))
    if index:
        train = {**train, "index": [spec.to_dict() for spec in index]}
        train_cfg = TrialConfig.from_dict({**train, "method": "affine"}, path="train")

    resources = c.mapping(top.get("resources", {}) or {}, "resources", {"cpu": "", "gpu": ""})
    cpu = c.number(resources.get("cpu", 1), "resources.cpu", low=0.0, low_open=True)
    gpu = c.number(resources.get("gpu", 0), "resources.gpu", low=0.0, high=1.0)

    opt = c.mapping(top.get("optimize", {}) or {}, "optimize", {"metric": "", "mode": ""})
    # Metric keys every trial reports (study/science/keys.py); zero-shot keys are named after each pair's sets.
    per_pair = [K.metric_keys([z.dataset for z in p.zero_shot_sets(zero_shot)], train_cfg)
                for p in pairs]
    per_pair += [K.sequence_keys(len(s.models), [z.dataset for z in s.zero_shot_sets(zero_shot)], train_cfg.topk,
                                 compose) for s in sequences]
    metric_names = [k for k in per_pair[0] if all(k in other for other in per_pair[1:])]
    default_metric = K.seq_summary_key("AM", "top1") if sequences else "B/old/top1"
    metric = c.choice(opt.get("metric", default_metric), "optimize.metric", metric_names)
    mode = c.choice(opt.get("mode", "max"), "optimize.mode", MODES)

    sch = c.mapping(top.get("scheduler", {}) or {}, "scheduler", {"kind": "", "grace_period": "", "reduction_factor": ""})
    scheduler = Scheduler(
        kind=c.choice(sch.get("kind", "none"), "scheduler.kind", SCHEDULERS),
        grace_period=c.integer(sch.get("grace_period", 2), "scheduler.grace_period", low=1),
        reduction_factor=c.integer(sch.get("reduction_factor", 2), "scheduler.reduction_factor", low=2),
    )

    se = c.mapping(top.get("search", {}) or {}, "search",
                   {"kind": "", "n_trials": "", "lambda": "", "alpha": "", "metrics": "", "modes": ""})
    search = Search(
        kind=c.choice(se.get("kind", "grid"), "search.kind", SEARCHES),
        n_trials=c.integer(se.get("n_trials", 16), "search.n_trials", low=1),
        lam=_range(c, se.get("lambda", [0.0, 40.0]), "search.lambda", low=0.0, low_open=False),
        alpha=_range(c, se.get("alpha", [0.1, 10.0]), "search.alpha", low=0.0, low_open=True),
        metrics=c.seq(se.get("metrics", [default_metric] if sequences else ["B/old/top1", "zs/mean"]),
                      "search.metrics", lambda v, kp: c.choice(v, kp, metric_names)),
        modes=c.seq(se.get("modes", ["max"] if sequences else ["max", "max"]), "search.modes",
                    lambda v, kp: c.choice(v, kp, MODES)),
    )
    if len(search.metrics) != len(search.modes):
        raise c.fail("search.modes", f"needs one mode per metric ({len(search.metrics)}), got {len(search.modes)}")

    max_concurrent = top.get("max_concurrent")
    if max_concurrent is not None:
        max_concurrent = c.integer(max_concurrent, "max_concurrent", low=1)
    max_failures = c.integer(top.get("max_failures", 1), "max_failures", low=0)
    description = c.typed(top.get("description", ""), "description", str, "a string")
    feats = c.mapping(top.get("features", {}) or {}, "features", {"dtype": ""})
    feature_dtype = c.choice(feats.get("dtype", "float32"), "features.dtype", backbones.DTYPES)

    # Cross-field checks.
    if "lambda" in methods and not lambdas and search.kind == "grid":
        raise c.fail("lambdas", "method `lambda` is listed but `lambdas` is empty: the grid would have no lambda trials")
    if sequences:
        _check_sequence_study(c, top, methods, search)
    if search.kind == "optuna" and methods != ("lambda",):
        raise c.fail("methods", "search `optuna` tunes lambda/alpha: set methods to [lambda]")
    members = [(f"pairs[{i}].{side}", getattr(p, side), p) for i, p in enumerate(pairs) for side in ("old", "new")]
    members += [(f"sequences[{i}]", m, s) for i, s in enumerate(sequences) for m in s.models]
    for keypath, model, group in members:
        if backbones.backbone_cfg(model).source != "synthetic":
            continue
        for ds_name in [*(x.dataset for x in datasets), *(z.dataset for z in group.zero_shot_sets(zero_shot))]:
            if not ds_name.startswith("synthetic-"):
                raise c.fail(keypath, f"synthetic backbone `{model}` embeds only "
                             f"synthetic data sets ({backbones.SYNTHETIC_PATTERN}), not `{ds_name}`")
    for i, pair in enumerate(pairs):
        d, n = backbones.backbone_cfg(pair.old).dim, backbones.backbone_cfg(pair.new).dim
        if d != n and "independent" in methods:
            raise c.fail(f"pairs[{i}]", f"method `independent` compares {pair.new} with {pair.old} directly and needs equal dims, got d={d}, n={n}; drop `independent` or pick a pair with equal dims")

    spec = StudySpec(
        name=name, path=path.resolve(), sha256=hashlib.sha256(text.encode()).hexdigest(), text=text,
        pairs=pairs, datasets=datasets, zero_shot=zero_shot, methods=methods, lambdas=lambdas,
        alphas=alphas, seeds=seeds, train=dict(train), cpu=cpu, gpu=gpu, metric=metric, mode=mode,
        scheduler=scheduler, search=search, max_concurrent=max_concurrent, max_failures=max_failures,
        description=description, feature_dtype=feature_dtype, sequences=sequences, compose=compose,
    )
    if search.kind == "grid":
        try:
            table = spec.trial_table()
        except ValueError as err:
            raise c.fail("", str(err)) from None
        if not table:
            raise c.fail("", "the grid is empty")
    return spec


def _check_sequence_study(c: _Checker, top: dict, methods: tuple[str, ...], search: Search) -> None:
    """What a sequence study cannot do: methods without a backward adapter, searches, indexes."""
    for i, method in enumerate(methods):
        if METHODS[method].backward is None:
            raise c.fail(f"methods[{i}]", f"method `{method}` trains no backward adapter, and a sequence composes "
                         "them: drop it for `sequences`")
    if search.kind != "grid":
        raise c.fail("search.kind", f"`{search.kind}` is for pairs; sequences run as a grid (allowed: grid)")
    if top.get("index"):
        raise c.fail("index", "is for pairs; a sequence study evaluates no faiss index")


def _index_section(c: _Checker, value: Any, pairs: tuple[Pair, ...], datasets: tuple[Downstream, ...],
                   distance: str) -> tuple[Any, ...]:
    """The `index:` entries as `study.science.index_eval.IndexSpec`s, each built by faiss at every dim a trial uses
    (d, n, min(d, n)) and, for offline data sets, checked against the train split's size."""
    if value == []:
        return ()
    import backbones
    from study.science.index_eval import IndexSpec, IndexSpecError

    def fail(i: int, err: IndexSpecError, where: str = "") -> SpaceError:
        return c.fail(f"index[{i}].{err.key}", err.message + where)

    def item(v: Any, kp: str) -> Any:
        try:
            return IndexSpec.from_dict(v)
        except IndexSpecError as err:
            raise c.fail(f"{kp}.{err.key}", err.message) from None

    specs = c.seq(value, "index", item, nonempty=False)
    names = [spec.name for spec in specs]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise c.fail(f"index[{i}].name", f"`{name}` is used by index[{names.index(name)}]: give each entry its own `name`")
    train_size = {ds: len(backbones.load_dataset(ds.dataset, ds.train)) if backbones.dataset_cfg(ds.dataset).offline
                  else None for ds in datasets}   # online sets: the trial checks it
    for i, spec in enumerate(specs):
        for pair in pairs:
            d, n = backbones.backbone_cfg(pair.old).dim, backbones.backbone_cfg(pair.new).dim
            for dim in sorted({d, n, min(d, n)}):
                for ds, n_train in train_size.items():
                    try:
                        spec.build(dim, distance, n_train=n_train)
                    except IndexSpecError as err:
                        raise fail(i, err, f" (pair {pair.name}, dim {dim}, {ds.dataset}:{ds.train})") from None
    return specs


def _range(c: _Checker, value: Any, keypath: str, *, low: float, low_open: bool) -> tuple[float, float]:
    lo_hi = c.seq(value, keypath, lambda v, kp: c.number(v, kp, low=low, low_open=low_open))
    if len(lo_hi) != 2 or lo_hi[0] >= lo_hi[1]:
        raise c.fail(keypath, f"must be [low, high] with low < high, got {list(lo_hi)}")
    return (lo_hi[0], lo_hi[1])


def _default_eval_split(dataset: str) -> str:
    import backbones
    splits = backbones.dataset_cfg(dataset).splits
    for name in ("test", "val", "all"):
        if name in splits:
            return name
    return splits[-1]
