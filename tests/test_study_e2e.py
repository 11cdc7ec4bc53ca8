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

import pytest
import yaml
from mlflow.tracking import MlflowClient

from study.mlflow_view import VIEW_TAG, group_id
from study.report import build_report

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


def test_summary_table_has_expected_rows(finished_study: Path, tmp_path: Path) -> None:
    report = build_report(f"sqlite:///{finished_study / 'mlflow.db'}", "smoke", tmp_path)
    assert [(r["method"], r["lambda"]) for r in report.rows] == [("orthogonal", ""), ("lambda", "1"), ("affine", "")]
    orth = report.rows[0]
    assert orth["zs/mean"][0] == pytest.approx(0.0, abs=1e-9)   # orthogonal B keeps the new space
    assert orth["orth/B"][0] == pytest.approx(0.0, abs=1e-3)
    lam, affine = report.rows[1], report.rows[2]
    assert orth["orth/B"][0] < lam["orth/B"][0] < affine["orth/B"][0]   # lambda = 1 binds below affine's deviation


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


def _start(workdir: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "study" / "run.py"), "--space", str(SMOKE), "--num-cpus", "2",
           "--storage", str(workdir / "ray_results"), "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}"]
    # Output to files, not pipes: an unread pipe would block the driver once it fills.
    with open(workdir / "driver.out", "a") as out, open(workdir / "driver.err", "w") as err:
        return subprocess.Popen(cmd, cwd=workdir, stdout=out, stderr=err, start_new_session=True)


def _wait_for(workdir: Path, proc: subprocess.Popen, n_finished: int, timeout: float = 300) -> bool:
    """Wait until `n_finished` trials are FINISHED in MLflow (0: until the study run exists).
    False when the study ended first (the moment passed)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if n_finished == 0 and parents(workdir):
                return True
            if n_finished and sum(r.info.status == "FINISHED" for r in children(workdir)) >= n_finished:
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


def test_optuna_search_runs_and_logs_each_trial_once(tmp_path: Path) -> None:
    space = yaml.safe_load((ROOT / "search_spaces" / "optuna.yaml").read_text())
    space["search"]["n_trials"] = 3
    space["train"] = {"epochs": 2}
    path = tmp_path / "optuna_small.yaml"
    path.write_text(yaml.safe_dump(space))
    proc = run_cli(tmp_path, "--space", str(path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = children(tmp_path, space["name"])
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    lo, hi = space["search"]["lambda"]
    lams = [float(r.data.params["lam"]) for r in runs]
    assert all(lo <= lam <= hi for lam in lams) and len(set(lams)) == 3   # sampled, not a grid
    assert all("zs/mean" in r.data.metrics and "B/old/top1" in r.data.metrics for r in runs)
