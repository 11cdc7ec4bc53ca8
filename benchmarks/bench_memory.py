"""Benchmark: do concurrent trials on one node share one copy of the features? (issue 5, item 4)

Four runs, each in a fresh private Ray session (`--num-cpus` CPUs, 1 CPU per trial):

  idle x1, idle x2   a Tune function trainable that imports what a trial imports (torch,
                     study.science.trial), sleeps and reports once with a tiny checkpoint, as a
                     trial does: the framework baseline, no features
  one, pair          the CLI's path (study.cli.run_study with the feature phase replaced by
                     cached random features written as cache entries: trials get their
                     handles and memory-map them; the MLflow callback to a temp SQLite DB)
                     with 1 and 2 concurrent trials on features large enough to dominate
                     (default old + new train 50,000 x 1024 float32 = 2 x 200 MB)

A thread samples memory of the driver and every process below it (Ray's processes and
workers) every `--interval` s; the peak of each sum over a run is kept. Accountings:

  anonymous + features  (judged) sum of RssAnon (heap and any private copy) over Ray
               worker processes, plus the features' bytes once (the page-cache copy
               that every trial of the node maps). A copy a trial makes is anonymous.
  PSS total    (cross-check) sum of PSS over driver + all Ray processes. PSS splits every
               shared page among the processes that map it, so the mapped features
               count once however many trials map them; the driver's own drift between
               runs makes it noisier.
  USS + features (reference) USS counts mapped file pages that one process alone maps,
               so a lone trial's feature pages are counted twice there.

ratio = (pair - idle x2) / (one - idle x1), target <= 1.3 (one copy shared: ~1.0 plus each
trial's own working memory; a private copy per trial: ~2). RSS sums are shown for
reference only (they count every shared page once per process).

    python benchmarks/bench_memory.py            # 50,000 x 1024, 1 epoch affine
    python benchmarks/bench_memory.py --quick    # 20,000 x 1024
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

JUDGED = "anonymous workers + features"
TARGET = 1.3
MiB = 2**20

SPACE = """\
name: {name}
pairs:
  - {{old: densenet121, new: vit_large_patch16_224}}
datasets:
  - {{name: mnist, train: train, eval: test}}
methods: [{method}]
lambdas: [12]
alpha: 10
seeds: [{seeds}]
train: {{epochs: {epochs}, batch_size: {batch}}}
resources: {{cpu: 1, gpu: 0}}
max_failures: 0
"""


def idle_trial(config):
    """Framework baseline: a trial's imports and its final report with a (tiny) checkpoint, as run_one
    makes; no features. Holds for config['hold'] seconds."""
    import json as _json
    import tempfile as _tempfile
    import time as _t
    from pathlib import Path as _Path

    import torch  # noqa: F401
    from ray import tune as _tune

    import study.science.trial  # noqa: F401

    _t.sleep(float(config["hold"]))
    with _tempfile.TemporaryDirectory() as tmp:
        (_Path(tmp) / "metrics.json").write_text(_json.dumps({"idle": 1}))
        _tune.report({"done_idle": 1}, checkpoint=_tune.Checkpoint.from_directory(tmp))


class Sampler(C.PeriodicSampler):
    """Samples memory of this process and all its descendants in a thread; keeps the peaks."""

    def __init__(self, interval: float) -> None:
        import psutil

        super().__init__(interval)
        self.psutil = psutil
        self.me = psutil.Process()
        self.samples: list[dict] = []

    def sample(self) -> dict:
        ps = self.psutil
        tot = {"pss": 0, "uss": 0, "rss": 0, "workers_uss": 0, "workers_pss": 0, "workers_rss": 0, "workers_anon": 0,
               "workers": 0}
        procs = []
        for p in [self.me] + self.me.children(recursive=True):
            try:
                mi = p.memory_full_info()
                cmd = p.cmdline()
            except (ps.NoSuchProcess, ps.AccessDenied, ps.ZombieProcess, OSError):
                continue
            tot["pss"] += mi.pss
            procs.append([p.pid, (cmd[0] if cmd else p.name())[:60], round(mi.pss / MiB, 1), round(mi.uss / MiB, 1),
                          round(mi.rss / MiB, 1)])
            tot["uss"] += mi.uss
            tot["rss"] += mi.rss
            if cmd and cmd[0].startswith("ray::"):
                tot["workers"] += 1
                tot["workers_uss"] += mi.uss
                tot["workers_pss"] += mi.pss
                tot["workers_rss"] += mi.rss
                tot["workers_anon"] += C.rss_anon(p.pid)
        tot["t"] = time.perf_counter()
        tot["procs"] = procs
        return tot

    def tick(self) -> None:
        self.samples.append(self.sample())

    def peaks(self) -> dict:
        keys = ("pss", "uss", "rss", "workers_uss", "workers_pss", "workers_rss", "workers_anon", "workers")
        out = {k: max(s[k] for s in self.samples) for k in keys}
        # per process at the PSS peak: [pid, command, PSS MiB, USS MiB, RSS MiB]
        out["procs_at_pss_peak"] = max(self.samples, key=lambda s: s["pss"])["procs"]
        return out


def run_idle(k: int, hold: float, work: Path, interval: float, num_cpus: int) -> dict:
    from ray import tune

    with C.private_ray(num_cpus):
        time.sleep(2.0)
        base = Sampler(interval).sample()
        base.pop("procs")
        with Sampler(interval) as s:
            tune.Tuner(tune.with_resources(idle_trial, {"cpu": 1}),
                       param_space={"hold": hold, "i": tune.grid_search(list(range(k)))},
                       tune_config=tune.TuneConfig(reuse_actors=True),
                       run_config=tune.RunConfig(name=f"idle{k}", storage_path=str(work / "ray_results"),
                                                 verbose=0)).fit()
    return {"config": f"idle x{k}", "trials": k, "store_bytes": 0, "session_idle": base, "peak": s.peaks(),
            "seconds": s.samples[-1]["t"] - s.samples[0]["t"], "series": _series(s.samples)}


def run_trials(k: int, args, work: Path) -> dict:
    """k concurrent trials through study.cli.run_study (its own private Ray), sampled throughout."""
    seeds = ", ".join(str(i) for i in range(k))
    spec = C.spec_from_yaml(SPACE.format(name=f"bench-memory-{k}", method=args.method, seeds=seeds,
                                         epochs=args.epochs, batch=args.batch_size), work, f"memory{k}.yaml")
    store = C.feature_store(spec, {("mnist", "train"): args.n, ("mnist", "test"): args.n_eval}, work / f"features{k}")
    nbytes = sum(h.rows * (h.dim * 4 + 8) for h in store.values())
    with Sampler(args.interval) as s:
        out = C.run_study_on(spec, store, work / f"trials{k}", num_cpus=args.num_cpus)
    del store
    results = [r for grid in out["results"] for r in grid]
    finished = sum(r.error is None for r in results)
    if out["rc"] != 0 or finished != k:
        raise RuntimeError(f"memory run x{k}: exit code {out['rc']}, {finished}/{k} finished")
    return {"config": f"{'one' if k == 1 else 'pair' if k == 2 else k}", "trials": k, "store_bytes": nbytes,
            "peak": s.peaks(), "seconds": s.samples[-1]["t"] - s.samples[0]["t"], "fit_s": out["fit_s"],
            "max_concurrent_workers": s.peaks()["workers"], "series": _series(s.samples)}


def _series(samples: list[dict], keep: int = 200) -> list[list[float]]:
    step = max(1, len(samples) // keep)
    t0 = samples[0]["t"]
    return [[round(x["t"] - t0, 2), round(x["pss"] / MiB, 1), round(x["workers_uss"] / MiB, 1), x["workers"]]
            for x in samples[::step]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=50_000, help="train rows of old and new features")
    ap.add_argument("--dim", type=int, default=1024, help="feature dim (densenet121 -> vit_large: 1024 both)")
    ap.add_argument("--n-eval", type=int, default=2000, help="eval rows (small: evaluation is not the point)")
    ap.add_argument("--method", default="affine")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--interval", type=float, default=0.25, help="sampling period, s")
    ap.add_argument("--hold", type=float, default=8.0, help="seconds an idle trial holds")
    ap.add_argument("--quick", action="store_true", help="n = 20,000")
    ap.add_argument("--out", default=str(C.RESULTS / "memory.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.n = 20_000
    if args.dim != 1024:
        raise SystemExit("--dim: the space's backbones are 1024-d; only 1024 is supported")

    C.setup_env(fresh_cache=True)
    import mlflow  # noqa: F401  - the driver's imports, before any measurement
    import psutil  # noqa: F401
    import torch  # noqa: F401

    import study.science.trial  # noqa: F401
    from study import tune as st  # noqa: F401

    work = Path(tempfile.mkdtemp(prefix="lambda-compat-bench-memory-"))
    load_before = os.getloadavg()
    runs = [run_idle(1, args.hold, work, args.interval, args.num_cpus),
            run_idle(2, args.hold, work, args.interval, args.num_cpus),
            run_trials(1, args, work), run_trials(2, args, work)]
    load_after = os.getloadavg()
    by = {r["config"]: r for r in runs}

    def ratio(metric) -> dict:
        one = metric(by["one"]) - metric(by["idle x1"])
        pair = metric(by["pair"]) - metric(by["idle x2"])
        return {"one_mib": one / MiB, "pair_mib": pair / MiB, "ratio": pair / one if one > 0 else None}

    acct = {
        "anonymous workers + features": ratio(lambda r: r["peak"]["workers_anon"] + r["store_bytes"]),
        "PSS total": ratio(lambda r: r["peak"]["pss"]),
        "USS workers + features": ratio(lambda r: r["peak"]["workers_uss"] + r["store_bytes"]),
        "RSS total (reference)": ratio(lambda r: r["peak"]["rss"]),
    }
    judged = acct[JUDGED]
    ok = judged["ratio"] is not None and judged["ratio"] <= TARGET
    store_mib = by["one"]["store_bytes"] / MiB
    result = {
        "benchmark": "memory",
        "params": {k: getattr(args, k) for k in ("n", "dim", "n_eval", "method", "epochs", "batch_size", "num_cpus",
                                                   "interval", "hold", "quick")},
        "task": "peak memory of 1 and 2 concurrent project trials on one node, minus idle-trial baselines",
        "features_mib": store_mib,
        "runs": runs,
        "accountings": acct,
        "target": {"ratio_max": TARGET, "met": ok, "accounting": JUDGED},
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "machine": C.machine_info(),
        "notes": [
            "anonymous workers + features (the target's accounting): resident anonymous memory (RssAnon: heap "
            "and any private copy a trial makes) of the Ray worker processes + the features' bytes once (the "
            "cache entries the trials memory-map: one page-cache copy shared by every trial of the node).",
            "USS workers + features (reference): USS also counts mapped file pages that only one process maps, "
            "so a lone trial's touched feature pages are counted twice there.",
            "PSS total (cross-check): driver + every Ray process (raylet, gcs, workers); shared pages are "
            "split among the processes mapping them, so the store's copy counts once. It includes the driver, "
            "whose own memory drifts from run to run in one process (MLflow, freed feature arrays), so it is "
            "less steady than the USS accounting.",
            "idle trials import torch and study.science.trial and sleep: the per-trial framework cost is in the "
            "baseline, the features and what a trial does with them are not.",
            "pair: 2 trials with 1 CPU each on 2 CPUs run concurrently (see max_concurrent_workers).",
            "series: [t s, PSS total MiB, workers USS MiB, worker processes], downsampled.",
        ],
    }
    out = C.write_result(result, args.out)
    shutil.rmtree(work, ignore_errors=True)

    m = result["machine"]
    print()
    print(f"features {store_mib:.0f} MiB in memory-mapped cache entries (old + new, train {args.n} x {args.dim} + eval "
          f"{args.n_eval}); {args.method}, {args.epochs} epoch(s); {C.header_line(m)}; "
          f"load {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print()
    print(C.markdown_table(
        ["run", "trials", "peak PSS total MiB", "peak USS workers MiB", "peak RSS total MiB", "worker procs (max)",
         "seconds"],
        [[r["config"], r["trials"], C.fmt(r["peak"]["pss"] / MiB, ".0f"), C.fmt(r["peak"]["workers_uss"] / MiB, ".0f"),
          C.fmt(r["peak"]["rss"] / MiB, ".0f"), r["peak"]["workers"], C.fmt(r["seconds"], ".1f")] for r in runs]))
    print()
    print(C.markdown_table(
        ["accounting", "one - idle x1 MiB", "pair - idle x2 MiB", "pair / one", f"target <= {TARGET} (on {JUDGED})"],
        [[k, C.fmt(v["one_mib"], ".0f"), C.fmt(v["pair_mib"], ".0f"), C.fmt(v["ratio"], ".2f"),
          C.verdict(v["ratio"] is not None and v["ratio"] <= TARGET) if k == JUDGED else "-"]
         for k, v in acct.items()]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
