"""The MLflow UI view of a study: trials grouped by method and lambda (and pair, data set), with charts.

MLflow 3 has no per-experiment default view, but it opens a *shared view* named in the
URL (`?viewStateShareKey=KEY`) from the experiment tag `mlflow.sharedViewState.KEY`
(the tag its own "Share" button writes). :func:`view_state` builds that state; the tracker
stores it on every study's experiment, and :func:`view_url` is the address to open.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, NamedTuple, Sequence

from study.science import keys as K
from study.tracking import ROLE_TAG

VIEW_KEY = "lambda-compat"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
GROUP_TAGS: tuple[str, ...] = ("method", "lambda")   # trial tags (study.tune.trial_tags), always grouped on
CELL_TAGS: tuple[str, ...] = ("pair", "dataset")      # grouped on where the study has more than one
MAX_TAG_CHARS = 20000        # MLflow's limit on an experiment tag's value


class ViewMetrics(NamedTuple):
    """The metrics a view shows and charts, and its chart section's title."""
    headline: str
    zs: str
    orth: str
    title: str


PAIR_VIEW = ViewMetrics(K.row_key("B/old", "top1"), K.ZS_MEAN, K.ORTH, "B/old top-1 and ZS by method and lambda")
TRIALS_ONLY = f"tags.`{ROLE_TAG}` = 'trial'"                 # the study's parent run has no metrics
RUN_NAME = "attributes.`Run Name`"                           # the runs table's column ids
_SECTION = "lc-view"


def study_view(sequence_lengths: Sequence[int] = ()) -> ViewMetrics:
    """A pair study's `PAIR_VIEW`; for a sequence study (the T of each of its sequences) AM top-1
    and the ZS and D(W) of the map from model T-1 to model 0, with the shortest T so that every
    trial reports them."""
    if not sequence_lengths:
        return PAIR_VIEW
    t = min(sequence_lengths)
    return ViewMetrics(K.seq_summary_key("AM", "top1"), K.seq_zs_key(t - 1, 0), K.seq_orth_key(t - 1, 0),
                       f"AM top-1 and ZS of the map {t - 1} -> 0 by method and lambda")


def _chart(uuid: str, kind: str, **fields: Any) -> dict[str, Any]:
    return {"uuid": uuid, "type": kind, "metricSectionId": _SECTION, "deleted": False, "isGenerated": False,
            "runsCountToCompare": 100, **fields}


def _metric(key: str) -> dict[str, str]:
    return {"key": key, "type": "METRIC"}


def group_keys(trials: Sequence[Mapping[str, str]]) -> tuple[str, ...]:
    """The tags to group on: method, lambda, and pair and data set where these trials (none:
    not known in advance) hold more than one."""
    return GROUP_TAGS + tuple(t for t in CELL_TAGS if not trials or len({x.get(t) for x in trials}) > 1)


def group_id(tags: Mapping[str, str], keys: Sequence[str]) -> str:
    """The runs table's id of the group of a trial with these tags (as MLflow 3 forms it)."""
    return ",".join(f"tag.{t}.{tags.get(t) or 'null'}" for t in keys)


def view_state(trials: Sequence[Mapping[str, str]] = (), collapse: bool = True,
               metrics: ViewMetrics = PAIR_VIEW) -> dict[str, Any]:
    """Search facets and UI state of the view, as MLflow's shared-view tag holds them.

    `trials` are the tags of the trials known in advance (a grid): with `collapse` their
    groups start closed, one row of seed means each. `metrics`: what it shows (`study_view`).
    Rows sort by D(W), so within a pair the groups run orthogonal, small lambda, large
    lambda, affine."""
    keys = group_keys(trials)
    b_old, zs, orth, title = metrics
    columns = [f"metrics.`{k}`" for k in (b_old, zs, orth)]
    charts = [
        _chart("lc-bar-bold", "BAR", metricKey=b_old),
        _chart("lc-bar-zs", "BAR", metricKey=zs),
        _chart("lc-scatter-orth-bold", "SCATTER", xaxis=_metric(orth), yaxis=_metric(b_old)),
        _chart("lc-scatter-orth-zs", "SCATTER", xaxis=_metric(orth), yaxis=_metric(zs)),
        _chart("lc-scatter-zs-bold", "SCATTER", xaxis=_metric(zs), yaxis=_metric(b_old)),
        _chart("lc-parallel", "PARALLEL", selectedParams=[], selectedMetrics=[orth, b_old, zs], showAllRuns=False),
    ]
    return {
        "searchFilter": TRIALS_ONLY,
        "orderByKey": f"metrics.`{orth}`",
        "orderByAsc": True,
        "selectedColumns": columns,
        "columnOrder": [RUN_NAME, *columns],
        "columnWidths": {RUN_NAME: 660, **{c: 130 for c in columns}},
        "runsHiddenMode": "SHOW_ALL",
        "groupBy": {"aggregateFunction": "average",
                    "groupByKeys": [{"mode": "tag", "groupByData": t} for t in keys]},
        "groupsExpanded": {group_id(t, keys): False for t in trials} if collapse else {},
        "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True,
        "isAccordionReordered": True,
        "compareRunCharts": charts,
        "runListHidden": True,    # the chart legends name the groups; the charts get the width
        "compareRunSections": [{"uuid": _SECTION, "name": title,
                                "display": True, "isReordered": True, "deleted": False, "isGenerated": False,
                                "columns": 2, "cardHeight": 440}],
    }


def view_json(trials: Sequence[Mapping[str, str]] = (), metrics: ViewMetrics = PAIR_VIEW) -> str:
    """The tag value; groups start open when closing them all would not fit the tag."""
    text = json.dumps(view_state(trials, metrics=metrics), separators=(",", ":"))
    if len(text) <= MAX_TAG_CHARS:
        return text
    return json.dumps(view_state(trials, collapse=False, metrics=metrics), separators=(",", ":"))


def view_url(ui: str, experiment_id: str, charts: bool = False) -> str:
    """The address of the view (its runs table, or its chart view) in the MLflow UI served at
    `ui` (e.g. http://127.0.0.1:5000)."""
    mode = "&compareRunsMode=CHART" if charts else ""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}{mode}"
