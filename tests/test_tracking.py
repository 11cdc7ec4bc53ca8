"""study.tracking: how params are written, a trial run's lifecycle, and rebuilding a trial from its run."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from study.science import keys as K
from study import tracking as T
from study.science.config import TrialConfig
from study.tracking import StudyTracker, load_trial, param_value
from study.science.trial import TrialResult, save_checkpoint


def test_param_value_renders_each_kind_one_way() -> None:
    assert param_value(None) == ""
    assert param_value(1e-3) == "0.001" and param_value(30.0) == "30.0" and param_value(40) == "40"
    assert param_value(math.inf) == "inf"
    assert param_value(True) == "true" and param_value(False) == "false"
    assert param_value((1, 5)) == param_value([1, 5]) == "[1, 5]"
    assert param_value([0.0, math.inf]) == '[0.0, "inf"]'
    assert param_value([{"factory": "IVF64,Flat", "nprobe": 8}]) == '[{"factory": "IVF64,Flat", "nprobe": 8}]'
    long = param_value("x" * (MAX_PARAM_VAL_LENGTH + 10))
    assert len(long) == MAX_PARAM_VAL_LENGTH and long.endswith("...")


def _checkpoint(folder: Path, config: TrialConfig, n: int = 6, d: int = 4) -> TrialResult:
    gen = torch.Generator().manual_seed(0)
    state = {"B.weight": torch.randn(n, n, generator=gen), "B.bias": torch.randn(n, generator=gen),
             "F.weight": torch.randn(n, d, generator=gen), "F.bias": torch.randn(n, generator=gen)}
    result = TrialResult(metrics={}, state=state, curves={K.CURVE_PAPER: [1.0, 2.0, 3.0]}, config=config.to_dict())
    save_checkpoint(result, folder)
    return result


def test_record_trial_lifecycle_and_load_trial(tmp_path: Path) -> None:
    """Open, log, finish (each stage once, twice is a no-op), then rebuild config, B and F from the run id."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = StudyTracker(uri, "rec")
    tracker.start_study(params={"seeds": [0, 1]}, tags={})
    config = TrialConfig.from_dict({"method": "lambda", "lam": math.inf, "topk": [1, 5], "lr": 0.01})
    folder = tmp_path / "ckpt"
    folder.mkdir()
    result = _checkpoint(folder, config)
    params = {"pair": "a->b", **config.to_dict()}
    args = ("t0", "trial0", params, {T.METHOD_TAG: "lambda"})
    tracker.record_trial(*args)
    tracker.record_trial(*args, metrics={"B/old/top1": 50.0}, step=1)
    tracker.record_trial(*args, metrics={"B/old/top1": 60.0}, step=2, final=True,
                         curves=result.curves, folder=folder)
    tracker.record_trial(*args, metrics={"B/old/top1": 99.0}, step=3, final=True)   # finished: nothing changes
    runs = tracker.client.search_runs([tracker._experiment()], filter_string=f"tags.`{T.ROLE_TAG}` = '{T.TRIAL_ROLE}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags[T.FINAL_TAG] == "1"
    assert [m.value for m in tracker.client.get_metric_history(run.info.run_id, "B/old/top1")] == [50.0, 60.0]
    assert [m.value for m in tracker.client.get_metric_history(run.info.run_id, K.CURVE_PAPER)] == [1.0, 2.0, 3.0]
    assert run.data.params["lam"] == "inf" and run.data.params["lr"] == "0.01" and run.data.params["topk"] == "[1, 5]"
    assert run.data.params["num_threads"] == "" and run.data.params["normalize"] == "true"
    assert set(TrialConfig.__dataclass_fields__) <= set(run.data.params)

    # the checkpoint is a file beside the database (mlartifacts/<study>), not under another root
    assert (tmp_path / "mlartifacts" / "rec" / run.info.run_id / "artifacts" / T.ADAPTERS_DIR / K.ADAPTERS_FILE).is_file()

    loaded, B, F = load_trial(run.info.run_id, uri)
    assert loaded == config
    x = torch.randn(3, 6)
    h = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.allclose(B(x), x @ result.state["B.weight"].T + result.state["B.bias"])
        assert torch.allclose(F(h), h @ result.state["F.weight"].T + result.state["F.bias"])


def test_load_trial_of_a_run_without_checkpoint_fails(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = StudyTracker(uri, "bare")
    tracker.start_study(params={}, tags={})
    tracker.record_trial("t0", "trial0", {}, {}, final=False)
    run_id = tracker._runs["t0"]
    with pytest.raises(LookupError, match=f"run {run_id} .* has no adapters/config.json"):
        load_trial(run_id, uri)


def test_runner_modules_name_tags_only_through_tracking_constants() -> None:
    """The MLflow tag names (lc.*, mlflow.*) are written once, in study/tracking.py."""
    study = Path(__file__).resolve().parents[1] / "study"
    tags = {v for k, v in vars(T).items() if k.endswith(("_TAG", "_PREFIX")) and v.startswith(("lc.", "mlflow."))}
    assert {T.ERROR_TAG, T.FINAL_TAG, T.ROLE_TAG, T.PARENT_TAG, T.SPACE_SHA_TAG} <= tags
    for path in study.glob("*.py"):
        if path.name != "tracking.py":
            text = path.read_text()
            assert not [tag for tag in tags if f'"{tag}' in text or f"'{tag}" in text], path.name


def test_sqlite_path_of_absolute_and_relative_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert T.sqlite_path(T.default_tracking_uri(tmp_path)) == tmp_path / "mlflow.db"
    assert T.sqlite_path("sqlite:////abs/dir/m.db") == Path("/abs/dir/m.db")
    assert T.sqlite_path("sqlite:///rel/m.db") == tmp_path / "rel" / "m.db"
    assert T.sqlite_path("http://127.0.0.1:5000") is None
    assert T.artifact_location("sqlite:////abs/dir/m.db", "s") == "file:///abs/dir/mlartifacts/s"
    assert T.artifact_location("http://127.0.0.1:5000", "s") is None
