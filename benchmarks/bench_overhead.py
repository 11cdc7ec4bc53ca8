"""Benchmark: study overhead against bare Ray Tune, and the feature-extraction count (issue 5, item 2).

Each run in its own private Ray session (`--num-cpus` CPUs, 1 CPU per trial):

  project   a lambda grid of `--trials` trials on cached random features through the
            CLI's own path: a StudySpec parsed from YAML, study.cli.run_study with the
            feature phase replaced by the cached features (study.tune.experiments +
            make_tuner: with_parameters features, reuse_actors, per-epoch reports, the
            final checkpoint, the MLflow callback writing to a temp SQLite DB; then
            study.cli.reconcile). Per-trial compute = the trial's own time/train_s +
            time/eval_s.
  bare      plain Ray Tune defaults (function trainable, no callbacks, reuse_actors
            False) running the same number of busy-loop trials; each spins for the
            per-trial compute of our trial measured first in this process (1 thread),
            reporting as often as our trial does (once per epoch + a final report).

For each: ideal = sum(per-trial compute) / concurrent slots; ratio = wall / ideal;
overhead per trial = (wall - ideal) * slots / trials. Target: project ratio - bare
ratio <= 0.05. Run for each `--epochs` value (trial length).

Extraction count: a first study's feature phase (study.tune.feature_phase) on a fresh
cache over two pairs that share a backbone (tf_efficientnet_lite0 -> lite1 and
lite0 -> lite2 on sklearn digits at its 32 px hint: 6 unique keys, 8 naive) must
extract exactly once per unique key; a second study over the same keys, zero times.

    python benchmarks/bench_overhead.py                    # epochs 5 and 40 (~2 s and ~9 s trials), 16 trials, 2 repeats
    python benchmarks/bench_overhead.py --quick            # epochs 1, 1 repeat
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET_RATIO_DIFF = 0.05

SPACE = """\
name: {name}
pairs:
  - {{old: mnist_old, new: mnist_new}}
datasets:
  - {{name: mnist, train: train, eval: test}}
zero_shot: [digits]
methods: [{method}]
lambdas: [{lambdas}]
alpha: 10
seeds: [{seeds}]
train: {{epochs: {epochs}}}
resources: {{cpu: 1, gpu: 0}}
optimize: {{metric: B/old/top1, mode: max}}
max_failures: 0
"""

COUNT_SPACE = """\
name: bench-extraction-count
pairs:
  - {{old: {a}, new: {b}}}
  - {{old: {a}, new: {c}}}
datasets:
  - {{name: {dataset}, train: train, eval: test}}
methods: [affine]
seeds: [0]
"""


def spin(iterations: int) -> int:
    """A fixed amount of pure-Python CPU work (slows down under contention as our trial does)."""
    x = 0
    for _ in range(iterations):
        x += 1
    return x


def busy_trial(config):
    """Bare Tune trainable: config['iterations'] of spin() in config['reports'] parts, one report after each.
    busy_s (the trial's compute) is measured inside the trial, like our trial's time/train_s + eval_s."""
    import time as _t

    from ray import tune as _tune

    iterations, reports = int(config["iterations"]), int(config["reports"])
    start = _t.perf_counter()
    for i in range(1, reports + 1):
        spin(iterations // reports)
        _tune.report({"step": i, "busy_s": _t.perf_counter() - start})


def spin_rate(seconds: float = 0.5, repeat: int = 3) -> float:
    """spin() iterations per second in this process (median of `repeat`)."""
    rates = []
    for _ in range(repeat):
        n = 1_000_000
        t = time.perf_counter()
        spin(n)
        dt = time.perf_counter() - t
        n = max(n, int(n * seconds / dt))
        t = time.perf_counter()
        spin(n)
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def grid_space(args, epochs: int, name: str, folder: Path):
    trials = args.trials if args.method == "lambda" else 1
    lambdas = ", ".join(f"{0.5 * i:g}" for i in range(trials)) if args.method == "lambda" else "1"
    seeds = "0" if args.method == "lambda" else ", ".join(str(i) for i in range(args.trials))
    text = SPACE.format(name=name, method=args.method, lambdas=lambdas, seeds=seeds, epochs=epochs)
    spec = C.spec_from_yaml(text, folder, f"{name}.yaml")
    assert len(spec.trials()) == args.trials, len(spec.trials())
    return spec


def calibrate(spec, store, repeat: int) -> dict:
    """Per-trial compute of the grid's first trial, in this process, 1 thread (a trial's CPU share)."""
    import torch
    from threadpoolctl import threadpool_limits

    from study import tune as st
    from study.science.trial import run_trial

    cfg = spec.trials()[0]
    data = st.trial_data(cfg, store)   # the trial's own keys, memory-mapped, as a Ray trial opens them
    old_threads, old_omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"   # study.science.metrics sizes its thread pool from it, as in a trial
    torch.set_num_threads(1)
    walls, computes = [], []
    try:
        with threadpool_limits(1):
            run_trial(st.trial_config(cfg), data)   # warm-up (first-call costs)
            for _ in range(repeat):
                t = time.perf_counter()
                res = run_trial(st.trial_config(cfg), data)
                walls.append(time.perf_counter() - t)
                computes.append(res.metrics["time/train_s"] + res.metrics["time/eval_s"])
    finally:
        torch.set_num_threads(old_threads)
        if old_omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old_omp
    return {"wall_s": walls, "compute_s": computes, "seconds": statistics.median(walls)}


def run_project(spec, store, work: Path, tag: str, slots: int) -> dict:
    """The study through study.cli.run_study (own private Ray session), features from `store`."""
    out = C.run_study_on(spec, store, work / f"project-{tag}", num_cpus=slots)
    results = [r for grid in out["results"] for r in grid]
    compute = [r.metrics["time/train_s"] + r.metrics["time/eval_s"] for r in results if r.error is None]
    if out["rc"] != 0 or len(compute) != len(spec.trials()):
        raise RuntimeError(f"project run: exit code {out['rc']}, {len(compute)}/{len(spec.trials())} finished")
    return summarise("project", out["wall_s"], compute, slots, make_tuner_s=out["make_tuner_s"],
                     fit_s=out["fit_s"], reconcile_s=out["reconcile_s"])


def run_bare(n: int, iterations: int, reports: int, work: Path, tag: str, slots: int) -> dict:
    """Bare Ray Tune defaults in its own private Ray session (as the project run has one)."""
    from ray import tune

    with C.private_ray(slots):
        t0 = time.perf_counter()
        tuner = tune.Tuner(
            tune.with_resources(busy_trial, {"cpu": 1}),
            param_space={"iterations": iterations, "reports": reports, "i": tune.grid_search(list(range(n)))},
            run_config=tune.RunConfig(name=f"bare-{tag}", storage_path=str(work / "ray_results"), verbose=1),
        )
        t1 = time.perf_counter()
        results = tuner.fit()
        wall = time.perf_counter() - t0
        fit = time.perf_counter() - t1
    compute = [r.metrics["busy_s"] for r in results if r.error is None]
    if len(compute) != n:
        raise RuntimeError(f"bare run: {len(compute)}/{n} finished")
    return summarise("bare Tune", wall, compute, slots, make_tuner_s=t1 - t0, fit_s=fit, reconcile_s=0.0)


def summarise(run: str, wall: float, compute: list[float], slots: int, **extra) -> dict:
    ideal = sum(compute) / slots
    return {"run": run, "trials": len(compute), "wall_s": wall, "ideal_s": ideal, "ratio": wall / ideal,
            "overhead_per_trial_s": (wall - ideal) * slots / len(compute),
            "compute_s": compute, "compute_median_s": statistics.median(compute), **extra}


def extraction_count(args, work: Path) -> dict:
    import backbones
    from study import tune as st

    a, b, c = args.count_backbones.split(",")
    spec = C.spec_from_yaml(COUNT_SPACE.format(a=a, b=b, c=c, dataset=args.count_dataset), work, "count.yaml")
    keys = spec.feature_keys()
    naive = sum(2 * 2 for _ in spec.pairs)   # each pair: old + new on train + eval
    root = backbones.cache_root()
    before = sorted(p.parent.name for p in root.glob("features/*/*/*/meta.json"))
    out = {"keys": [str(k) for k in keys], "unique_keys": len(keys), "naive_keys": naive,
           "cache_root": str(root), "cache_entries_before": len(before)}
    logs: list[str] = []
    for study in ("first", "second"):
        t = time.perf_counter()
        _, counts = st.feature_phase(spec, log=logs.append)
        out[study] = {**counts, "seconds": time.perf_counter() - t}
    out["cache_entries_after"] = len(list(root.glob("features/*/*/*/meta.json")))
    out["log"] = logs
    out["first_ok"] = out["first"]["extracted"] == len(keys) and out["first"]["from_cache"] == 0
    out["second_ok"] = out["second"]["extracted"] == 0 and out["second"]["from_cache"] == len(keys)
    out["cold_start"] = out["cache_entries_before"] == 0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=16, help="trials per run (>= 16 for the issue's figure)")
    ap.add_argument("--epochs", default="5,40",
                    help="comma list: one project/bare pair of runs per trial length (epochs of our trial)")
    ap.add_argument("--method", default="lambda", help="method of the grid (lambda: a lambda grid; else seeds)")
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the private Ray (= concurrent slots)")
    ap.add_argument("--repeat", type=int, default=2, help="project/bare pairs per trial length (order alternates)")
    ap.add_argument("--n-train", type=int, default=4000, help="rows of the train split (MNIST-5000's 4000)")
    ap.add_argument("--n-eval", type=int, default=1000, help="rows of the eval split")
    ap.add_argument("--n-zs", type=int, default=360, help="rows of the zero-shot set (digits test)")
    ap.add_argument("--calibrate-repeat", type=int, default=2)
    ap.add_argument("--count-backbones", default="tf_efficientnet_lite0,tf_efficientnet_lite1,tf_efficientnet_lite2",
                    help="a,b,c: the count study's pairs are a->b and a->c")
    ap.add_argument("--count-dataset", default="digits")
    ap.add_argument("--skip-count", action="store_true", help="skip the extraction-count check")
    ap.add_argument("--skip-overhead", action="store_true", help="only the extraction-count check")
    ap.add_argument("--cache-dir", default=None,
                    help="feature cache root (default: a fresh temp folder, so the first study is cold)")
    ap.add_argument("--quick", action="store_true", help="epochs 1, 1 repeat, 1 calibration run")
    ap.add_argument("--out", default=str(C.RESULTS / "overhead.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.repeat, args.calibrate_repeat = "1", 1, 1
    epochs_list = [int(e) for e in args.epochs.split(",")]

    cache = C.setup_env(args.cache_dir, fresh_cache=args.cache_dir is None)
    work = Path(tempfile.mkdtemp(prefix="lambda-compat-bench-overhead-"))
    load_before = os.getloadavg()
    slots = args.num_cpus
    sizes = {("mnist", "train"): args.n_train, ("mnist", "test"): args.n_eval, ("digits", "test"): args.n_zs}

    runs: list[dict] = []
    calib: dict[int, dict] = {}
    count = None
    specs = {e: grid_space(args, e, f"bench-overhead-e{e}", work) for e in epochs_list}
    stores = {e: C.feature_store(specs[e], sizes, work / f"features-e{e}") for e in epochs_list}
    if not args.skip_overhead:
        for e in epochs_list:
            calib[e] = calibrate(specs[e], stores[e], args.calibrate_repeat)
            calib[e]["spin_rate_per_s"] = rate = spin_rate()
            calib[e]["iterations"] = int(rate * calib[e]["seconds"])
            print(f"[calibrate] epochs={e}: our trial takes {calib[e]['seconds']:.2f} s in this process "
                  f"(1 thread; runs {', '.join(f'{w:.2f}' for w in calib[e]['wall_s'])})", flush=True)
    # every run below starts its own private Ray session
    for e in epochs_list if not args.skip_overhead else []:
        for rep in range(args.repeat):
            order = ("bare", "project") if rep % 2 == 0 else ("project", "bare")
            for which in order:
                tag = f"e{e}-r{rep}"
                if which == "bare":
                    r = run_bare(args.trials, calib[e]["iterations"], e + 1, work, tag, slots)
                else:
                    r = run_project(specs[e], stores[e], work, tag, slots)
                r.update(epochs=e, repeat=rep)
                runs.append(r)
                print(f"[{which}] epochs={e} rep={rep}: wall {r['wall_s']:.1f} s, ideal "
                      f"{r['ideal_s']:.1f} s, ratio {r['ratio']:.3f}", flush=True)
    if not args.skip_count:
        with C.private_ray(args.num_cpus):
            count = extraction_count(args, work)
    load_after = os.getloadavg()

    summary = []
    for e in epochs_list:
        pr = [r for r in runs if r["epochs"] == e and r["run"] == "project"]
        br = [r for r in runs if r["epochs"] == e and r["run"] == "bare Tune"]
        if not pr or not br:
            continue
        p_ratio = statistics.median(r["ratio"] for r in pr)
        b_ratio = statistics.median(r["ratio"] for r in br)
        p_over = statistics.median(r["overhead_per_trial_s"] for r in pr)
        b_over = statistics.median(r["overhead_per_trial_s"] for r in br)
        summary.append({"epochs": e, "trial_compute_s": calib[e]["seconds"], "project_ratio": p_ratio,
                        "bare_ratio": b_ratio, "ratio_diff": p_ratio - b_ratio,
                        "project_overhead_per_trial_s": p_over, "bare_overhead_per_trial_s": b_over,
                        "ratio_diff_ok": p_ratio - b_ratio <= TARGET_RATIO_DIFF,
                        "overhead_below_bare": p_over < b_over})

    result = {
        "benchmark": "overhead",
        "params": {k: getattr(args, k) for k in ("trials", "epochs", "method", "num_cpus", "repeat", "n_train",
                                                   "n_eval", "n_zs", "quick")},
        "task": "lambda grid on cached random features: project path (make_tuner + MLflow SQLite callback + "
                "reconcile) vs bare Ray Tune busy-loop trials of the same compute, same Ray session",
        "slots": slots,
        "cache_root": str(cache),
        "calibration": {str(k): v for k, v in calib.items()},
        "runs": runs,
        "summary": summary,
        "extraction_count": count,
        "targets": {"ratio_diff_max": TARGET_RATIO_DIFF, "overhead_per_trial": "below bare Tune's",
                    "extractions": "first study: one per unique key; second: zero"},
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "machine": C.machine_info(),
        "notes": [
            "ratio = wall / ideal, ideal = sum of per-trial compute / slots; overhead per trial = "
            "(wall - ideal) * slots / trials.",
            "project per-trial compute = time/train_s + time/eval_s reported by run_trial (inside Ray, "
            "under the run's own contention); feature conversion, imports, reports, checkpoints, MLflow "
            "and scheduling count as overhead.",
            "project = study.cli.run_study with the feature phase replaced by the cached random features, "
            "MLflow to a temp SQLite DB, no report; wall = make_tuner (features put in the object store "
            "once) + fit + reconcile, after Ray start-up and the MLflow parent run, as in a real study. "
            "bare wall = Tuner() + fit. Each run has its own private Ray session (same CPUs).",
            "bare Tune trials run a fixed amount of pure-Python CPU work sized to the calibrated length of "
            "our trial (1 thread, this process, before Ray starts), split over as many tune.report calls as "
            "our trial makes (one per epoch + the final one); their compute (busy_s) is measured inside the "
            "trial, so contention stretches both kinds of trial alike.",
        ],
    }
    out = C.write_result(result, args.out)
    shutil.rmtree(work, ignore_errors=True)
    if args.cache_dir is None:
        shutil.rmtree(cache, ignore_errors=True)

    m = result["machine"]
    print()
    print(f"{args.trials} trials, {slots} slots (1 CPU each), {m.get('cpus_usable')} CPUs; "
          f"{C.header_line(m)}; load {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print()
    print(C.markdown_table(
        ["epochs", "run", "rep", "per-trial compute s (median)", "ideal s", "wall s", "wall / ideal",
         "overhead per trial s"],
        [[r["epochs"], r["run"], r["repeat"], C.fmt(r["compute_median_s"]), C.fmt(r["ideal_s"], ".1f"),
          C.fmt(r["wall_s"], ".1f"), C.fmt(r["ratio"], ".3f"), C.fmt(r["overhead_per_trial_s"])] for r in runs]))
    if summary:
        print()
        print(C.markdown_table(
            ["epochs", "trial s", "bare ratio", "project ratio", "project - bare (<= 0.05)",
             "overhead/trial bare s", "overhead/trial project s", "ratio target", "below bare"],
            [[s["epochs"], C.fmt(s["trial_compute_s"]), C.fmt(s["bare_ratio"], ".3f"),
              C.fmt(s["project_ratio"], ".3f"), C.fmt(s["ratio_diff"], "+.3f"),
              C.fmt(s["bare_overhead_per_trial_s"]), C.fmt(s["project_overhead_per_trial_s"]),
              C.verdict(s["ratio_diff_ok"]), "yes" if s["overhead_below_bare"] else "no"] for s in summary]))
    if count:
        print()
        print(f"extraction count ({count['unique_keys']} unique keys, {count['naive_keys']} naive; "
              f"cache {'cold' if count['cold_start'] else 'NOT cold'} at start):")
        print(C.markdown_table(
            ["study", "extracted", "from cache", "seconds", "expected", "verdict"],
            [["first", count["first"]["extracted"], count["first"]["from_cache"], C.fmt(count["first"]["seconds"], ".1f"),
              f"{count['unique_keys']} extracted", C.verdict(count["first_ok"])],
             ["second", count["second"]["extracted"], count["second"]["from_cache"],
              C.fmt(count["second"]["seconds"], ".1f"), "0 extracted", C.verdict(count["second_ok"])]]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
