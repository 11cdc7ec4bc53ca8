"""Compatibility inside a deployed faiss index: retrieval rows and partial backfilling.

A deployed gallery lives in a faiss index whose coarse centroids and codebooks
were trained on the *old* model's embeddings. This module measures what the
exact rows of `study.science.trial` cannot: how B(h_new) queries, and gallery items
backfilled with B(h_new), fare inside such an index. Pure NumPy + faiss (no
torch, Ray, MLflow or YAML); the metric keys are documented in `study.science.keys`.

Protocol (every index kind of `TrialConfig.index`, one `IndexSpec` each):

- **Old index.** Built with ``faiss.index_factory(d, factory, metric)``,
  trained on the old model's train-split features, filled with the old
  features of the evaluation split (gallery id i = image i). Queried with old
  features (the reference, ``old/old``), B(h_new) (``B/old``) and F(h_old)
  (``F/old``). When a query side has fewer dims than the gallery the gallery is
  truncated to the query's dims (the paper's rule) in an index of its own.
- **F index.** The same kind trained on F(old train), filled with F(h_old):
  queried with F(h_old) (``F/F``) and B(h_new) (``B/F``). It is also the
  start of the backfill below.
- **Scores.** ``distance="cosine"``: rows L2-normalised exactly as
  `study.science.metrics` does, ``METRIC_INNER_PRODUCT``; ``"l2"``: raw rows,
  ``METRIC_L2``. Each query searches the top ``k + 1`` and drops its own id
  (leave-one-out kept: a query never retrieves its own image), then
  CMC top-k = share of queries (with a positive in the gallery) whose first
  positive is in the index's top-k; recall@k = mean over queries of
  ``|index top-k & exact top-k| / k``, the exact top-k from an ``IndexFlat`` on
  the same vectors with the same query side.
- **Ties.** Within the index's results the order is faiss's. faiss's flat
  search returns exact ties **higher id first**, the opposite of
  `study.science.metrics` (lower index first); the two differ only at exact float ties.
- **Backfilling in the index.** Queries B(h_new); the F index starts with
  F(h_old) ("independent": new queries, an old index turning new, both
  truncated to min(d, n) dims) and items turn into B(h_new) in the paper's
  order, replaced in place: ``remove_ids`` + ``add_with_ids``, the new vector
  re-encoded by the quantizer trained before the backfill. IVF indexes keep
  their ids natively; flat-coded ones (Flat, PQ, SQ) go through an
  ``IndexIDMap``; indexes without removal (HNSW, NSG) are **rebuilt per
  step** from the trained empty index (``index/<name>/backfill/in_place`` = 0).
  M = CMC top-1 at each beta of ``backfill_points``, beside the exact top-1
  curve on the same galleries (``index/exact/...``).
- **Threads.** faiss's OpenMP threads are set for the evaluation (and restored
  after it) to the trial's CPUs: `TrialConfig.num_threads`, else
  ``OMP_NUM_THREADS``, capped by the usable CPUs. A Ray worker gets
  ``OMP_NUM_THREADS`` = floor of its assigned CPUs, at least 1
  (``ray._private.utils.set_omp_num_threads_if_unset``, Ray 2.60), so a 1-CPU
  trial runs faiss on one thread instead of every core of the node. Outside Ray
  with neither set: the usable CPUs, at most 8 (`study.science.metrics`' rule).
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import faiss
import numpy as np

from study.science import keys as K
from study.science import metrics
from study.science import retrieval as R

__all__ = ["IndexSpec", "IndexSpecError", "Backfill", "DeployedIndex", "evaluate", "exact_topk", "topk_cmc",
           "recall_at_k", "index_threads"]

SEARCH_PARAMS = ("nprobe", "efSearch")
MAX_TRAIN_ROWS = 200_000  # train-split rows an index is trained on (a seeded sample beyond): k-means and PQ
#   need a few hundred points per centroid, and a deployed system trains on a sample too
"""Search parameters an entry may set (faiss.ParameterSpace names)."""
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_EXAMPLES = "Flat, IVF64,Flat, IVF64,PQ16, HNSW32"


class IndexSpecError(ValueError):
    """A bad `index` entry: `key` is the entry's key at fault, `message` one line saying what is allowed."""

    def __init__(self, key: str, message: str) -> None:
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}")


@dataclass(frozen=True)
class IndexSpec:
    """One index kind to evaluate: a `faiss.index_factory` string and its search parameters."""

    factory: str  # e.g. "Flat", "IVF64,Flat", "IVF64,PQ16", "HNSW32"
    name: str = ""  # key fragment of `index/<name>/...`; "" (default): the factory string with ',' -> '_'
    nprobe: int | None = None  # IVF lists visited per query (IVF kinds only; faiss's default 1 when unset)
    efSearch: int | None = None  # HNSW search depth (HNSW kinds only; faiss's default 16 when unset)
    recall_k: int = 10  # k of `recall@k` against exact search

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.factory.replace(",", "_"))

    @classmethod
    def from_dict(cls, entry: Any) -> "IndexSpec":
        """Check keys and types (no dims needed); raise IndexSpecError naming the key."""
        if isinstance(entry, IndexSpec):
            return entry
        if not isinstance(entry, Mapping):
            raise IndexSpecError("factory", f"an entry must be a mapping such as {{factory: IVF64,PQ16, nprobe: 8}}, "
                                            f"got {entry!r}")
        allowed = ("factory", "name", *SEARCH_PARAMS, "recall_k")
        for key in entry:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean `{close[0]}`?)" if close else ""
                raise IndexSpecError(str(key), f"unknown key{hint}; allowed: {', '.join(allowed)}")
        factory = entry.get("factory")
        if not isinstance(factory, str) or not factory.strip():
            raise IndexSpecError("factory", f"required: a faiss.index_factory string (e.g. {_EXAMPLES}), "
                                            f"got {factory!r}")
        spec = cls(factory=factory.strip(), name=entry.get("name", ""))
        name = spec.name
        if not isinstance(name, str) or not _NAME_RE.match(name) or name == K.INDEX_EXACT:
            raise IndexSpecError("name", f"`{name}` is not allowed: use 1-64 of [A-Za-z0-9_.-], not "
                                         f"`{K.INDEX_EXACT}` (give `name` when the factory string has other "
                                         "characters)")
        ints: dict[str, int] = {}
        for key in (*SEARCH_PARAMS, "recall_k"):
            value = entry.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise IndexSpecError(key, f"must be an integer >= 1, got {value!r}")
            ints[key] = value
        return dataclasses.replace(spec, **ints)

    def to_dict(self) -> dict[str, Any]:
        """The entry as a space writes it (unset search parameters left out)."""
        return {k: v for k, v in (("factory", self.factory), ("name", self.name), ("nprobe", self.nprobe),
                                  ("efSearch", self.efSearch), ("recall_k", self.recall_k)) if v is not None}

    def build(self, dim: int, distance: str = "cosine", n_train: int | None = None) -> faiss.Index:
        """The untrained index at `dim` with its search parameters set. Raises IndexSpecError for
        everything a trial would refuse: a string faiss cannot build, PQ sub-quantizers that do not
        divide `dim`, a search parameter the kind lacks, nprobe above nlist, and (with `n_train`
        known) more k-means centroids (IVF lists, 2^nbits PQ codes) than training points."""
        try:
            index = faiss.index_factory(int(dim), self.factory, _metric(distance))
        except RuntimeError as err:
            text = _faiss_error(err)
            if "d % M == 0" in text:
                raise IndexSpecError("factory", f"`{self.factory}`: the PQ sub-quantizer count must divide the dim "
                                                f"{dim}; allowed: PQ<M> with {dim} % M == 0") from None
            raise IndexSpecError("factory", f"faiss cannot build `{self.factory}` at dim {dim} ({text}); allowed: "
                                            f"a faiss.index_factory string, e.g. {_EXAMPLES}") from None
        space = faiss.ParameterSpace()
        for key in SEARCH_PARAMS:
            value = getattr(self, key)
            if value is None:
                continue
            ivf = faiss.try_extract_index_ivf(index)
            if key == "nprobe" and ivf is not None and value > ivf.nlist:
                raise IndexSpecError(key, f"must be <= the {ivf.nlist} IVF lists of `{self.factory}`, got {value}")
            try:
                space.set_index_parameter(index, key, value)
            except RuntimeError:
                usable = [k for k in SEARCH_PARAMS if _accepts(self.factory, dim, distance, k)]
                raise IndexSpecError(key, f"`{self.factory}` has no search parameter `{key}`; allowed for it: "
                                          f"{', '.join(usable) or 'none'}") from None
        _skip_polysemous_training(index)
        need = max(_kmeans_sizes(index), default=0)
        if n_train is not None and need > n_train:
            raise IndexSpecError("factory", f"`{self.factory}` trains k-means with {need} centroids but the train "
                                            f"split has {n_train} points; allowed: at most {n_train} IVF lists and "
                                            f"2^nbits PQ centroids (faiss wants 39 points per centroid)")
        return index


def _metric(distance: str) -> int:
    return faiss.METRIC_INNER_PRODUCT if R._check_distance(distance) == "cosine" else faiss.METRIC_L2


def _faiss_error(err: Exception) -> str:
    """faiss's C++ message without its source location, on one line."""
    text = " ".join(str(err).split())
    for marker in ("Error: ", ": "):
        if marker in text:
            text = text.rsplit(marker, 1)[-1]
            break
    return text.strip()[:200]


def _accepts(factory: str, dim: int, distance: str, key: str) -> bool:
    try:
        faiss.ParameterSpace().set_index_parameter(faiss.index_factory(dim, factory, _metric(distance)), key, 1)
    except RuntimeError:
        return False
    return True


def _skip_polysemous_training(index: faiss.Index) -> None:
    """PQ kinds of the factory train a polysemous code permutation by default: it only serves polysemous
    (Hamming-filtered) search, which is never run here, and leaves every ADC distance unchanged (same ids
    and distances, checked), at 50x the training time of a small IVF-PQ."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    if hasattr(index, "do_polysemous_training"):
        index.do_polysemous_training = False


def _kmeans_sizes(index: faiss.Index) -> list[int]:
    """Centroid counts of the k-means runs training `index` needs (IVF lists, PQ codebooks)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        return _kmeans_sizes(index.index)
    sizes = []
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        sizes.append(int(ivf.nlist))
        index = faiss.downcast_index(ivf)
    if isinstance(index, faiss.IndexHNSW):
        index = faiss.downcast_index(index.storage)
    pq = getattr(index, "pq", None)
    if pq is not None:
        sizes.append(int(pq.ksub))
    return sizes


# ---------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def index_threads(num_threads: int | None) -> Iterator[int]:
    """faiss's OpenMP threads for a block: `num_threads`, else OMP_NUM_THREADS capped by the usable CPUs."""
    n = max(1, int(num_threads)) if num_threads is not None else R._default_threads()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield n
    finally:
        faiss.omp_set_num_threads(before)


# ---------------------------------------------------------------------------
# Search results -> metrics
# ---------------------------------------------------------------------------

def _prepare(x: np.ndarray, distance: str) -> np.ndarray:
    """float32 rows as `study.science.metrics` scores them: normalised for cosine, raw for l2."""
    return np.ascontiguousarray(R._prepare(R._as_features(x, "features"), distance)[0])


def _search(index: faiss.Index, query: np.ndarray, k: int, leave_one_out: bool) -> np.ndarray:
    """Ids [Nq, k] of each query's top k (-1 where fewer were found); with leave-one-out query i's own id
    is dropped from a top k + 1."""
    _, ids = index.search(query, k + 1 if leave_one_out else k)
    if leave_one_out:
        self_hit = ids == np.arange(len(query))[:, None]
        keep = np.argsort(self_hit, axis=1, kind="stable")[:, :k]   # non-self first, order kept
        ids = np.take_along_axis(ids, keep, axis=1)
    return ids


def exact_topk(query, gallery, k: int, *, leave_one_out: bool, distance: str = "cosine") -> np.ndarray:
    """Exact top-k ids by a faiss `IndexFlat` (float32 BLAS scores; exact ties higher id first)."""
    q, g = _prepare(query, distance), _prepare(gallery, distance)
    flat = faiss.IndexFlat(g.shape[1], _metric(distance))
    flat.add(g)
    return _search(flat, q, k, leave_one_out)


def topk_cmc(ids: np.ndarray, query_labels, gallery_labels, topk: Sequence[int], *,
             leave_one_out: bool) -> dict[str, float]:
    """CMC top-k in percent from each query's retrieved ids (best first, -1 = none), with the exact
    path's rule: queries without a positive in the gallery (after leave-one-out) are skipped."""
    ql, gl = np.asarray(query_labels), np.asarray(gallery_labels)
    ks = R._check_topk(topk)
    if ids.shape[1] < max(ks):
        raise ValueError(f"need at least {max(ks)} retrieved ids per query, got {ids.shape[1]}")
    labels, counts = np.unique(gl, return_counts=True)
    at = np.minimum(np.searchsorted(labels, ql), labels.size - 1)
    positives = np.where(labels[at] == ql, counts[at], 0) - (1 if leave_one_out else 0)
    has_pos = positives > 0
    if not has_pos.any():
        raise ValueError("no query has a positive in the gallery")
    hit = (ids >= 0) & (gl[np.maximum(ids, 0)] == ql[:, None])
    first = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, np.iinfo(np.int64).max)[has_pos]
    return {f"top{k}": float(100.0 * np.mean(first <= k)) for k in ks}


def recall_at_k(ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean over queries of |ids[:, :k] & exact_ids[:, :k]| / k, in percent (-1 entries never match)."""
    a, b = ids[:, :k], exact_ids[:, :k]
    common = ((a[:, :, None] == b[:, None, :]) & (a[:, :, None] >= 0)).any(axis=2).sum(axis=1)
    return float(100.0 * np.mean(common / k))


# ---------------------------------------------------------------------------
# A deployed index
# ---------------------------------------------------------------------------

class DeployedIndex:
    """An index of one kind, trained once, holding a gallery whose items can be replaced in place.

    `replace(ids, vectors)` is `remove_ids` + `add_with_ids` on the trained index (IVF natively,
    flat-coded kinds through an `IndexIDMap`); for kinds without removal (`in_place` False) the
    gallery is rebuilt from the trained empty index. Gallery ids are the rows of `fill`'s array.
    Vectors are taken as `prepare` returns them (normalised for cosine).
    """

    def __init__(self, spec: IndexSpec, train: np.ndarray, distance: str) -> None:
        self.spec, self.distance = spec, distance
        empty = spec.build(train.shape[1], distance, n_train=train.shape[0])
        empty.train(_prepare(train, distance))
        self._empty = empty
        self.native_ids = faiss.try_extract_index_ivf(empty) is not None
        self.in_place = self.native_ids or _removable(empty)
        self._index: faiss.Index | None = None
        self._gallery: np.ndarray | None = None

    def _fresh(self) -> faiss.Index:
        index = faiss.clone_index(self._empty)
        return index if self.native_ids else faiss.IndexIDMap(index)

    def fill(self, gallery: np.ndarray) -> None:
        """Put `gallery` (ids 0..N-1) into a fresh copy of the trained index."""
        self._gallery = _prepare(gallery, self.distance).copy()
        self._rebuild()

    def _rebuild(self) -> None:
        self._index = self._fresh()
        self._index.add_with_ids(self._gallery, np.arange(len(self._gallery), dtype=np.int64))

    def replace(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Gallery items `ids` take `vectors` (re-encoded by the trained quantizer)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return
        v = _prepare(vectors, self.distance)
        self._gallery[ids] = v
        if not self.in_place:
            self._rebuild()
            return
        self._index.remove_ids(ids)
        self._index.add_with_ids(v, ids)

    def search(self, query: np.ndarray, k: int, *, leave_one_out: bool) -> np.ndarray:
        """Top-k gallery ids per query (see `_search`)."""
        return _search(self._index, _prepare(query, self.distance), k, leave_one_out)


def _removable(trained_empty: faiss.Index) -> bool:
    """Whether items can be removed from this kind behind an IndexIDMap (HNSW, NSG: no)."""
    probe = faiss.IndexIDMap(faiss.clone_index(trained_empty))
    probe.add_with_ids(np.zeros((1, trained_empty.d), dtype=np.float32), np.zeros(1, dtype=np.int64))
    try:
        probe.remove_ids(np.zeros(1, dtype=np.int64))
    except RuntimeError:
        return False
    return True


# ---------------------------------------------------------------------------
# A trial's index evaluation
# ---------------------------------------------------------------------------

@dataclass
class Backfill:
    """The backfill the index replays: queries, the gallery's start and end sides (eval split), the
    start side's train split (what the index is trained on) and the order of replacement."""

    query: np.ndarray
    start: np.ndarray
    end: np.ndarray
    start_train: np.ndarray
    order: np.ndarray
    points: int


def _counts(n: int, points: int) -> tuple[np.ndarray, np.ndarray]:
    betas = np.linspace(0.0, 1.0, int(points))
    return betas, np.floor(np.round(betas * n, 9)).astype(np.int64)   # as metrics.backfill_curves


def _truncated(x: np.ndarray, m: int) -> np.ndarray:
    return x if x.shape[1] == m else np.ascontiguousarray(x[:, :m])


def evaluate(specs: Sequence[IndexSpec], *, y: np.ndarray, old_train: np.ndarray, old: np.ndarray,
             b_new: np.ndarray | None, f_old: np.ndarray | None,
             backfill: Backfill, topk: Sequence[int] = K.DEFAULT_TOPK, distance: str = "cosine",
             num_threads: int | None = None) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Every `index/...` key of `study.science.keys.index_keys(specs, topk)` and the `index/.../backfill/paper`
    curves (M = top-1 at each beta of `backfill.points`).

    All arrays are the evaluation split's preprocessed features in one order (labels `y`), except
    `old_train`. The F index is the backfill's start: trained on `backfill.start_train`, filled with
    `backfill.start` (F(h_old) whenever `f_old` is given). Rows without their sides (no B or no F) are NaN.
    """
    t0 = time.perf_counter()
    out: dict[str, float] = {}
    curves: dict[str, list[float]] = {}
    y = np.asarray(y)
    queries_old = {"old/old": old, "B/old": b_new, "F/old": f_old}
    queries_f = {"F/F": f_old, "B/F": b_new}
    betas, counts = _counts(len(y), backfill.points)
    _, exact = metrics.backfill_curves(backfill.query, backfill.start, backfill.end, y, {"paper": backfill.order},
                                       points=backfill.points, distance=distance, metric="top1")
    curves[K.index_key(K.INDEX_EXACT, K.CURVE_PAPER)] = [float(v) for v in exact["paper"]]
    out[K.index_key(K.INDEX_EXACT, K.BACKFILL_AUC_PAPER)] = metrics.curve_area(betas, exact["paper"])
    with index_threads(num_threads):
        for spec in specs:
            t1 = time.perf_counter()
            depth = max(max(topk), spec.recall_k)

            def score(index: DeployedIndex, row: str, query: np.ndarray, gallery: np.ndarray) -> None:
                ids = index.search(query, depth, leave_one_out=True)
                res = topk_cmc(ids, y, y, topk, leave_one_out=True)
                ref = exact_topk(query, gallery, spec.recall_k, leave_one_out=True, distance=distance)
                for k in topk:
                    out[K.index_key(spec.name, row, f"top{k}")] = res[f"top{k}"]
                out[K.index_key(spec.name, row, K.recall_stat(spec.recall_k))] = recall_at_k(ids, ref, spec.recall_k)

            olds: dict[int, DeployedIndex] = {}
            for row, query in queries_old.items():
                if query is None:
                    out.update({k: float("nan") for k in K.index_row_keys(spec, row, topk)})
                    continue
                m = min(query.shape[1], old.shape[1])
                if m not in olds:
                    olds[m] = DeployedIndex(spec, _truncated(old_train, m), distance)
                    olds[m].fill(_truncated(old, m))
                score(olds[m], row, _truncated(query, m), _truncated(old, m))

            index = DeployedIndex(spec, backfill.start_train, distance)
            index.fill(backfill.start)
            for row, query in queries_f.items():
                if query is None or f_old is None:
                    out.update({k: float("nan") for k in K.index_row_keys(spec, row, topk)})
                else:
                    score(index, row, query, backfill.start)
            values, done = [], 0
            for c in counts:
                index.replace(backfill.order[done:c], backfill.end[backfill.order[done:c]])
                done = int(c)
                ids = index.search(backfill.query, 1, leave_one_out=True)
                values.append(topk_cmc(ids, y, y, (1,), leave_one_out=True)["top1"])
            curves[K.index_key(spec.name, K.CURVE_PAPER)] = values
            out[K.index_key(spec.name, K.BACKFILL_AUC_PAPER)] = metrics.curve_area(betas, values)
            out[K.index_key(spec.name, K.INDEX_IN_PLACE)] = float(index.in_place)
            out[K.index_key(spec.name, K.INDEX_TIME)] = time.perf_counter() - t1
    out[K.INDEX_TIME_TOTAL] = time.perf_counter() - t0
    return out, curves


# ---------------------------------------------------------------------------
# faiss where it is the faster tool: top-1-only retrieval of large sets
# ---------------------------------------------------------------------------

def top1_leave_one_out(query: np.ndarray, gallery: np.ndarray, labels: Any, *, candidates: int = 8,
                       num_threads: int | None = None) -> float:
    """CMC top-1 (percent), cosine, leave-one-out (query i and gallery item i are the same image, as in
    every row of a trial), through a faiss `IndexFlatIP`, with the exact path's rule: among equal scores
    the lower index ranks first, and queries without a positive are skipped (`study.science.metrics.retrieval`).
    Each query takes its `candidates` best hits; where every returned hit ties with the best one (the tie
    group may go on past them) the query is scored exactly. Scores are faiss's float32 BLAS products: a
    near-tie may round differently from `study.science.metrics`' blocks (float noise, as between two chunkings)."""
    q = _prepare(query, "cosine")
    g = q if gallery is query else _prepare(gallery, "cosine")
    y = np.asarray(labels)
    n = g.shape[0]
    if q.shape != g.shape or y.shape != (n,):
        raise ValueError(f"leave-one-out needs query and gallery of one shape and a label each, got {q.shape}, "
                         f"{g.shape} and {y.shape}")
    flat = faiss.IndexFlatIP(g.shape[1])
    flat.add(g)
    with index_threads(num_threads):
        scores, ids = flat.search(q, min(n, candidates + 1))
    own = (ids == np.arange(n)[:, None]) | (ids < 0)
    scores = np.where(own, -np.inf, scores)
    best = scores.max(axis=1)
    tied = scores == best[:, None]
    top = np.where(tied, ids, n).min(axis=1)  # the lowest index among the best-scoring hits
    open_group = (tied | own).all(axis=1) & (scores.shape[1] < n)
    for r in np.flatnonzero(open_group):  # a tie group that may continue past the returned hits
        row = g @ q[r]
        row[r] = -np.inf
        top[r] = int(np.argmax(row))  # the first maximum: the lowest index
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    has_pos = counts[inverse] > 1
    if not has_pos.any():
        raise ValueError("no query has a positive in the gallery")
    return float(100.0 * np.mean((y[top] == y)[has_pos]))
