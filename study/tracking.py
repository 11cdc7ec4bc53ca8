"""MLflow bookkeeping, written by the driver only.

One experiment per study, one parent run per study and one child run per
trial. Every write is idempotent with respect to a resume: a child run is
found by its Ray trial id before one is created, so an interrupted and resumed
study never holds two runs for one trial. SQLite "database is locked" errors
are retried.

Every name this project gives MLflow (tags, artifact folders) is a constant
here; the callback, ``cli.reconcile`` and the report use them. A trial run's
whole lifecycle is :meth:`StudyTracker.record_trial`; :func:`load_trial`
rebuilds a trial's config and adapters from its run id.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar
from urllib.parse import urlparse

T = TypeVar("T")

ROLE_TAG = "lc.role"            # "study" on the parent, "trial" on children
STUDY_ROLE, TRIAL_ROLE = "study", "trial"
STUDY_TAG = "lc.study"
TRIAL_ID_TAG = "lc.trial_key"         # a trial's identity across resumes (see study.tune.TrialTable.key)
RAY_TRIAL_TAG = "lc.ray_trial_id"
PARENT_TAG = "mlflow.parentRunId"
ERROR_TAG = "lc.error"
NODE_TAG = "lc.node_id"                # Ray node that ran the trial's final epoch
FINAL_TAG = "lc.final"                 # "1": the run holds the trial's final metrics
# What a trial run is grouped by (the report's rows, the MLflow UI's Group by).
METHOD_TAG, PAIR_TAG, DATASET_TAG, LAMBDA_TAG, SEED_TAG = "method", "pair", "dataset", "lambda", "seed"
# The study run's provenance.
SPACE_SHA_TAG, SPACE_FILE_TAG, GIT_COMMIT_TAG = "lc.space_sha256", "lc.space_file", "lc.git_commit"
VERSION_TAG_PREFIX = "lc.version."     # + package name
ADAPTERS_DIR = "adapters"              # a trial run's checkpoint files (study.science.keys.ADAPTERS_FILE, ...)


class TrackingError(RuntimeError):
    """The tracking server or database cannot be used."""


def default_tracking_uri(workdir: str | Path = ".") -> str:
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The absolute database file of a SQLAlchemy `sqlite:///` URI (`sqlite:////abs/m.db` or the
    relative `sqlite:///m.db`); None for any other scheme."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme != "sqlite":
        return None
    return Path(parsed.path[1:]).resolve()  # urlparse keeps the slash before the path: "//abs/m.db", "/m.db"


def artifact_location(tracking_uri: str, study: str) -> str | None:
    """A new experiment's artifact root: `mlartifacts/<study>` beside a SQLite database; None (the
    server's own) for a tracking server."""
    db = sqlite_path(tracking_uri)
    return None if db is None else (db.parent / "mlartifacts" / study).as_uri()


def _retry(fn: Callable[[], T], *, attempts: int = 8, base_delay: float = 0.1) -> T:
    """Run an MLflow call, retrying while SQLite reports it is busy."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - MLflow wraps SQLAlchemy errors in several types
            if "locked" not in str(err).lower() and "busy" not in str(err).lower() or i == attempts - 1:
                raise
            time.sleep(base_delay * 2 ** i)
    raise AssertionError("unreachable")


class StudyTracker:
    """Driver-side MLflow writer for one study. Picklable (Ray Tune stores callbacks)."""

    def __init__(self, tracking_uri: str, study: str) -> None:
        self.tracking_uri = tracking_uri
        self.study = study
        self.parent_run_id: str | None = None
        self._client: Any = None
        self._experiment_id: str | None = None
        self._runs: dict[str, str] = {}       # trial id -> run id
        self._finished: set[str] = set()      # trial ids whose run is FINISHED
        self._loaded = False                  # _runs/_finished read from MLflow

    def __getstate__(self) -> dict[str, Any]:
        # Ray Tune pickles its callbacks and re-applies that copy on Tuner.restore:
        # keep only the identity and reload the runs from MLflow on first use.
        state = dict(self.__dict__)
        state.update(_client=None, _runs={}, _finished=set(), _loaded=False)
        return state

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    # -- set-up ------------------------------------------------------------
    def check(self, timeout_s: float = 10.0) -> None:
        """Fail fast with :class:`TrackingError` when the tracking URI cannot be used."""
        parsed = urlparse(self.tracking_uri)
        if parsed.scheme in ("http", "https"):
            import urllib.request
            url = self.tracking_uri.rstrip("/") + "/health"
            try:
                with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - user-given URI
                    resp.read()
            except Exception as err:  # noqa: BLE001
                raise TrackingError(f"MLflow tracking server {self.tracking_uri} is unreachable ({err}); start it or pass another --tracking-uri") from None
        elif (db := sqlite_path(self.tracking_uri)) is not None:
            if not db.parent.is_dir() or not os.access(db.parent, os.W_OK):
                raise TrackingError(f"cannot write the MLflow database {db}: folder missing or not writable")
        else:
            raise TrackingError(f"unsupported tracking URI `{self.tracking_uri}`: use sqlite:///ABS/PATH/mlflow.db or http(s)://HOST:PORT")

    def _experiment(self) -> str:
        if self._experiment_id is None:
            exp = _retry(lambda: self.client.get_experiment_by_name(self.study))
            if exp is None:
                location = artifact_location(self.tracking_uri, self.study)
                # The kind tag makes the MLflow UI open on the runs table, not the GenAI overview.
                self._experiment_id = _retry(lambda: self.client.create_experiment(
                    self.study, artifact_location=location, tags={"mlflow.experimentKind": "custom_model_development"}))
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    @property
    def experiment_id(self) -> str:
        return self._experiment()

    def set_experiment_tag(self, key: str, value: str) -> None:
        """Tag the study's experiment (its MLflow UI view, :mod:`study.mlflow_view`)."""
        _retry(lambda: self.client.set_experiment_tag(self._experiment(), key, value))

    def start_study(self, *, params: dict[str, Any], tags: dict[str, str], artifacts: Iterable[Path] = ()) -> str:
        """Open (or reopen after an interruption) the study's parent run."""
        exp = self._experiment()
        found = _retry(lambda: self.client.search_runs(
            [exp], filter_string=f"tags.`{ROLE_TAG}` = '{STUDY_ROLE}'", max_results=1, order_by=["attributes.start_time DESC"]))
        if found:
            self.parent_run_id = found[0].info.run_id
            _retry(lambda: self.client.update_run(self.parent_run_id, status="RUNNING"))
        else:
            run = _retry(lambda: self.client.create_run(exp, run_name=self.study, tags={ROLE_TAG: STUDY_ROLE, STUDY_TAG: self.study, **tags}))
            self.parent_run_id = run.info.run_id
            self._log_params(self.parent_run_id, params)
            for path in artifacts:
                _retry(lambda: self.client.log_artifact(self.parent_run_id, str(path)))
        self.refresh()
        return self.parent_run_id

    def refresh(self) -> None:
        """Re-read the child runs from MLflow (another copy of this tracker, such as the
        one Ray Tune restores with its callbacks, may have written since)."""
        self._runs, self._finished, self._loaded = {}, set(), False
        self._load_children()

    def _load_children(self) -> None:
        if self._loaded or self.parent_run_id is None:
            return
        self._loaded = True
        runs = _retry(lambda: self.client.search_runs(
            [self._experiment()], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'", max_results=50000))
        for run in runs:
            tid = run.data.tags.get(TRIAL_ID_TAG)
            if tid:
                self._runs[tid] = run.info.run_id
                if run.info.status == "FINISHED":
                    self._finished.add(tid)

    def close_orphans(self) -> int:
        """Mark KILLED the child runs left RUNNING by trials that no longer exist (Ray state lost)."""
        runs = _retry(lambda: self.client.search_runs(
            [self._experiment()], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and attributes.status = 'RUNNING'"))
        for run in runs:
            _retry(lambda: self.client.set_terminated(run.info.run_id, status="KILLED"))
        return len(runs)

    def end_study(self, status: str, artifacts: Iterable[Path] = ()) -> None:
        for path in artifacts:
            _retry(lambda: self.client.log_artifact(self.parent_run_id, str(path)))
        _retry(lambda: self.client.set_terminated(self.parent_run_id, status=status))

    # -- trials ------------------------------------------------------------
    def _run_of(self, trial_id: str) -> str | None:
        """The trial's open run id; None when it has none or it already FINISHED."""
        self._load_children()
        return None if trial_id in self._finished else self._runs.get(trial_id)

    def is_finished(self, trial_id: str) -> bool:
        self._load_children()
        return trial_id in self._finished

    def start_trial(self, trial_id: str, name: str, params: dict[str, Any], tags: dict[str, str]) -> str | None:
        """Create the trial's child run, or reopen it on a resume; None when it already finished."""
        if self.is_finished(trial_id):
            return None
        run_id = self._runs.get(trial_id)
        if run_id is not None:
            _retry(lambda: self.client.update_run(run_id, status="RUNNING"))
            return run_id
        all_tags = {ROLE_TAG: TRIAL_ROLE, STUDY_TAG: self.study, TRIAL_ID_TAG: trial_id, PARENT_TAG: self.parent_run_id, **tags}
        run = _retry(lambda: self.client.create_run(self._experiment(), run_name=name, tags=all_tags))
        run_id = run.info.run_id
        self._log_params(run_id, params)
        self._runs[trial_id] = run_id
        return run_id

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH
        batch = [Param(k, param_value(v)) for k, v in params.items()]
        for i in range(0, len(batch), MAX_PARAMS_TAGS_PER_BATCH):
            _retry(lambda: self.client.log_batch(run_id, params=batch[i:i + MAX_PARAMS_TAGS_PER_BATCH]))

    def record_trial(self, trial_id: str, name: str, params: dict[str, Any], tags: dict[str, str], *,
                     metrics: dict[str, float] | None = None, step: int = 0, final: bool | None = None,
                     curves: dict[str, list[float]] | None = None, folder: Path | None = None) -> None:
        """A trial run's lifecycle, one call per stage, idempotent across resumes: open the run (create
        it, or reopen it as RUNNING), log `metrics` at `step`; with `final` given (the trial ended),
        log `curves` as metric histories and `folder` (its checkpoint) as artifacts under
        ADAPTERS_DIR, tag FINAL_TAG and mark the run FINISHED. A FINISHED run is left as it is."""
        if self.start_trial(trial_id, name, params, tags) is None:
            return
        if metrics:
            self.log_metrics(trial_id, metrics, step)
        if final is None:
            return
        for key, values in (curves or {}).items():
            self.log_series(trial_id, key, values)
        if folder is not None:
            self.log_artifacts(trial_id, folder, ADAPTERS_DIR)
        self.finish_trial(trial_id, {FINAL_TAG: "1" if final else "0"})

    def log_metrics(self, trial_id: str, metrics: dict[str, float], step: int) -> None:
        run_id = self._run_of(trial_id)
        if run_id is None or not metrics:
            return
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 900):  # MLflow caps a batch at 1000 metrics
            _retry(lambda: self.client.log_batch(run_id, metrics=batch[i:i + 900]))

    def log_series(self, trial_id: str, key: str, values: Iterable[float]) -> None:
        """Log a curve as one metric whose step is the point index (the backfill curves)."""
        run_id = self._run_of(trial_id)
        if run_id is not None:
            from mlflow.entities import Metric
            now = int(time.time() * 1000)
            _retry(lambda: self.client.log_batch(run_id, metrics=[Metric(key, float(v), now, i) for i, v in enumerate(values)]))

    def set_tag(self, trial_id: str, key: str, value: str) -> None:
        run_id = self._run_of(trial_id)
        if run_id is not None:
            _retry(lambda: self.client.set_tag(run_id, key, value))

    def log_artifacts(self, trial_id: str, folder: Path, artifact_path: str) -> None:
        run_id = self._run_of(trial_id)
        if run_id is not None:
            _retry(lambda: self.client.log_artifacts(run_id, str(folder), artifact_path))

    def finish_trial(self, trial_id: str, tags: dict[str, str] | None = None) -> None:
        run_id = self._run_of(trial_id)
        if run_id is None:
            return
        for k, v in (tags or {}).items():
            _retry(lambda: self.client.set_tag(run_id, k, v))
        _retry(lambda: self.client.set_terminated(run_id, status="FINISHED"))
        self._finished.add(trial_id)

    def fail_trial(self, trial_id: str, error: str) -> None:
        run_id = self._run_of(trial_id)
        if run_id is not None:
            _retry(lambda: self.client.set_tag(run_id, ERROR_TAG, error[-4000:]))
            _retry(lambda: self.client.set_terminated(run_id, status="FAILED"))

    def write_json(self, payload: dict[str, Any], artifact_file: str) -> None:
        _retry(lambda: self.client.log_text(self.parent_run_id, json.dumps(payload, indent=2, default=str), artifact_file))


def param_value(value: Any) -> str:
    """An MLflow param's text, the same rule for every param: None -> "", numbers as Python writes
    them ("0.001", "30.0", "inf"), booleans "true"/"false", lists, tuples and mappings as JSON
    (non-finite numbers in them as "inf", "-inf", "nan"); cut to MLflow's length limit with a
    trailing "..." (the whole value is in the run's ADAPTERS_DIR/config.json)."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
    if value is None:
        text = ""
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, tuple, dict)):
        text = json.dumps(_finite(value))
    else:
        text = str(value)
    return text if len(text) <= MAX_PARAM_VAL_LENGTH else text[:MAX_PARAM_VAL_LENGTH - 3] + "..."


def _finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by its text (JSON has no inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def load_trial(run_id: str, tracking_uri: str) -> tuple[Any, Any, Any]:
    """(TrialConfig, B, F) of a finished trial run, rebuilt from its ADAPTERS_DIR artifacts; LookupError
    when the run has none
    (`study.science.trial.load_checkpoint`: B and F frozen nn.Linear modules, None where the method has none;
    apply them to features preprocessed as the config says, e.g. L2-normalised).

        config, B, F = load_trial(run_id, "sqlite:///mlflow.db")
    """
    import tempfile

    from mlflow.tracking import MlflowClient

    from study.science.trial import load_checkpoint
    from study.science.keys import CONFIG_FILE
    client = MlflowClient(tracking_uri=tracking_uri)
    if CONFIG_FILE not in {Path(a.path).name for a in _retry(lambda: client.list_artifacts(run_id, ADAPTERS_DIR))}:
        raise LookupError(f"run {run_id} at {tracking_uri} has no {ADAPTERS_DIR}/{CONFIG_FILE}: the trial did not "
                          "finish, or it was logged before configs were recorded")
    with tempfile.TemporaryDirectory() as tmp:
        folder = _retry(lambda: client.download_artifacts(run_id, ADAPTERS_DIR, tmp))
        return load_checkpoint(folder)
