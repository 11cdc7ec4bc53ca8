"""A sequence study through the real CLI on synthetic backbones: MLflow metrics and matrix artifacts,
the report's sequence table, and a driver killed after its first trial resuming without duplicates."""
from __future__ import annotations

import csv
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

from study.mlflow_view import VIEW_TAG
from study.science import keys as K
from study.report import build_report

ROOT = Path(__file__).resolve().parents[1]
SPACE = {
    "name": "seq_e2e",
    "sequences": [["synthetic_64", "synthetic_128", "synthetic_256"]],
    "datasets": [{"name": "synthetic-c8-train300-test150"}],
    "zero_shot": ["synthetic-c5-train10-test100-s1"],
    "methods": ["orthogonal", "lambda"],
    "lambdas": [3],
    "seeds": [0],
    "compose": "direct",
    "train": {"epochs": 2, "backfill_points": 3},
    "max_failures": 0,
}


def _cmd(workdir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "study" / "run.py"), "--space", str(workdir / "seq.yaml"), "--num-cpus", "2",
            "--storage", str(workdir / "ray_results"), "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}"]


def _client(workdir: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")


def _children(workdir: Path) -> list:
    exp = _client(workdir).get_experiment_by_name(SPACE["name"])
    return _client(workdir).search_runs([exp.experiment_id], filter_string="tags.`lc.role` = 'trial'")


def _finished(workdir: Path) -> int:
    try:
        return sum(r.info.status == "FINISHED" for r in _children(workdir))
    except Exception:  # noqa: BLE001 - database or experiment not created yet
        return 0


def test_sequence_study_logs_matrices_reports_and_resumes(tmp_path: Path) -> None:
    (tmp_path / "seq.yaml").write_text(yaml.safe_dump(SPACE))
    with open(tmp_path / "driver.out", "w") as out, open(tmp_path / "driver.err", "w") as err:
        proc = subprocess.Popen(_cmd(tmp_path), cwd=tmp_path, stdout=out, stderr=err, start_new_session=True)
    try:
        deadline = time.time() + 300
        while proc.poll() is None and _finished(tmp_path) < 1 and time.time() < deadline:
            time.sleep(0.3)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = subprocess.run(_cmd(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    runs = _children(tmp_path)
    assert len(runs) == 2 and set(Counter(r.info.run_name for r in runs).values()) == {1}
    assert all(r.info.status == "FINISHED" for r in runs)
    client = _client(tmp_path)
    for run in runs:
        m = run.data.metrics
        assert set(K.sequence_keys(3, ["synthetic-c5-train10-test100-s1"], compose="direct")) <= set(m)
        folder = Path(client.download_artifacts(run.info.run_id, "adapters", str(tmp_path / run.info.run_id)))
        assert (folder / "matrix.png").stat().st_size > 0
        for stat in K.SEQ_STATS:   # the CSV holds the run's matrix metrics
            rows = list(csv.reader((folder / f"matrix_{stat}.csv").open()))[1:]
            for i, row in enumerate(rows):
                for j in range(i + 1):
                    assert float(row[1 + j]) == pytest.approx(m[K.seq_matrix_key(stat, i, j)], abs=1e-4)
    # the experiment's MLflow view shows sequence keys that every run holds (not the pair keys it lacks)
    view = json.loads(client.get_experiment_by_name(SPACE["name"]).tags[VIEW_TAG])
    shown = [c.removeprefix("metrics.`").removesuffix("`") for c in view["selectedColumns"]]
    assert shown == ["seq/AM/top1", "seq/zs/2/0/mean", "seq/orth/2/0"]
    assert all(set(shown) <= set(r.data.metrics) for r in runs)
    orth = next(r for r in runs if r.data.tags["method"] == "orthogonal").data.metrics
    assert orth[K.seq_orth_key(2, 0)] < 1e-3 and orth[K.seq_orth_key(2, 0, "direct")] < 1e-3   # semi-orthogonal

    report = build_report(f"sqlite:///{tmp_path / 'mlflow.db'}", SPACE["name"], tmp_path / "report")
    assert "## Sequences" in report.markdown and "synthetic_64->synthetic_128->synthetic_256" in report.markdown
    assert (tmp_path / "report" / "sequence_ac_am.png").exists()
    parent_files = {a.path for a in client.list_artifacts(runs[0].data.tags["mlflow.parentRunId"])}
    assert {"summary.md", "sequence_ac_am.png"} <= parent_files
