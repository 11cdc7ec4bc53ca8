"""Faults found before anything starts, and MLflow writes under a busy SQLite database."""
from __future__ import annotations

import socket
import sqlite3
import threading
import time
from collections import namedtuple
from pathlib import Path

import pytest

from study import cli
from study.tracking import StudyTracker

SMOKE = Path(__file__).resolve().parents[1] / "search_spaces" / "smoke.yaml"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path: Path, *extra: str) -> int:
    return cli.main(["--space", str(SMOKE), *extra])


def test_mlflow_unreachable_is_a_clear_error_before_anything_starts(tmp_path, capsys) -> None:
    port = _closed_port()
    t0 = time.perf_counter()
    code = _run(tmp_path, "--storage", str(tmp_path / "rr"), "--tracking-uri", f"http://127.0.0.1:{port}")
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "--tracking-uri" in err and "unreachable" in err
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "rr").exists()


@pytest.mark.parametrize("url", ["sqlite:///{tmp}/no/such/folder/optuna.db", "nosuchdb://host/optuna"])
def test_unusable_optuna_storage_is_a_clear_error_before_anything_starts(tmp_path, capsys, url) -> None:
    space = SMOKE.parent / "optuna.yaml"
    code = cli.main(["--space", str(space), "--storage", str(tmp_path / "rr"), "--tracking-uri",
                     f"sqlite:///{tmp_path / 'm.db'}", "--optuna-storage", url.format(tmp=tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: --optuna-storage: cannot open"), err
    assert not (tmp_path / "rr").exists() and not (tmp_path / "m.db").exists()


def test_default_optuna_storage_sits_beside_mlflow_db(tmp_path, monkeypatch) -> None:
    assert cli.default_optuna_storage(f"sqlite:///{tmp_path / 'mlflow.db'}") == f"sqlite:///{tmp_path / 'optuna.db'}"
    monkeypatch.chdir(tmp_path)
    assert cli.default_optuna_storage("http://127.0.0.1:5000") == f"sqlite:///{tmp_path / 'optuna.db'}"


def test_storage_not_a_folder(tmp_path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = _run(tmp_path, "--storage", str(blocker / "results"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}")
    err = capsys.readouterr().err
    assert code == 2 and "--storage" in err and "not a folder" in err
    assert not (tmp_path / "m.db").exists()


def test_storage_not_writable(tmp_path, capsys, monkeypatch) -> None:
    real = cli.tempfile.NamedTemporaryFile

    def refuse(*args, **kwargs):
        if kwargs.get("prefix", "").startswith(".lambda-compat-probe"):
            raise PermissionError(13, "Permission denied")
        return real(*args, **kwargs)

    monkeypatch.setattr(cli.tempfile, "NamedTemporaryFile", refuse)
    code = _run(tmp_path, "--storage", str(tmp_path / "rr"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}")
    err = capsys.readouterr().err
    assert code == 2 and "not writable" in err and "Permission denied" in err


def test_disk_full_is_refused_at_start(tmp_path, capsys, monkeypatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(cli.shutil, "disk_usage", lambda p: usage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))
    code = _run(tmp_path, "--storage", str(tmp_path / "rr"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}")
    err = capsys.readouterr().err
    assert code == 2 and "MiB free" in err
    assert not (tmp_path / "rr").exists()


def test_changed_space_under_same_name_is_refused(tmp_path, capsys) -> None:
    marker = tmp_path / "rr" / "smoke" / "lambda_compat_study.json"
    marker.parent.mkdir(parents=True)
    marker.write_text('{"space_sha256": "0000000000000000"}')
    code = _run(tmp_path, "--storage", str(tmp_path / "rr"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}")
    assert code == 2 and "different space" in capsys.readouterr().err


def test_sqlite_busy_is_retried_and_no_run_is_lost(tmp_path) -> None:
    db = tmp_path / "mlflow.db"
    tracker = StudyTracker(f"sqlite:///{db}", "busy")
    tracker.start_study(params={"a": 1}, tags={})
    tracker.start_trial("t0", "first", {"x": 1}, {})

    def hold_lock() -> None:
        con = sqlite3.connect(db, timeout=30)
        con.execute("BEGIN EXCLUSIVE")
        time.sleep(1.5)
        con.rollback()
        con.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    time.sleep(0.2)
    for i in range(1, 4):  # these writes hit the locked database and must be retried
        tracker.start_trial(f"t{i}", f"trial{i}", {"x": i}, {})
        tracker.log_metrics(f"t{i}", {"B/old/top1": float(i)}, step=1)
        tracker.finish_trial(f"t{i}")
    holder.join()
    runs = tracker.client.search_runs([tracker._experiment()], filter_string="tags.`lc.role` = 'trial'")
    assert sorted(r.info.run_name for r in runs) == ["first", "trial1", "trial2", "trial3"]
    assert {r.data.metrics.get("B/old/top1") for r in runs if r.info.run_name != "first"} == {1.0, 2.0, 3.0}


def test_tracker_survives_pickling(tmp_path) -> None:
    import pickle
    tracker = StudyTracker(f"sqlite:///{tmp_path / 'm.db'}", "pick")
    tracker.start_study(params={}, tags={})
    clone = pickle.loads(pickle.dumps(tracker))
    assert clone.parent_run_id == tracker.parent_run_id and clone._client is None
    clone.start_trial("a", "a", {}, {})
    assert clone.client.get_run(clone._runs["a"]).info.status == "RUNNING"


@pytest.mark.parametrize("bad", ["ftp://x", "postgresql+nope"])
def test_unsupported_tracking_uri(tmp_path, capsys, bad) -> None:
    code = _run(tmp_path, "--storage", str(tmp_path / "rr"), "--tracking-uri", bad)
    assert code == 2 and "--tracking-uri" in capsys.readouterr().err


def test_reconcile_skips_a_trial_interrupted_before_ray_saved_its_config() -> None:
    """Ctrl-C right after a trial starts: Ray's result has a trial id but no config (seen on CI)."""
    from types import SimpleNamespace as NS

    class Table:
        def key(self, config, ray_id):
            return config["grid_key"]

    class Tracker:
        def __init__(self):
            self.failed = []

        def refresh(self):
            pass

        def fail_trial(self, key, error):
            self.failed.append(key)

    tracker = Tracker()
    results = [NS(metrics={"trial_id": "a"}, config=None, error=None, checkpoint=None),
               NS(metrics={"trial_id": "b"}, config={"grid_key": "k"}, error=RuntimeError("boom"), checkpoint=None)]
    assert cli.reconcile(results, tracker, Table()) == (1, 0)
    assert tracker.failed == ["k"]
