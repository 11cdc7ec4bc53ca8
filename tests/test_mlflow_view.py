"""The MLflow UI view (study.mlflow_view): ids as MLflow 3.17 forms them, keys the trials carry."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_EXPERIMENT_TAG_VAL_LENGTH

from study.science import keys as K
from study.mlflow_view import (CELL_TAGS, GROUP_TAGS, MAX_TAG_CHARS, PAIR_VIEW, VIEW_TAG, group_id, group_keys,
                               study_view, view_json, view_state, view_url)
from study.space import load_space
from study.tracking import StudyTracker
from study.tune import trial_tags

SPACES = sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml"))


def grid_tags(path: Path) -> list[dict[str, str]]:
    spec = load_space(path)
    return [trial_tags(c) for c in spec.trial_table().values()] if spec.search.kind == "grid" else []


def test_group_id_is_mlflows_mode_key_value_list() -> None:
    # MLflow 3.17's runs table: groupingValues.map(({mode, groupByData, value}) => `${mode}.${groupByData}.${value || null}`).join(",")
    tags = {"method": "lambda", "lambda": "3", "pair": "a->b", "dataset": "mnist", "seed": "0"}
    keys = ("method", "lambda", "pair", "dataset")
    assert group_id(tags, keys) == "tag.method.lambda,tag.lambda.3,tag.pair.a->b,tag.dataset.mnist"
    assert group_id({**tags, "method": "affine", "lambda": ""}, keys[:3]) == "tag.method.affine,tag.lambda.null,tag.pair.a->b"


def test_groups_add_pair_and_data_set_only_where_they_vary() -> None:
    one = {"method": "lambda", "lambda": "3", "pair": "a->b", "dataset": "d"}
    assert group_keys([one, {**one, "lambda": "12"}]) == ("method", "lambda")
    assert group_keys([one, {**one, "dataset": "e"}]) == ("method", "lambda", "dataset")
    assert group_keys([]) == GROUP_TAGS + CELL_TAGS      # a search: not known in advance


def test_default_grid_collapses_into_one_row_per_pair_method_and_lambda() -> None:
    tags = grid_tags(Path("search_spaces/grid.yaml"))
    assert len(tags) == 16 and all(set(GROUP_TAGS + CELL_TAGS) <= set(t) for t in tags)
    state = json.loads(view_json(tags))
    # 2 pairs x {orthogonal, lambda 3, lambda 12, affine}; the 2 seeds share a row
    assert len(state["groupsExpanded"]) == 8 and not any(state["groupsExpanded"].values())
    assert "tag.method.lambda,tag.lambda.12,tag.pair.mnist_old->mnist_new" in state["groupsExpanded"]
    assert [k["groupByData"] for k in state["groupBy"]["groupByKeys"]] == ["method", "lambda", "pair"]


def reported_keys(path: Path) -> set[str]:
    """The metric keys every trial of the space reports (study.science.keys)."""
    spec = load_space(path)
    if not spec.sequences:
        return set(K.final_keys(["photos"]))
    return set.intersection(*(set(K.sequence_keys(len(s.models), [z.dataset for z in spec.zero_shot_for(s)],
                                                  compose=spec.compose)) for s in spec.sequences))


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_view_names_metrics_every_trial_reports_and_fits_the_tag(path: Path) -> None:
    spec = load_space(path)
    metrics = study_view([len(s.models) for s in spec.sequences])
    state = view_state(grid_tags(path), metrics=metrics)
    charted = {c.get("metricKey") for c in state["compareRunCharts"]} | {
        c[a]["key"] for c in state["compareRunCharts"] for a in ("xaxis", "yaxis") if a in c} | {
        m for c in state["compareRunCharts"] for m in c.get("selectedMetrics", [])}
    shown = {c.removeprefix("metrics.`").removesuffix("`") for c in state["selectedColumns"]}
    assert charted - {None} == shown == set(metrics[:3]) <= reported_keys(path)
    assert (metrics == PAIR_VIEW) == (not spec.sequences)
    assert len(view_json(grid_tags(path), metrics)) <= MAX_TAG_CHARS == MAX_EXPERIMENT_TAG_VAL_LENGTH


def test_a_sequence_study_s_view_shows_the_map_every_trial_reports() -> None:
    view = study_view([4, 3])
    assert view[:3] == ("seq/AM/top1", "seq/zs/2/0/mean", "seq/orth/2/0")
    assert "2 -> 0" in view.title and view_state(metrics=view)["orderByKey"] == "metrics.`seq/orth/2/0`"


def test_groups_start_open_when_closing_them_would_overflow_the_tag() -> None:
    many = [{"method": "lambda", "lambda": str(i), "pair": "a->b", "dataset": "d"} for i in range(800)]
    assert len(json.dumps(view_state(many))) > MAX_TAG_CHARS
    assert json.loads(view_json(many))["groupsExpanded"] == {}


def test_view_url() -> None:
    assert view_url("http://127.0.0.1:5000/", "7") == "http://127.0.0.1:5000/#/experiments/7/runs?viewStateShareKey=lambda-compat"
    assert view_url("http://h:1", "7", charts=True).endswith("viewStateShareKey=lambda-compat&compareRunsMode=CHART")


def test_tracker_tags_the_experiment(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = StudyTracker(uri, "s")
    tracker.set_experiment_tag(VIEW_TAG, view_json())
    exp = MlflowClient(tracking_uri=uri).get_experiment(tracker.experiment_id)
    assert exp.name == "s" and json.loads(exp.tags[VIEW_TAG]) == view_state()
