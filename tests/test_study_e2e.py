"""End to end on smoke.yaml, offline: the runner, MLflow contents, the report, resume without duplicates."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

import backbones
from study.science.config import TrialConfig
from study.mlflow_view import VIEW_TAG, group_id
from study.report import build_report
from study.tracking import load_trial, param_value

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "search_spaces" / "smoke.yaml"
FAILING_METHOD = ROOT / "tests" / "failing_method"   # a sitecustomize.py that registers method `failing`
N_SMOKE_TRIALS = 3


def run_cli(workdir: Path, *extra: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "study" / "run.py"), "--space", str(SMOKE), "--num-cpus", "2",
           "--storage", str(workdir / "ray_results"), "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}", *extra]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def children(workdir: Path, study: str = "smoke") -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id], filter_string="tags.`lc.role` = 'trial'")


def parents(workdir: Path, study: str = "smoke") -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id], filter_string="tags.`lc.role` = 'study'")


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("e2e")
    proc = run_cli(workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return workdir


def test_experiment_holds_the_ui_view_of_its_trials(finished_study: Path) -> None:
    exp = MlflowClient(tracking_uri=f"sqlite:///{finished_study / 'mlflow.db'}").get_experiment_by_name("smoke")
    state = json.loads(exp.tags[VIEW_TAG])
    # the groups the driver closed in advance are exactly those of the runs it then logged
    keys = [k["groupByData"] for k in state["groupBy"]["groupByKeys"]]
    assert keys == ["method", "lambda"]  # one pair, one data set
    assert set(state["groupsExpanded"]) == {group_id(r.data.tags, keys) for r in children(finished_study)}
    assert len(state["groupsExpanded"]) == N_SMOKE_TRIALS


def test_mlflow_holds_parent_and_finished_children(finished_study: Path) -> None:
    assert len(parents(finished_study)) == 1
    parent = parents(finished_study)[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["lc.space_sha256"]
    runs = children(finished_study)
    assert len(runs) == N_SMOKE_TRIALS
    client = MlflowClient(tracking_uri=f"sqlite:///{finished_study / 'mlflow.db'}")
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert 0 <= run.data.metrics["B/old/top1"] <= 100
        assert {"method", "pair", "dataset", "seed"} <= set(run.data.tags)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapters")}
        assert "adapters/adapters.pt" in artifacts
        assert len(client.get_metric_history(run.info.run_id, "backfill/paper")) == 21
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.csv", "summary.md", "smoke.yaml"} <= parent_files


def _top1_leave_one_out(query: np.ndarray, gallery: np.ndarray, labels: np.ndarray) -> float:
    """Cosine CMC top-1 (%), query i never retrieving gallery item i; ties to the lower index."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    scores = q.astype(np.float64) @ g.T.astype(np.float64)
    np.fill_diagonal(scores, -np.inf)
    return 100.0 * float(np.mean(labels[scores.argmax(1)] == labels))


def test_trial_runs_record_the_full_config_and_rebuild_b_and_f(finished_study: Path) -> None:
    """Every TrialConfig field is a param; config.json sits beside adapters.pt in the Ray checkpoint and
    the run's artifacts; load_trial(run id) gives back the config, and B/old top-1 recomputed from the
    rebuilt B on the cached features equals the logged metric."""
    uri = f"sqlite:///{finished_study / 'mlflow.db'}"
    space = yaml.safe_load(SMOKE.read_text())
    client = MlflowClient(tracking_uri=uri)
    feats = {b: backbones.extract(b, "mnist", "test", progress=False) for b in ("mnist_old", "mnist_new")}
    old, new = (torch.nn.functional.normalize(torch.tensor(np.array(feats[b].x), dtype=torch.float32), dim=1)
                for b in ("mnist_old", "mnist_new"))   # the smoke space keeps normalize: true, center: false
    labels = np.asarray(feats["mnist_old"].y)
    runs = children(finished_study)
    for run in runs:
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapters")}
        assert {"adapters/adapters.pt", "adapters/config.json"} <= artifacts
        config, B, F = load_trial(run.info.run_id, uri)
        params = run.data.params
        assert {k: params[k] for k in TrialConfig.__dataclass_fields__} == {k: param_value(v) for k, v in config.to_dict().items()}
        assert config.method == run.data.tags["method"] and config.seed == space["seeds"][0]
        assert config.epochs == space["train"]["epochs"] and config.eval_every == space["train"]["eval_every"]
        assert config.lam == (float(space["lambdas"][0]) if config.method == "lambda" else None)
        assert params["lam"] == ("1.0" if config.method == "lambda" else "") and params["lr"] == "0.001"
        assert params["pair"] == "mnist_old->mnist_new" and params["eval_split"] == "test"
        with torch.no_grad():
            b_new = B(new).numpy()[:, :old.shape[1]]   # truncated to min(d, n), the paper's rule
        assert _top1_leave_one_out(b_new, old.numpy(), labels) == pytest.approx(run.data.metrics["B/old/top1"], abs=1e-9)
        assert F is not None and F.in_features == old.shape[1] and F.out_features == new.shape[1]
    checkpoints = list((finished_study / "ray_results" / "smoke").glob("*/checkpoint_*/adapters.pt"))
    assert len(checkpoints) == len(runs) and all((c.parent / "config.json").is_file() for c in checkpoints)


def test_summary_table_has_expected_rows(finished_study: Path, tmp_path: Path) -> None:
    report = build_report(f"sqlite:///{finished_study / 'mlflow.db'}", "smoke", tmp_path)
    assert [(r["method"], r["lambda"]) for r in report.rows] == [("orthogonal", ""), ("lambda", "1"), ("affine", "")]
    orth = report.rows[0]
    assert orth["zs/mean"][0] == pytest.approx(0.0, abs=1e-9)   # orthogonal B keeps the new space
    assert orth["orth/B"][0] == pytest.approx(0.0, abs=1e-3)
    lam, affine = report.rows[1], report.rows[2]
    assert orth["orth/B"][0] < lam["orth/B"][0] < affine["orth/B"][0]   # lambda = 1 binds below affine's deviation


def test_backfill_plot_names_the_configured_metric(finished_study: Path) -> None:
    from types import SimpleNamespace

    from study.report import backfill_ylabel
    assert backfill_ylabel(children(finished_study)) == f"{TrialConfig.backfill_metric} (%)" == "mAP (%)"
    runs = [SimpleNamespace(data=SimpleNamespace(params={"backfill_metric": m})) for m in ("top1", "mAP", "top1")]
    assert backfill_ylabel(runs) == "mAP / top1 (%)"


def test_rerun_of_a_finished_study_adds_nothing(finished_study: Path) -> None:
    proc = run_cli(finished_study)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = Counter(r.info.run_name for r in children(finished_study))
    assert len(names) == N_SMOKE_TRIALS and set(names.values()) == {1}
    assert len(parents(finished_study)) == 1


def test_failed_trial_is_a_failed_child_and_exit_code_3(tmp_path: Path) -> None:
    """Method `failing` (tests/failing_method/sitecustomize.py: registered in the driver and in the Ray
    workers through PYTHONPATH) raises in its loss; the study's other trials are untouched."""
    space = yaml.safe_load(SMOKE.read_text())
    space["methods"] = ["orthogonal", "failing", "lambda"]
    path = tmp_path / "smoke_failing.yaml"
    path.write_text(yaml.safe_dump(space))
    pythonpath = os.pathsep.join(p for p in (str(FAILING_METHOD), str(ROOT), os.environ.get("PYTHONPATH")) if p)
    proc = run_cli(tmp_path, "--space", str(path), env={"PYTHONPATH": pythonpath})
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "finished with failures" in proc.stderr
    status = {r.data.tags["method"]: r for r in children(tmp_path)}
    assert status["failing"].info.status == "FAILED"
    assert "injected fault" in status["failing"].data.tags["lc.error"]
    assert status["orthogonal"].info.status == status["lambda"].info.status == "FINISHED"


def _start(workdir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "study" / "run.py"), "--space", str(SMOKE), "--num-cpus", "2",
           "--storage", str(workdir / "ray_results"), "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}", *extra]
    # Output to files, not pipes: an unread pipe would block the driver once it fills.
    with open(workdir / "driver.out", "a") as out, open(workdir / "driver.err", "w") as err:
        return subprocess.Popen(cmd, cwd=workdir, stdout=out, stderr=err, start_new_session=True)


def _wait_for(workdir: Path, proc: subprocess.Popen, n_finished: int, timeout: float = 300,
              study: str = "smoke") -> bool:
    """Wait until `n_finished` trials are FINISHED in MLflow (0: until the study run exists).
    False when the study ended first (the moment passed)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if n_finished == 0 and parents(workdir, study):
                return True
            if n_finished and sum(r.info.status == "FINISHED" for r in children(workdir, study)) >= n_finished:
                return True
        except Exception:  # noqa: BLE001 - database or experiment not created yet
            pass
        time.sleep(0.3)
    pytest.fail(f"{n_finished} trial(s) did not finish within {timeout} s")


def test_killed_three_times_and_interrupted_then_resumed(tmp_path: Path, finished_study: Path) -> None:
    """SIGKILL at study start, after two trials and after the last one; Ctrl-C after the first:
    resuming loses nothing, doubles nothing, and gives the uninterrupted results."""
    for moment, sig in ((0, signal.SIGKILL), (1, signal.SIGINT), (2, signal.SIGKILL), (N_SMOKE_TRIALS, signal.SIGKILL)):
        proc = _start(tmp_path)
        try:
            reached = _wait_for(tmp_path, proc, moment)
            if sig == signal.SIGINT:
                assert reached, "the study ended before Ctrl-C"
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=120)
                err = (tmp_path / "driver.err").read_text()
                assert proc.returncode == 130, err[-2000:]
                assert "rerun the same command to resume" in err
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    done = run_cli(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = children(tmp_path)
    names = Counter(r.info.run_name for r in runs)
    assert len(runs) == N_SMOKE_TRIALS and set(names.values()) == {1}, names
    assert all(r.info.status == "FINISHED" for r in runs)
    assert [p.info.status for p in parents(tmp_path)] == ["FINISHED"]
    # Same results as the uninterrupted study (training is deterministic on the CPU for a seed).
    reference = {r.info.run_name: r.data.metrics for r in children(finished_study)}
    for run in runs:
        for key in ("B/old/top1", "B/B/top1", "zs/mean", "backfill/auc_paper"):
            assert run.data.metrics[key] == pytest.approx(reference[run.info.run_name][key], abs=1e-6)


def _small_optuna_space(tmp_path: Path, n_trials: int) -> tuple[dict, Path]:
    space = yaml.safe_load((ROOT / "search_spaces" / "optuna.yaml").read_text())
    space["search"]["n_trials"] = n_trials
    space["train"] = {"epochs": 2}
    path = tmp_path / "optuna_small.yaml"
    path.write_text(yaml.safe_dump(space))
    return space, path


def _optuna_study(workdir: Path, space: dict) -> Any:
    """The one Optuna study of the space's one cell, from optuna.db beside mlflow.db."""
    import optuna
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    assert names == [f"{space['name']}__mnist_old-to-mnist_new__mnist__s0"]
    return optuna.load_study(study_name=names[0], storage=storage)


def _check_optuna_matches_mlflow(workdir: Path, space: dict, n_trials: int) -> None:
    """The Optuna study holds n_trials COMPLETE trials, each with the sampled lambda/alpha and the
    objectives of its MLflow run; any other trial (asked by a killed driver) is FAIL, none RUNNING."""
    import optuna
    study = _optuna_study(workdir, space)
    assert study.metric_names == space["search"]["metrics"]
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MAXIMIZE"]
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == n_trials
    assert {t.state for t in study.get_trials()} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL}
    everything = children(workdir, space["name"])
    runs = [r for r in everything if r.info.status == "FINISHED"]
    assert len(runs) == n_trials
    # a trial the killed driver had started but Ray's saved state did not know: its run is closed KILLED,
    # its Optuna trial FAIL, and the resumed search asks for a new one
    lost = [r for r in everything if r.info.status != "FINISHED"]
    assert all(r.info.status == "KILLED" for r in lost), [r.info.status for r in lost]
    assert len(lost) <= len(study.get_trials(states=(optuna.trial.TrialState.FAIL,)))
    by_lam = {float(r.data.params["lam"]): r for r in runs}
    for t in trials:
        run = by_lam[t.params["lam"]]
        assert float(run.data.params["alpha"]) == t.params["alpha"]
        assert t.values == [run.data.metrics[m] for m in space["search"]["metrics"]]


def test_killed_optuna_search_resumes_its_optuna_study(tmp_path: Path) -> None:
    """An Optuna search, SIGKILLed after its first trial: the rerun continues the same Optuna study in
    optuna.db beside mlflow.db (its first trial kept, n_trials in all, each logged once in MLflow with
    the sampled lambda/alpha), and a rerun of the finished search adds nothing."""
    space, path = _small_optuna_space(tmp_path, 3)
    proc = _start(tmp_path, "--space", str(path), "--max-concurrent", "1")
    try:
        assert _wait_for(tmp_path, proc, 1, study=space["name"]), "the search ended before the kill"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    import optuna
    complete = (optuna.trial.TrialState.COMPLETE,)
    first = {t.number: t.params for t in _optuna_study(tmp_path, space).get_trials(states=complete)}
    assert first, "no Optuna trial had finished before the kill"
    for _ in range(2):
        done = run_cli(tmp_path, "--space", str(path), "--max-concurrent", "1")
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert f"optuna-dashboard sqlite:///{tmp_path / 'optuna.db'}" in done.stdout
        _check_optuna_matches_mlflow(tmp_path, space, 3)
        trials = {t.number: t.params for t in _optuna_study(tmp_path, space).get_trials(states=complete)}
        assert all(trials[n] == params for n, params in first.items())   # kept, COMPLETE
    lo, hi = space["search"]["lambda"]
    lams = [float(r.data.params["lam"]) for r in children(tmp_path, space["name"]) if r.info.status == "FINISHED"]
    assert all(lo <= lam <= hi for lam in lams) and len(set(lams)) == 3   # sampled, not a grid
