"""`python study/run.py` / `lambda-compat`: validate a space, run it on Ray Tune, log to MLflow, report.

Exit codes: 0 every trial finished; 2 bad input or unusable environment
(nothing was started or written); 3 the study finished with failed trials;
130 interrupted (rerun the same command to resume).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

EXIT_OK, EXIT_BAD_INPUT, EXIT_FAILURES, EXIT_INTERRUPTED = 0, 2, 3, 130
MIN_FREE_BYTES = 200 * 2**20


class UsageError(Exception):
    """Bad input or an unusable environment, found before anything starts."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lambda-compat", description=__doc__.splitlines()[0])
    p.add_argument("--space", required=True, help="search-space YAML (see search_spaces/README.md)")
    p.add_argument("--address", default=None, help="Ray address: omit to start a local Ray; `auto` or ray://HOST:10001 for a cluster")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default sqlite:///<cwd>/mlflow.db; http://127.0.0.1:5000 for a server)")
    p.add_argument("--storage", default=None, help="Ray Tune results: absolute path or URI (default <cwd>/ray_results)")
    p.add_argument("--optuna-storage", default=None, help="Optuna database of `search: optuna` studies "
                   "(default sqlite:///<folder of mlflow.db>/optuna.db; on a cluster e.g. postgresql://HOST/DB)")
    p.add_argument("--name", default=None, help="study name (default: the space's `name`)")
    p.add_argument("--max-concurrent", type=int, default=None, help="cap on concurrent trials (default: the space's, else Ray's resources)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    p.add_argument("--dry-run", action="store_true", help="validate, print the trial table and count, run nothing")
    p.add_argument("--no-report", action="store_true", help="skip the summary table and plots at the end")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # use the trimmed CLIReporter below
    # We force a snapshot per finished trial on purpose (see study/tune.py); silence the nag.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    from study.space import NAME_RE, SpaceError, load_space, trial_name
    try:
        spec = load_space(args.space)
        if args.name is not None:
            if not NAME_RE.match(args.name) or ".." in args.name:
                raise UsageError(f"--name: `{args.name}` is not allowed: use 1-100 of [A-Za-z0-9_.-], no `/` or `..`")
            spec = replace(spec, name=args.name)
        if args.max_concurrent is not None and args.max_concurrent < 1:
            raise UsageError(f"--max-concurrent: must be >= 1, got {args.max_concurrent}")
    except (SpaceError, UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT

    if args.dry_run:
        print_plan(spec, trial_name)
        return EXIT_OK

    try:
        storage = resolve_storage(args.storage, spec.name, spec.sha256)
        tracking_uri = args.tracking_uri or _default_tracking_uri()
        from study.tracking import StudyTracker, TrackingError
        tracker = StudyTracker(tracking_uri, spec.name)
        try:
            tracker.check()
        except TrackingError as err:
            raise UsageError(f"--tracking-uri: {err}") from None
        optuna_storage = None
        if spec.search.kind == "optuna":
            optuna_storage = args.optuna_storage or default_optuna_storage(tracking_uri)
            _check_optuna_storage(optuna_storage)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run_study(spec, args, storage, tracker, optuna_storage=optuna_storage)


def default_optuna_storage(tracking_uri: str) -> str:
    """SQLite `optuna.db` beside the MLflow database of a sqlite tracking URI, else in the working folder."""
    from study.tracking import sqlite_path
    db = sqlite_path(tracking_uri)
    return f"sqlite:///{(Path.cwd() if db is None else db.parent) / 'optuna.db'}"


def _check_optuna_storage(url: str) -> None:
    """UsageError unless Optuna can open (and, if new, create) the storage at `url`."""
    import optuna
    try:
        optuna.storages.RDBStorage(url)
    except Exception as err:  # noqa: BLE001 - SQLAlchemy and Optuna raise several types
        raise UsageError(f"--optuna-storage: cannot open `{url}` ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from None


def _default_tracking_uri() -> str:
    from study.tracking import default_tracking_uri
    return default_tracking_uri(Path.cwd())


def print_plan(spec: Any, trial_name: Any) -> None:
    trials = spec.trials() if spec.search.kind == "grid" else []
    print(f"study {spec.name} ({spec.path}, sha256 {spec.sha256[:12]})")
    if trials:
        print(f"{'#':>4}  {'trial':<60} {'method':<12} {'lambda':>7} {'alpha':>6} {'seed':>4}")
        for i, t in enumerate(trials):
            lam = "" if t["lam"] is None else f"{t['lam']:g}"
            alpha = "" if t["alpha"] is None else f"{t['alpha']:g}"
            print(f"{i:>4}  {trial_name(t):<60} {t['method']:<12} {lam:>7} {alpha:>6} {t['seed']:>4}")
        print(f"{len(trials)} trials")
    else:
        cells = spec.cells()
        n = len(cells) * len(spec.seeds) * spec.search.n_trials
        print(f"optuna search: {len(cells)} cells x {len(spec.seeds)} seeds x {spec.search.n_trials} trials = {n} trials")
    keys = spec.feature_keys()
    print(f"{len(keys)} feature keys: " + ", ".join(str(k) for k in keys))


def resolve_storage(storage: str | None, name: str, sha256: str) -> str:
    """Absolute storage path/URI; for local paths check it is writable, has room, and holds this space."""
    if storage and "://" in storage:
        return storage
    path = Path(storage or (Path.cwd() / "ray_results")).expanduser()
    if not path.is_absolute():
        path = path.resolve()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"--storage: {path} cannot be created: {probe} is not a folder")
    try:  # a real write, not os.access: root passes access checks on read-only mounts
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".lambda-compat-probe-"):
            pass
    except OSError as err:
        raise UsageError(f"--storage: {path} is not writable ({err.strerror} in {probe})") from None
    free = shutil.disk_usage(probe).free
    if free < MIN_FREE_BYTES:
        raise UsageError(f"--storage: only {free / 2**20:.0f} MiB free under {probe}; need at least {MIN_FREE_BYTES / 2**20:.0f} MiB")
    marker = path / name / "lambda_compat_study.json"
    if marker.exists():
        recorded = json.loads(marker.read_text()).get("space_sha256")
        if recorded != sha256:
            raise UsageError(f"--name: study `{name}` in {path} was started from a different space "
                             f"(sha256 {recorded[:12]} != {sha256[:12]}); pass another --name or remove {path / name}")
    return str(path)


def _versions() -> dict[str, str]:
    import importlib.metadata as md
    out = {"python": sys.version.split()[0]}
    for pkg in ("ray", "torch", "timm", "mlflow", "numpy", "lambda-compat"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_study(spec: Any, args: argparse.Namespace, storage: str, tracker: Any, *,
              optuna_storage: str | None = None) -> int:
    """Everything after validation: Ray, features, trials, MLflow, report. `optuna_storage`: the
    database URL where an Optuna search keeps its studies (None: in memory)."""
    import ray

    from study import tracking as T
    from study import tune as st
    from study.mlflow_view import VIEW_TAG, study_view, view_json, view_url
    from study.report import build_report

    st.init_ray(args.address, args.num_cpus)
    try:
        _write_marker(storage, spec)
        features, counts = st.feature_phase(spec)
        versions = _versions()
        tags = {T.SPACE_SHA_TAG: spec.sha256, T.GIT_COMMIT_TAG: _git_commit(), T.SPACE_FILE_TAG: str(spec.path),
                **{f"{T.VERSION_TAG_PREFIX}{k}": v for k, v in versions.items()}}
        params = {"space": spec.path.name, "n_pairs": len(spec.pairs), "n_datasets": len(spec.datasets),
                  "methods": list(spec.methods), "lambdas": list(spec.lambdas), "seeds": list(spec.seeds),
                  "search": spec.search.kind, "scheduler": spec.scheduler.kind}
        tracker.start_study(params=params, tags=tags, artifacts=[spec.path])
        tracker.write_json(counts, "features.json")
        exps = st.experiments(spec, optuna_storage)
        grid = [st.trial_tags(cfg) for exp in exps if not exp.table.searched for cfg in exp.table.base.values()]
        tracker.set_experiment_tag(VIEW_TAG, view_json(grid, study_view([len(s.models) for s in spec.sequences])))
        print(f"[mlflow] study run {tracker.parent_run_id} at {tracker.tracking_uri}")

        total_failed, interrupted = 0, False
        if optuna_storage:
            print(f"[optuna] studies in {optuna_storage}")
        for exp in exps:
            tuner = st.make_tuner(spec, exp, features, tracker, storage=storage,
                                  max_concurrent=args.max_concurrent or spec.max_concurrent)
            results = tuner.fit()
            failed, finished = reconcile(results, tracker, exp.table)
            total_failed += failed
            if failed + finished < exp.total:
                interrupted = True
                break
            stale = st.fail_stale_optuna_trials(exp)
            if stale:
                print(f"[optuna] marked {stale} trial(s) of {exp.name} left RUNNING by a killed driver FAIL")
        if interrupted:
            print(f"interrupted: rerun the same command to resume:\n  {_resume_command()}", file=sys.stderr)
            tracker.end_study("KILLED")
            return EXIT_INTERRUPTED
        orphans = tracker.close_orphans()
        if orphans:
            print(f"[mlflow] marked {orphans} run(s) of lost trials KILLED")
        artifacts: list[Path] = []
        if not args.no_report:
            out = Path(tempfile.mkdtemp(prefix="lambda-compat-report-"))
            report = build_report(tracker.tracking_uri, spec.name, out)
            print(report.markdown)
            artifacts = report.files
        tracker.end_study("FAILED" if total_failed else "FINISHED", artifacts)
        if total_failed:
            print(f"finished with failures: {total_failed} trial(s) failed (see the FAILED runs in MLflow)", file=sys.stderr)
            return EXIT_FAILURES
        print(f"finished: run `mlflow ui --host 127.0.0.1 --backend-store-uri {tracker.tracking_uri}` and open "
              f"{view_url('http://127.0.0.1:5000', tracker.experiment_id)}")
        if optuna_storage:
            print(f"          and `optuna-dashboard {optuna_storage}` (pip install optuna-dashboard)")
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"\ninterrupted: rerun the same command to resume:\n  {_resume_command()}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        ray.shutdown()


def reconcile(results: Any, tracker: Any, table: Any) -> tuple[int, int]:
    """Make MLflow match Ray's results (a driver killed between a trial's end and its callback loses nothing)."""
    from study.tune import metrics_of, record_trial
    tracker.refresh()  # Ray's restored callback writes through its own copy of the tracker
    failed = finished = 0
    for result in results:
        ray_id = (result.metrics or {}).get("trial_id")
        # no config: a trial Ctrl-C stopped before Ray saved its state; it resumes on the next run
        key = table.key(result.config, ray_id) if ray_id and result.config is not None else None
        if result.error is not None:
            failed += 1
            if key:
                tracker.fail_trial(key, f"{type(result.error).__name__}: {result.error}")
            continue
        if not key or (not result.metrics.get("done") and result.metrics.get("final") != 1):
            continue  # never started, or interrupted mid-trial: it resumes on the next run
        finished += 1
        record_trial(tracker, table, result.config, ray_id, metrics=metrics_of(result.metrics),
                     step=int(result.metrics.get("training_iteration", 0)), checkpoint=result.checkpoint,
                     last=result.metrics)
    return failed, finished


def _write_marker(storage: str, spec: Any) -> None:
    if "://" in storage:
        return
    folder = Path(storage) / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "lambda_compat_study.json"
    if not marker.exists():
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"space_sha256": spec.sha256, "space": str(spec.path)}))
        os.replace(tmp, marker)


def _resume_command() -> str:
    return "python study/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
