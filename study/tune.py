"""StudySpec -> Ray: the feature phase (Ray tasks) and the trials (a Ray Tune Tuner).

Only this module and ``cli.py`` import Ray. The feature phase plans every unique
(backbone, data set, split) key, then extracts the missing shards of each as Ray
tasks (one per shard, a GPU each where the cluster has them) straight into the
feature cache, which on a cluster sits on shared storage. The driver never holds
a feature array: trials get a small :class:`backbones.Handle` per key, open only
the keys their config names, and memory-map them, so the trials of one node share
one page-cache copy. MLflow is written by :class:`MLflowCallback`, in the driver,
through :class:`study.tracking.StudyTracker`.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune

from study.science import keys as K
from study import tracking as T
from study.science.config import TrialConfig
from study.space import FeatureKey, StudySpec, trial_name
from study.tracking import StudyTracker

FeatureHandles = dict[str, Any]   # str(FeatureKey) -> backbones.Handle (a path and a shape, no arrays)
# Keys Ray adds to every result; everything else a trial reports is a metric of ours.
_RAY_KEYS = {
    "timestamp", "training_iteration", "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip",
    "done", "trial_id", "date", "experiment_tag", "config", "checkpoint_dir_name", "should_checkpoint",
    "iterations_since_restore", "time_since_restore", "experiment_id", "final", "node_id",
}
GRID_KEY = "trial"
ENV_FORWARD = ("HF_HUB_OFFLINE", "LAMBDA_COMPAT_CACHE", "LAMBDA_COMPAT_NODE_CACHE", "LAMBDA_COMPAT_DATA",
               "MALLOC_ARENA_MAX")
# glibc gives every thread its own malloc arena and keeps freed blocks there: a trial's workers
# held ~250 MB of freed memory each with the default (benchmarks/bench_memory.py). With two,
# a default-size trial ran as fast (within 3%, 2 runs each). A value set in the environment wins.
WORKER_ENV_DEFAULTS = {"MALLOC_ARENA_MAX": "2"}


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Start a local Ray (address None) or connect to a cluster ('auto', 'ray://...')."""
    env = {**WORKER_ENV_DEFAULTS, **{k: os.environ[k] for k in ENV_FORWARD if k in os.environ}}
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}}
    if address is None:
        # address="local": always a fresh private Ray, never one left running by `ray start`.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True, **kwargs)
    else:
        ray.init(address=address, **kwargs)


# ---------------------------------------------------------------------------
# Feature phase
# ---------------------------------------------------------------------------

@ray.remote
def _prepare_backbone(name: str) -> str:
    """Train (once, cached) a project-trained backbone; returns its weights digest."""
    import backbones
    return backbones.load(name).weights_id


@ray.remote
def _plan(key: FeatureKey, dtype: str) -> Any:
    """backbones.Handle if the key is cached, else the backbones.Job of its missing shards."""
    import backbones
    return backbones.plan(key.backbone, key.dataset, key.split, dtype=dtype)


@ray.remote
def _extract_shard(job: Any, shard: Any) -> int:
    """Fill one shard; returns the rows it embedded (0: another process had done it)."""
    import backbones
    return shard.stop - shard.start if backbones.extract_shard(job, shard) else 0


@ray.remote
def _finish(job: Any) -> Any:
    import backbones
    return backbones.finish(job)


def _driver_is_the_only_node() -> bool:
    alive = [node for node in ray.nodes() if node.get("Alive")]
    return len(alive) == 1 and alive[0].get("NodeID") == ray.get_runtime_context().get_node_id()


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Progress:
    """Per-key progress lines of the feature phase: images done, images/s, ETA."""

    def __init__(self, key: FeatureKey, job: Any, log: Callable[[str], None]) -> None:
        self.key, self.log = key, log
        self.total = job.rows
        self.done = self.total - sum(s.stop - s.start for s in job.todo)
        self.t0 = time.perf_counter()
        self.embedded = 0
        self.last = 0.0

    def add(self, rows: int, shard_rows: int) -> None:
        self.done += shard_rows
        self.embedded += rows
        now = time.perf_counter()
        if now - self.last < 2.0 and self.done < self.total:
            return
        self.last = now
        rate = self.embedded / (now - self.t0) if now > self.t0 else 0.0
        eta = f", ETA {_duration((self.total - self.done) / rate)}" if rate > 0 and self.done < self.total else ""
        self.log(f"[features] {self.key}: {self.done:,}/{self.total:,} images ({100 * self.done / self.total:.0f}%), "
                 f"{rate:,.0f} img/s{eta}")


def feature_phase(spec: StudySpec, log: Callable[[str], None] = print) -> tuple[FeatureHandles, dict[str, int]]:
    """Train what the project trains, then extract every unique key's missing shards (cached on disk).

    Returns a Handle per key: the driver never loads a feature array."""
    import backbones
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    trained = [b for b in spec.backbone_names if backbones.backbone_cfg(b).source == "trained"]
    if _driver_is_the_only_node():  # the driver sees the workers' cache: skip what is there already
        trained = [b for b in trained if not backbones.is_prepared(b)]
    if trained:
        log(f"[features] preparing {len(trained)} project-trained backbone(s): {', '.join(trained)}")
        ray.get([_prepare_backbone.options(num_cpus=1, num_gpus=gpus).remote(b) for b in trained])
    keys = spec.feature_keys()
    log(f"[features] {len(keys)} unique (backbone, data set, split) keys, stored as {spec.feature_dtype}")
    t0 = time.perf_counter()
    handles: FeatureHandles = {}
    counts = {"keys": len(keys), "extracted": 0, "from_cache": 0, "shards_extracted": 0}
    plans = dict(zip(keys, ray.get([_plan.options(num_cpus=0.5).remote(k, spec.feature_dtype) for k in keys])))
    shard_tasks: dict[Any, tuple[FeatureKey, Any]] = {}
    progress: dict[FeatureKey, _Progress] = {}
    left: dict[FeatureKey, int] = {}
    finishing: dict[Any, FeatureKey] = {}
    for key, got in plans.items():
        if isinstance(got, backbones.Handle):
            handles[str(key)] = got
            counts["from_cache"] += 1
            log(f"[features] {len(handles)}/{len(keys)} {key} {got.rows}x{got.dim} {got.dtype} (cache)")
            continue
        progress[key] = _Progress(key, got, log)
        left[key] = len(got.todo)
        if got.todo:
            log(f"[features] {key}: {got.rows:,} images, {len(got.todo)} of {got.n_shards} shard(s) to extract")
        for shard in got.todo:
            ref = _extract_shard.options(num_cpus=1, num_gpus=gpus, max_retries=2).remote(got, shard)
            shard_tasks[ref] = (key, shard)
        if not got.todo:
            finishing[_finish.options(num_cpus=0.5).remote(got)] = key
    pending = [*shard_tasks, *finishing]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ref = done[0]
        if ref in shard_tasks:
            key, shard = shard_tasks.pop(ref)
            rows = ray.get(ref)
            counts["shards_extracted"] += int(rows > 0)
            progress[key].add(rows, shard.stop - shard.start)
            left[key] -= 1
            if left[key] == 0:
                fin = _finish.options(num_cpus=0.5).remote(plans[key])
                finishing[fin] = key
                pending.append(fin)
            continue
        key = finishing.pop(ref)
        handle = ray.get(ref)
        handles[str(key)] = handle
        counts["extracted" if progress[key].embedded else "from_cache"] += 1
        log(f"[features] {len(handles)}/{len(keys)} {key} {handle.rows}x{handle.dim} {handle.dtype} "
            f"({'extracted' if progress[key].embedded else 'cache'})")
    log(f"[features] done in {time.perf_counter() - t0:.1f}s: {counts['extracted']} extracted "
        f"({counts['shards_extracted']} shards), {counts['from_cache']} from cache")
    return handles, counts


# ---------------------------------------------------------------------------
# The trainable (runs in a Ray worker)
# ---------------------------------------------------------------------------

def trial_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The TrialConfig dict for one trial config of the space."""
    out = {**cfg["train"], "method": cfg["method"], "seed": cfg["seed"]}
    for key in ("lam", "alpha"):
        if cfg.get(key) is not None:
            out[key] = cfg[key]
    return out


def trial_data(config: dict[str, Any], features: FeatureHandles) -> Any:
    """The TrialData of one resolved trial config: opens (memory-maps) only the keys it names."""
    import backbones

    from study.science.trial import TrialData

    def feats(backbone: str, dataset: str, split: str) -> Any:
        return backbones.open_features(features[str(FeatureKey(backbone, dataset, split))])

    zero_shot = {}
    for item in config["zero_shot"]:
        ds, split = item.split(":")
        zero_shot[ds] = feats(config["new"], ds, split)
    return TrialData(
        old_train=feats(config["old"], config["dataset"], config["train_split"]),
        new_train=feats(config["new"], config["dataset"], config["train_split"]),
        old_eval=feats(config["old"], config["dataset"], config["eval_split"]),
        new_eval=feats(config["new"], config["dataset"], config["eval_split"]),
        zero_shot=zero_shot,
    )


def sequence_data(config: dict[str, Any], features: FeatureHandles) -> Any:
    """The SequenceData of one resolved sequence trial config (keys "models", ...): memory-maps its keys."""
    import backbones

    from study.science.sequence import SequenceData

    def feats(backbone: str, dataset: str, split: str) -> Any:
        return backbones.open_features(features[str(FeatureKey(backbone, dataset, split))])

    models = config["models"]
    zero_shot = {}
    for item in config["zero_shot"]:
        ds, split = item.split(":")
        zero_shot[ds] = [feats(m, ds, split) for m in models[1:]]
    return SequenceData(train=[feats(m, config["dataset"], config["train_split"]) for m in models],
                        eval=[feats(m, config["dataset"], config["eval_split"]) for m in models], zero_shot=zero_shot)


def _run_sequence(config: dict[str, Any], features: FeatureHandles, folder: Path) -> Any:
    """A sequence trial; writes its matrices (CSV and heatmap) into the checkpoint folder."""
    from study.science.sequence import run_sequence_trial
    from study.sequence_report import write_matrices

    result = run_sequence_trial(trial_config(config), sequence_data(config, features), compose=config["compose"])
    write_matrices(result.metrics, len(config["models"]), folder, title=trial_name(config))
    return result


def run_one(config: dict[str, Any], features: FeatureHandles, table: TrialTable) -> None:
    """One trial: per-epoch reports, then the final metrics with the adapters as a checkpoint."""
    from study.science.trial import run_trial, save_checkpoint

    config = table.resolve(config)

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        # A searcher scores every report and per-epoch reports lack the final-only keys
        # (zs/*), so searched trials report once, at the end.
        if not table.searched:
            tune.report({**metrics, "epoch": epoch, "final": 0})

    node = {"node_id": ray.get_runtime_context().get_node_id()}
    done = tune.get_checkpoint()
    if done is not None:  # restored after its final report: re-report, don't retrain
        with done.as_directory() as folder:
            final = json.loads((Path(folder) / "metrics.json").read_text())
        tune.report({**final, **node}, checkpoint=done)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if "models" in config:
            result = _run_sequence(config, features, Path(tmp))
        else:
            result = run_trial(trial_config(config), trial_data(config, features), on_epoch=on_epoch)
        final = {**result.metrics, "final": 1}
        save_checkpoint(result, tmp)
        (Path(tmp) / "metrics.json").write_text(json.dumps(final))
        tune.report({**final, **node}, checkpoint=tune.Checkpoint.from_directory(tmp))


# ---------------------------------------------------------------------------
# MLflow callback (driver side)
# ---------------------------------------------------------------------------

def metrics_of(result: dict[str, Any]) -> dict[str, float]:
    """Our metrics from a Ray result: numeric, finite or NaN, not Ray's own keys."""
    out = {}
    for key, value in result.items():
        if key in _RAY_KEYS or key.startswith("config/") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[key] = float(value)
    return out


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """A trial run's params: its cell (pair, backbones, data set and splits, zero-shot sets) and
    every field of its resolved TrialConfig (lam, alpha, lr, temperature, w1..w3, ...)."""
    cell = {k: v for k, v in config.items() if k not in ("train", "method", "lam", "alpha", "seed")}
    return {**cell, **TrialConfig.from_dict(trial_config(config)).to_dict()}


def trial_tags(config: dict[str, Any]) -> dict[str, str]:
    lam = config.get("lam")
    return {
        T.METHOD_TAG: config["method"], T.PAIR_TAG: config["pair"], T.DATASET_TAG: config["dataset"],
        T.LAMBDA_TAG: "" if lam is None else f"{lam:g}", T.SEED_TAG: str(config["seed"]),
    }


def record_trial(tracker: StudyTracker, table: TrialTable, config: dict[str, Any], ray_trial_id: str, *,
                 metrics: dict[str, float] | None = None, step: int = 0, checkpoint: Any = None,
                 last: dict[str, Any] | None = None) -> None:
    """`StudyTracker.record_trial` for a Ray trial: its run's name, params and tags from the table;
    with `last` (its last result) the trial ended: its `checkpoint`'s curves and files are logged
    and the run finished."""
    key, cfg = table.key(config, ray_trial_id), table.resolve(config)
    if tracker.is_finished(key):
        return
    args = (key, trial_name(cfg), trial_params(cfg), {**trial_tags(cfg), T.RAY_TRIAL_TAG: ray_trial_id})
    if last is None or checkpoint is None:
        tracker.record_trial(*args, metrics=metrics, step=step, final=None if last is None else bool(last.get("final")))
        return
    with checkpoint.as_directory() as folder:
        curves_file = Path(folder) / K.CURVES_FILE
        curves = json.loads(curves_file.read_text()) if curves_file.exists() else {}
        tracker.record_trial(*args, metrics=metrics, step=step, final=bool(last.get("final")), curves=curves,
                             folder=Path(folder))


class MLflowCallback(tune.Callback):
    """Mirrors trials into MLflow child runs (driver only; safe across Tuner.restore)."""

    def __init__(self, tracker: StudyTracker, table: TrialTable) -> None:
        self.tracker, self.table = tracker, table

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        record_trial(self.tracker, self.table, trial.config, trial.trial_id)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        key = self.table.key(trial.config, trial.trial_id)
        self.tracker.log_metrics(key, metrics_of(result), step=int(result.get("training_iteration", 0)))
        if "node_id" in result:
            self.tracker.set_tag(key, T.NODE_TAG, str(result["node_id"]))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        record_trial(self.tracker, self.table, trial.config, trial.trial_id, checkpoint=trial.checkpoint,
                     last=trial.last_result or {})

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.tracker.fail_trial(self.table.key(trial.config, trial.trial_id), _error_text(trial))


def _error_text(trial: Any) -> str:
    err = trial.get_error() if hasattr(trial, "get_error") else None
    if err is not None:
        return f"{type(err).__name__}: {err}"
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        return Path(path).read_text()[-4000:]
    return "trial failed (no error text recorded)"


# ---------------------------------------------------------------------------
# Tuner
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TrialTable:
    """The configs of an experiment's trials, by key.

    Ray only ever sees primitive values: a grid trial's config is {"trial": <its name>}, a
    searched trial's {"trial": <its cell>, "lam": ..., "alpha": ...}. (Ray replaces nested
    values by placeholders it cannot always resolve again on Tuner.restore.) The table is
    derived from the space, which a resume may not change, so it is the same on every run.
    """

    base: dict[str, dict[str, Any]]
    searched: tuple[str, ...] = ()   # keys a searcher sets per trial

    def resolve(self, config: dict[str, Any]) -> dict[str, Any]:
        cfg = dict(self.base[config[GRID_KEY]])
        cfg.update({k: config[k] for k in self.searched if k in config})
        return cfg

    def key(self, config: dict[str, Any], ray_trial_id: str) -> str:
        """A trial's identity across resumes: its name for grid points (stable even if Ray's
        experiment state was lost), Ray's trial id for searcher-proposed trials."""
        return ray_trial_id if self.searched else config[GRID_KEY]


@dataclass(frozen=True)
class Experiment:
    """One Ray Tune experiment of a study."""

    name: str
    param_space: dict[str, Any]
    table: TrialTable
    total: int
    search_alg: Any = None
    num_samples: int = 1
    optuna_storage: str | None = None   # the database of the search's Optuna study (named `name`)


def experiments(spec: StudySpec, optuna_storage: str | None = None) -> list[Experiment]:
    """The Tune experiments of a study: one grid, or one Optuna search per (pair, data set, seed) cell.

    Each search is an Optuna study of the experiment's name in `optuna_storage` (a database URL;
    None: in memory), so optuna-dashboard shows it and a resumed search continues it."""
    if spec.search.kind == "grid":
        table = TrialTable(spec.trial_table())
        return [Experiment(spec.name, {GRID_KEY: tune.grid_search(list(table.base))}, table, len(table.base))]
    import optuna
    from ray.tune.search.optuna import OptunaSearch
    storage = optuna.storages.RDBStorage(optuna_storage) if optuna_storage else None
    directions = ["maximize" if m == "max" else "minimize" for m in spec.search.modes]
    out = []
    for cell in spec.cells():
        for seed in spec.seeds:
            name = f"{spec.name}__{cell['pair'].replace('->', '-to-')}__{cell['dataset']}__s{seed}"
            base = {**cell, "method": "lambda", "seed": seed, "train": dict(spec.train)}
            table = TrialTable({name: base}, searched=("lam", "alpha"))
            space = {GRID_KEY: name, "lam": tune.uniform(*spec.search.lam), "alpha": tune.loguniform(*spec.search.alpha)}
            if storage is not None:  # the objectives' names, for the dashboard (OptunaSearch loads this study)
                optuna.create_study(storage=storage, study_name=name, directions=directions,
                                    load_if_exists=True).set_metric_names(list(spec.search.metrics))
            searcher = OptunaSearch(metric=list(spec.search.metrics), mode=list(spec.search.modes), seed=seed,
                                    study_name=name, storage=storage)
            out.append(Experiment(name, space, table, spec.search.n_trials, searcher, spec.search.n_trials,
                                  optuna_storage))
    return out


def fail_stale_optuna_trials(exp: Experiment) -> int:
    """Mark FAIL the trials of an ended search's Optuna study that are still RUNNING: asked by a driver
    that was killed before Ray's state recorded them, so the resumed search asked again. Returns
    how many."""
    if exp.optuna_storage is None:
        return 0
    import optuna
    study = optuna.load_study(study_name=exp.name, storage=exp.optuna_storage)
    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in stale:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return len(stale)


def _name_of(table: TrialTable, trial: Any) -> str:
    return trial_name(table.resolve(trial.config))


def _dirname_of(table: TrialTable, trial: Any) -> str:
    return f"{_name_of(table, trial)}_{trial.trial_id}"


def _reporter(spec: StudySpec, total: int) -> tune.CLIReporter:
    metric_cols = {spec.metric: spec.metric, "B/B/top1": "B/B@1", "zs/mean": "ZS", "epoch": "ep"}
    param_cols = {GRID_KEY: "trial"} if spec.search.kind == "grid" else {GRID_KEY: "cell", "lam": "lambda", "alpha": "alpha"}
    return tune.CLIReporter(metric_columns=metric_cols, parameter_columns=param_cols, total_samples=total,
                            max_report_frequency=15, max_progress_rows=12, max_column_length=60)


def make_tuner(spec: StudySpec, exp: Experiment, features: FeatureHandles, tracker: StudyTracker, *,
               storage: str, max_concurrent: int | None = None) -> tune.Tuner:
    """A new Tuner, or the restored one when the experiment folder holds an interrupted run.

    `features`: the feature phase's handles (a few bytes per key)."""
    trainable = tune.with_resources(
        tune.with_parameters(run_one, features=features, table=exp.table),
        {"cpu": spec.cpu, "gpu": spec.gpu})
    path = os.path.join(storage, exp.name)
    if tune.Tuner.can_restore(path):
        # The space is passed again: a driver killed early can leave a tuner.pkl without it.
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False, restart_errored=False,
                                  param_space=exp.param_space)
    scheduler = None
    metric, mode = spec.metric, spec.mode
    if spec.scheduler.kind == "asha":
        from ray.tune.schedulers import ASHAScheduler
        scheduler = ASHAScheduler(time_attr="training_iteration", grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor,
                                  max_t=int(spec.train.get("epochs", 1000)) + 1)
    if exp.search_alg is not None:
        metric = mode = None  # the multi-objective searcher owns metric/mode
    return tune.Tuner(
        trainable,
        param_space=exp.param_space,
        tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler, search_alg=exp.search_alg,
                                    num_samples=exp.num_samples, max_concurrent_trials=max_concurrent,
                                    reuse_actors=True, trial_name_creator=functools.partial(_name_of, exp.table),
                                    trial_dirname_creator=functools.partial(_dirname_of, exp.table)),
        run_config=tune.RunConfig(
            name=exp.name, storage_path=storage, callbacks=[MLflowCallback(tracker, exp.table)],
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            # num_to_keep forces an experiment snapshot after each trial's final checkpoint,
            # so a killed driver does not rerun trials that had finished.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            progress_reporter=_reporter(spec, exp.total), verbose=1,
        ),
    )
