"""The metric keys of a trial: the one documented place for their names.

These strings become MLflow metric keys and report columns, so they are stable.
All retrieval values are percentages in [0, 100]; all are floats; a value that
is not defined for a method is NaN (never missing), so every trial of a study
has the same columns.

Retrieval rows (query side / gallery side, the paper's vocabulary), each as
`<row>/top1`, `<row>/top5` (one key per k of `TrialConfig.topk`) and `<row>/mAP`,
computed leave-one-out on the evaluation split (the same images are queries
and gallery; a query never retrieves its own image, even across models):

    old/old   h_old vs h_old                       (always defined)
    new/new   h_new vs h_new                       (always defined)
    new/old   h_new vs h_old, no adapter           (truncated to min(d, n) when d != n)
    F/old     F(h_old) vs h_old                    NaN without F ("independent")
    F/F       F(h_old) vs F(h_old)                 NaN without F
    B/F       B(h_new) vs F(h_old)                 NaN without B or F
    B/old     B(h_new) vs h_old                    NaN without B
    B/B       B(h_new) vs B(h_new)                 NaN without B

All rows use the trial's preprocessed features (L2-normalised by default,
centred with `center=True`) and `TrialConfig.distance` (cosine by default).
Whenever a new-side (n-dim) vector meets an old feature (d-dim) and d != n, both
are truncated to their first min(d, n) coordinates (the paper's rule, applied
to every comparison with old features, raw new/old included). For
"fct", B is the identity, so B rows are the new features as they are (B/B =
new/new, B/old = new/old, B/F = new queries against the F-mapped old gallery).

Other final keys:

    ecc/new/old, ecc/B/old          1.0 when <row>/top1 > old/old/top1 (strict >), else 0.0; NaN if row NaN
                                    (strict: a model that only matches old/old has gained nothing)
    ecc_margin/new/old, .../B/old   <row>/top1 - old/old/top1 (percentage points)
    gain/B/B                        B/B/top1 - new/new/top1
    orth/B                          ||W^T W - I||_F of the trained B (~0 for orthogonal, 0 for fct's identity,
                                    NaN for "independent")
    zs/<set>                        top1(B(new)/B(new)) - top1(new/new) on zero-shot set <set>, each
                                    leave-one-out within that set (NaN without B)
    zs/<set>/new_top1, zs/<set>/B_top1   the two top-1 values behind it
    zs/mean                         mean of zs/<set> over the sets (NaN without sets or without B)
    backfill/auc_paper              area under M(beta), beta in [0, 1], gallery backfilled in the paper's
                                    order (largest distance of F(h_old) to its class mean first); M is
                                    `TrialConfig.backfill_metric` (default mAP), so the unit is percent
    backfill/auc_random             the same in a random order (FCT's), seeded by the config's seed
                                    (for "independent": queries h_new, h_old gallery turning into h_new)
    loss/total, loss/forward, loss/backward, loss/contrastive, loss/reg
                                    means over the last epoch's samples (NaN for "independent");
                                    forward = L_F (for fct: MSE of F(h_old) to h_new), backward = L_B,
                                    contrastive = L_C, reg = the regularizer before its weight
    time/train_s, time/eval_s       wall-clock seconds: training (with its per-epoch cheap evals), final eval
    epoch                           number of epochs trained (0 for "independent")

`TrialResult.curves` holds lists: `backfill/beta`, `backfill/paper`,
`backfill/random` (M at each beta), the five `loss/*` per epoch, and the cheap
eval keys with `eval_epoch` at each cheap evaluation.

Index keys (only with `TrialConfig.index`, one set per index kind `<name>`; protocol in
`study.science.index_eval`): the gallery sits in a faiss index trained on old train-split features.

    index/<name>/<row>/top1, .../top5    CMC top-k from the index's top-k, leave-one-out, for <row> in
                                         INDEX_ROWS: old/old, B/old, F/old in the old index (trained on
                                         h_old train, filled with h_old); F/F, B/F in the F index (trained
                                         on F(h_old) train, filled with F(h_old)); NaN without B / F
    index/<name>/<row>/recall<k>         recall@k: share (percent) of the exact top-k (same query side,
                                         same vectors) that the index returns in its top-k; k = recall_k
                                         (spelt `recall10`: MLflow keys cannot hold '@')
    index/<name>/backfill/auc_paper      area under top-1(beta) while the F index is backfilled in place
                                         with B(h_new) in the paper's order (queries B(h_new))
    index/<name>/backfill/in_place       1.0: remove_ids + add_with_ids; 0.0: rebuilt per step (HNSW)
    index/<name>/time_s                  wall-clock seconds of that kind (train, fill, search, backfill)
    index/exact/backfill/auc_paper       the same backfill scored by exact search (top-1), for comparison
    time/index_s                         all of the index evaluation

`TrialResult.curves` adds `index/<name>/backfill/paper` and `index/exact/backfill/paper` (top-1 at
each `backfill/beta`).

Per-epoch keys (what `on_epoch(epoch, metrics)` receives, what Ray Tune sees):
`epoch`, the five `loss/*` keys (means over that epoch) and the cheap eval
keys `B/old/top1`, `B/B/top1`, `B/F/top1`, `orth/B` and `zs/mean`, recomputed every `eval_every`
epochs (and at the first and last epoch) and carried forward in between so
that every report has them; `eval_epoch` says when they were computed.

Keys of a sequence trial (`study.science.sequence.run_sequence_trial`), models 0 (oldest) .. T-1:

    seq/<stat>/<i>/<j>          M[i][j], stat top1 or mAP, for j <= i: model i's eval queries, mapped by
                                B_{j+1} o ... o B_i (`compose: chain`), against model j's eval gallery,
                                leave-one-out; M[i][i] is model i's own x/x retrieval
    seq/AC/<stat>, seq/AM/<stat>  `metrics.ac_am` of that matrix: AC share of i > j with M[i][j] > M[j][j]
                                (strict, in [0, 1]); AM mean of the lower triangle (percent)
    seq/zs/<i>/<j>/<set>        zero-shot retention of the map i -> j on model i's features of <set>:
                                top1(map(x)/map(x)) - top1(x/x); seq/zs/<i>/<j>/mean their mean
    seq/orth/<i>/<j>            ||W^T W - I||_F of the map's matrix W (the smaller Gram when W is not
                                square); j = i - 1 is B_i itself
    seq/direct/...              with `compose: direct`: the same keys (matrix, AC/AM, zs, orth) with one
                                adapter trained straight from i to j for j < i - 1 (consecutive entries
                                are the chain's B_i)
    step<t>/<key>               every pair key of the update t-1 -> t (`final_keys`), t = 1 .. T-1
    time/sequence_s             wall-clock seconds of the whole sequence trial

Where dims differ, B_i's n_i-dim output is cut to model i-1's first n_{i-1} coordinates (the
paper's rule) or zero-padded to them, before the next map.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:
    from study.science.config import TrialConfig

ROWS: tuple[str, ...] = ("old/old", "new/new", "new/old", "F/old", "F/F", "B/F", "B/old", "B/B")
"""Retrieval rows, named query/gallery."""

DEFAULT_TOPK: tuple[int, ...] = (1, 5)

ECC_ROWS: tuple[str, ...] = ("new/old", "B/old")
"""Rows checked against old/old by the empirical compatibility criterion."""

LOSS_KEYS: tuple[str, ...] = ("loss/total", "loss/forward", "loss/backward", "loss/contrastive", "loss/reg")
TIME_KEYS: tuple[str, ...] = ("time/train_s", "time/eval_s")
EPOCH = "epoch"
EVAL_EPOCH = "eval_epoch"
ORTH = "orth/B"
GAIN = "gain/B/B"
ZS_MEAN = "zs/mean"
BACKFILL_AUC_PAPER = "backfill/auc_paper"
BACKFILL_AUC_RANDOM = "backfill/auc_random"
BACKFILL_KEYS: tuple[str, ...] = (BACKFILL_AUC_PAPER, BACKFILL_AUC_RANDOM)

CHEAP_EVAL_ROWS: tuple[str, ...] = ("B/old", "B/B", "B/F")
CHEAP_EVAL_KEYS: tuple[str, ...] = (*(f"{r}/top1" for r in CHEAP_EVAL_ROWS), ORTH, ZS_MEAN)
"""The cheap per-epoch evaluation: three rows' top-1, D(W) of B and the mean zero-shot retention
(the convergence curves, `docs/convergence.md`)."""
EPOCH_KEYS: tuple[str, ...] = (EPOCH, *LOSS_KEYS, *CHEAP_EVAL_KEYS, EVAL_EPOCH)
"""Keys of every `on_epoch` report."""

# curves (TrialResult.curves): lists of floats
CURVE_BETA = "backfill/beta"
CURVE_PAPER = "backfill/paper"
CURVE_RANDOM = "backfill/random"


INDEX_ROWS: tuple[str, ...] = ("old/old", "B/old", "F/old", "F/F", "B/F")
"""Rows scored inside each faiss index (see the module docstring)."""
INDEX_EXACT = "exact"
"""Reserved index name: the exact-search reference of the index backfill curve."""
INDEX_IN_PLACE = "backfill/in_place"
INDEX_TIME = "time_s"
INDEX_TIME_TOTAL = "time/index_s"


RECALL = "recall"


def recall_stat(k: int) -> str:
    """`recall_stat(10) == "recall10"`: recall@10 (MLflow keys cannot hold '@')."""
    return f"{RECALL}{k}"


def index_key(name: str, *parts: str) -> str:
    """`index_key("IVF64_PQ16", "B/old", "top1") == "index/IVF64_PQ16/B/old/top1"`."""
    return "/".join(("index", name, *parts))


def index_row_keys(spec: Any, row: str, topk: Sequence[int] = DEFAULT_TOPK) -> list[str]:
    """The keys of one row of one index kind (`spec` has `.name` and `.recall_k`)."""
    return [index_key(spec.name, row, s) for s in (*(f"top{k}" for k in topk), recall_stat(spec.recall_k))]


def index_keys(specs: Iterable[Any], topk: Sequence[int] = DEFAULT_TOPK) -> list[str]:
    """Every `index/...` key of a trial evaluating these index kinds (none: no keys)."""
    specs = list(specs)
    if not specs:
        return []
    out: list[str] = []
    for spec in specs:
        for row in INDEX_ROWS:
            out += index_row_keys(spec, row, topk)
        out += [index_key(spec.name, k) for k in (BACKFILL_AUC_PAPER, INDEX_IN_PLACE, INDEX_TIME)]
    return out + [index_key(INDEX_EXACT, BACKFILL_AUC_PAPER), INDEX_TIME_TOTAL]


def stat_names(topk: Sequence[int] = DEFAULT_TOPK) -> tuple[str, ...]:
    """Per-row statistics: top<k> for each k, then mAP."""
    return (*(f"top{k}" for k in topk), "mAP")


def row_key(row: str, stat: str) -> str:
    """`row_key("B/old", "top1") == "B/old/top1"`."""
    if row not in ROWS:
        raise ValueError(f"unknown row {row!r}; rows: {', '.join(ROWS)}")
    return f"{row}/{stat}"


def row_keys(topk: Sequence[int] = DEFAULT_TOPK) -> list[str]:
    """Every `<row>/<stat>` key, rows in ROWS order."""
    return [row_key(r, s) for r in ROWS for s in stat_names(topk)]


def ecc_key(row: str) -> str:
    return f"ecc/{row}"


def ecc_margin_key(row: str) -> str:
    return f"ecc_margin/{row}"


def check_zero_shot_name(name: str) -> str:
    """A zero-shot set name must be a non-empty key fragment without '/' and not 'mean'."""
    if not isinstance(name, str) or not name or "/" in name or name == "mean":
        raise ValueError(
            f"zero-shot set name {name!r} is not allowed: use a non-empty name without '/' other than 'mean'"
        )
    return name


def zs_keys(names: Iterable[str]) -> list[str]:
    """Zero-shot keys for the given set names, then `zs/mean`."""
    out: list[str] = []
    for name in names:
        check_zero_shot_name(name)
        out += [f"zs/{name}", f"zs/{name}/new_top1", f"zs/{name}/B_top1"]
    return out + [ZS_MEAN]


def final_keys(zero_shot: Iterable[str] = (), topk: Sequence[int] = DEFAULT_TOPK) -> list[str]:
    """Every key of `TrialResult.metrics` for these zero-shot set names."""
    return [
        *row_keys(topk),
        *(ecc_key(r) for r in ECC_ROWS),
        *(ecc_margin_key(r) for r in ECC_ROWS),
        GAIN,
        ORTH,
        *zs_keys(zero_shot),
        *BACKFILL_KEYS,
        *LOSS_KEYS,
        *TIME_KEYS,
        EPOCH,
    ]


def metric_keys(zero_shot: Iterable[str], config: TrialConfig) -> list[str]:
    """Every key a trial of `config` with these zero-shot set names reports (final, then per-epoch only):
    what a space's `optimize.metric` and `search.metrics` may name."""
    final = final_keys(zero_shot, config.topk) + index_keys(config.index, config.topk)
    return final + [k for k in EPOCH_KEYS if k not in final]


ROW_KEYS: tuple[str, ...] = tuple(row_keys())
FINAL_KEYS: tuple[str, ...] = tuple(final_keys())
"""Final keys with the default topk and no zero-shot set (`final_keys(names)` adds `zs/<name>/...`)."""

# Files of a trial's checkpoint (`study.science.trial.save_checkpoint`), the same under its MLflow run's
# `adapters/` artifacts.
ADAPTERS_FILE = "adapters.pt"   # the adapters' tensors (`study.science.adapters.export_state`)
CONFIG_FILE = "config.json"     # the resolved TrialConfig (`TrialConfig.to_dict`)
CURVES_FILE = "curves.json"     # `TrialResult.curves`

# ---------------------------------------------------------------------------
# Sequence trials (`study.science.sequence`): T models, oldest first, one adapter set per update
# ---------------------------------------------------------------------------
SEQ_STATS: tuple[str, ...] = ("top1", "mAP")
SEQ_TIME = "time/sequence_s"
COMPOSE_MODES: tuple[str, ...] = ("chain", "direct")


def seq_matrix_key(stat: str, i: int, j: int, compose: str = "chain") -> str:
    """`seq_matrix_key("top1", 2, 0) == "seq/top1/2/0"`; with compose "direct": `seq/direct/top1/2/0`."""
    return "/".join((_seq_prefix(compose), stat, str(i), str(j)))


def seq_summary_key(name: str, stat: str, compose: str = "chain") -> str:
    """`seq_summary_key("AC", "top1") == "seq/AC/top1"` (name AC or AM)."""
    return "/".join((_seq_prefix(compose), name, stat))


def seq_zs_key(i: int, j: int, name: str = "mean", compose: str = "chain") -> str:
    return "/".join((_seq_prefix(compose), "zs", str(i), str(j), name))


def seq_orth_key(i: int, j: int, compose: str = "chain") -> str:
    return "/".join((_seq_prefix(compose), "orth", str(i), str(j)))


def step_key(t: int, key: str) -> str:
    """`step_key(1, "B/old/top1") == "step1/B/old/top1"`: a pair key of the update t-1 -> t."""
    return f"step{t}/{key}"


def _seq_prefix(compose: str) -> str:
    if compose not in COMPOSE_MODES:
        raise ValueError(f"unknown compose {compose!r}; allowed: {', '.join(COMPOSE_MODES)}")
    return "seq" if compose == "chain" else "seq/direct"


def _seq_compose_keys(t: int, zero_shot: Sequence[str], compose: str) -> list[str]:
    lower = [(i, j) for i in range(t) for j in range(i)]
    out = [seq_matrix_key(s, i, j, compose) for s in SEQ_STATS for i in range(t) for j in range(i + 1)]
    out += [seq_summary_key(name, s, compose) for name in ("AC", "AM") for s in SEQ_STATS]
    for i, j in lower:
        out += [seq_zs_key(i, j, z, compose) for z in zero_shot] + [seq_zs_key(i, j, compose=compose)]
    return out + [seq_orth_key(i, j, compose) for i, j in lower]


def sequence_keys(t: int, zero_shot: Iterable[str] = (), topk: Sequence[int] = DEFAULT_TOPK,
                  compose: str = "chain") -> list[str]:
    """Every key of a sequence trial of `t` models with these zero-shot set names."""
    zs = [check_zero_shot_name(z) for z in zero_shot]
    out = _seq_compose_keys(t, zs, "chain")
    if compose == "direct":
        out += _seq_compose_keys(t, zs, "direct")
    pair = final_keys(zs, topk)
    out += [step_key(s, k) for s in range(1, t) for k in pair]
    return out + [SEQ_TIME]
