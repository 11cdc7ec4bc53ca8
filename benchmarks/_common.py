"""Shared helpers of the benchmarks: environment, machine info, timers, result files, tables.

Imported by the benchmark scripts (run them as scripts: `python benchmarks/bench_x.py`).
Nothing here runs inside a Ray worker: trainables are defined in each script's
``__main__`` so that Ray pickles them by value.
"""
from __future__ import annotations

import contextlib
import importlib.metadata as md
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def setup_env(cache_dir: str | None = None, *, fresh_cache: bool = False) -> Path:
    """Offline hub, a private feature cache, the CLI's Ray output settings. Call before importing ray.

    Returns the cache root. `cache_dir` None: $LAMBDA_COMPAT_CACHE if set, else a new temp
    folder (`fresh_cache` forces a new temp folder).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")       # as study/cli.py does
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Ray workers import `study` / `backbones` from the repo also where the project is not pip-installed.
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(ROOT) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *paths])
    if cache_dir is None and not fresh_cache:
        cache_dir = os.environ.get("LAMBDA_COMPAT_CACHE")
    if cache_dir is None:
        cache_dir = tempfile.mkdtemp(prefix="lambda-compat-bench-cache-")
    path = Path(cache_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["LAMBDA_COMPAT_CACHE"] = str(path)
    return path


@contextlib.contextmanager
def private_ray(num_cpus: int | None) -> Iterator[None]:
    """A new local Ray just for this process, started by the project's own `study.tune.init_ray`
    (its runtime env included), shut down on exit. RAY_ADDRESS=local while it starts: a local
    ray.init() would otherwise join a cluster that `ray start` left running on this machine."""
    import ray

    from study.tune import init_ray

    before = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = "local"
    try:
        init_ray(None, num_cpus)
    finally:
        if before is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = before
    try:
        yield
    finally:
        ray.shutdown()


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def machine_info(packages: Sequence[str] = ("numpy", "torch", "timm", "ray", "mlflow", "psutil")) -> dict:
    """Python, OS, CPU model and count, load, package versions, BLAS, torch threads, GPU."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg": os.getloadavg(),
        "versions": {p: _version(p) for p in packages},
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [{k: p.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
                        for p in threadpool_info() if p.get("user_api") == "blas"]
    except Exception:  # pragma: no cover
        pass
    if "torch" in sys.modules:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                           "count": torch.cuda.device_count(), "cuda": torch.version.cuda}
    info.setdefault("gpu", None)
    return info


class Clock:
    """Wall and process-CPU seconds of a block."""

    def __enter__(self) -> "Clock":
        self.t, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self.t
        self.cpu = time.process_time() - self.c


def stats(values: Iterable[float]) -> dict[str, float]:
    v = list(values)
    if not v:
        return {"n": 0}
    return {"n": len(v), "min": min(v), "median": statistics.median(v), "max": max(v),
            "mean": statistics.fmean(v)}


def write_result(result: dict, out: str | Path) -> Path:
    """Write the JSON result (machine info added if missing) and return its path."""
    result.setdefault("machine", machine_info())
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    return path


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v != v:
        return "nan"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return format(v, spec)
    return str(v)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)


def header_line(machine: dict) -> str:
    """One line naming the machine, for the printed tables."""
    gpu = machine.get("gpu")
    load = machine.get("loadavg") or (0.0,)
    return (f"{machine.get('cpu_model', '?')}, {machine.get('cpus_usable')} CPUs"
            f"{', GPU ' + gpu['name'] if gpu else ', no GPU'}, load {load[0]:.1f}; "
            f"torch {machine['versions'].get('torch')}, ray {machine['versions'].get('ray')}")


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "NOT met")


def rss_anon(pid: int) -> int:
    """Resident anonymous memory of a process (heap and private copies; not memory-mapped files), bytes."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:")), 0)
    except OSError:
        return 0


class PeriodicSampler:
    """Calls `tick()` every `interval` seconds in a daemon thread while used as a context manager,
    and once more on exit. Subclasses implement `tick`."""

    def __init__(self, interval: float) -> None:
        import threading

        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def tick(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeriodicSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.tick()


class FeatureArrays:
    """The .x/.y view study.science.trial expects."""

    def __init__(self, x: Any, y: Any) -> None:
        self.x, self.y = x, y


def clustered(n: int, d: int, labels: Any, *, seed: int, separation: float = 0.5,
              classes: int | None = None) -> Any:
    """Random float32 features with class structure: separation * center[y] + N(0, I)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    k = int(classes if classes is not None else int(np.max(labels)) + 1)
    centers = rng.standard_normal((k, d), dtype=np.float32)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x += separation * centers[labels]
    return x


def random_pair(n_train: int, n_eval: int, d: int, n: int, *, classes: int, seed: int = 0,
                zero_shot: int = 0, separation: float = 0.5) -> dict[str, tuple[Any, Any]]:
    """Arrays of a random old/new pair: {'old_train', 'new_train', 'old_eval', 'new_eval'
    [, 'zs']} -> (x float32, y int64). Old and new share labels, not centers."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y_tr = rng.integers(0, classes, n_train).astype(np.int64)
    y_ev = rng.integers(0, classes, n_eval).astype(np.int64)
    out = {
        "old_train": (clustered(n_train, d, y_tr, seed=seed + 1, separation=separation, classes=classes), y_tr),
        "new_train": (clustered(n_train, n, y_tr, seed=seed + 2, separation=separation, classes=classes), y_tr),
        "old_eval": (clustered(n_eval, d, y_ev, seed=seed + 3, separation=separation, classes=classes), y_ev),
        "new_eval": (clustered(n_eval, n, y_ev, seed=seed + 4, separation=separation, classes=classes), y_ev),
    }
    if zero_shot:
        y_z = rng.integers(0, 10, zero_shot).astype(np.int64)
        out["zs"] = (clustered(zero_shot, n, y_z, seed=seed + 5, separation=separation, classes=10), y_z)
    return out


def trial_data(arrays: dict[str, tuple[Any, Any]]):
    """study.science.trial.TrialData from `random_pair`'s dict."""
    from study.science.trial import TrialData

    zs = {"zs": FeatureArrays(*arrays["zs"])} if "zs" in arrays else {}
    return TrialData(*(FeatureArrays(*arrays[k]) for k in ("old_train", "new_train", "old_eval", "new_eval")),
                     zero_shot=zs)


def spec_from_yaml(text: str, folder: str | Path, name: str = "space.yaml"):
    """A StudySpec parsed (and validated) by the project from YAML text written to `folder`."""
    from study.space import load_space

    path = Path(folder) / name
    path.write_text(text)
    return load_space(path)


def feature_store(spec: Any, sizes: dict[tuple[str, str], int], folder: str | Path, *, classes: int = 10,
                  seed: int = 0, separation: float = 0.5) -> dict[str, Any]:
    """Handles (str(FeatureKey) -> backbones.Handle) of random features for every key of `spec`,
    stored as cache entries under `folder`, as study.tune.feature_phase would return them;
    sizes[(dataset, split)] = rows. Keys of one (dataset, split) share labels, so old/new pairs line up."""
    import numpy as np

    import backbones

    labels: dict[tuple[str, str], Any] = {}
    store = {}
    for i, key in enumerate(spec.feature_keys()):
        ds = (key.dataset, key.split)
        if ds not in labels:
            rng = np.random.default_rng([seed, len(labels)])
            labels[ds] = rng.integers(0, classes, sizes[ds]).astype(np.int64)
        y = labels[ds]
        x = clustered(len(y), backbones.backbone_cfg(key.backbone).dim, y, seed=seed * 1000 + i + 1,
                      separation=separation, classes=classes)
        store[str(key)] = backbones.write_features(x, y, Path(folder) / f"key{i}")
    return store


def run_study_on(spec: Any, store: dict, work: str | Path, *, num_cpus: int | None,
                 max_concurrent: int | None = None) -> dict:
    """Run `spec` through `study.cli.run_study` (the CLI's own path after validation: private
    local Ray via study.tune.init_ray, MLflow parent run, every Tune experiment through
    study.tune.make_tuner with the MLflow callback, study.cli.reconcile, orphans, end of study)
    with the feature phase replaced by `store` (cached features: nothing is extracted), MLflow
    to a SQLite DB in `work`, no report. Ray is shut down on return.

    Returns {"rc", "results": [ResultGrid per experiment], "make_tuner_s", "fit_s", "reconcile_s",
    "wall_s"}: wall = first make_tuner call to the end of the last reconcile (Ray start-up, the
    MLflow parent run and the feature phase come before it, as in a real study).
    """
    import argparse

    from study import cli
    from study import tune as st
    from study.tracking import StudyTracker

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    t: dict[str, float] = {"make_tuner_s": 0.0, "fit_s": 0.0, "reconcile_s": 0.0}
    marks: dict[str, float] = {}
    results: list = []
    orig = (st.feature_phase, st.make_tuner, cli.reconcile)

    def feature_phase(spec_, log=print):
        return store, {"keys": len(store), "extracted": 0, "from_cache": len(store)}

    def make_tuner(*a, **k):
        t0 = time.perf_counter()
        marks.setdefault("start", t0)
        tuner = orig[1](*a, **k)
        t["make_tuner_s"] += time.perf_counter() - t0
        fit = tuner.fit

        def timed_fit():
            t1 = time.perf_counter()
            r = fit()
            t["fit_s"] += time.perf_counter() - t1
            results.append(r)
            return r

        tuner.fit = timed_fit
        return tuner

    def reconcile(*a, **k):
        t0 = time.perf_counter()
        out = orig[2](*a, **k)
        marks["end"] = time.perf_counter()
        t["reconcile_s"] += marks["end"] - t0
        return out

    args = argparse.Namespace(address=None, num_cpus=num_cpus, max_concurrent=max_concurrent, no_report=True)
    tracker = StudyTracker(f"sqlite:///{work / 'mlflow.db'}", spec.name)
    before = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = "local"   # a private Ray even where `ray start` left a cluster running
    st.feature_phase, st.make_tuner, cli.reconcile = feature_phase, make_tuner, reconcile
    try:
        rc = cli.run_study(spec, args, str(work / "ray_results"), tracker)
    finally:
        st.feature_phase, st.make_tuner, cli.reconcile = orig
        if before is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = before
    return {"rc": rc, "results": results, **t, "wall_s": marks.get("end", 0.0) - marks.get("start", 0.0)}
