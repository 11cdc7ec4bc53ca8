"""Benchmark: the evaluation's two paths on the CPU, and the NumPy path's memory at N = 50,000.

In one run, on the same clustered data (D = 1280, 100 classes, cosine, leave-one-out):

  1. ``study.science.metrics.retrieval`` (top-1/5 + mAP), NumPy (a CPU trial's path) against
     ``device="cpu"`` (the torch path a CUDA trial takes, here on the CPU), N = 10,000:
     seconds (min over --repeat, interleaved) and the largest metric difference;
  2. ``study.science.metrics.backfill_curves`` as a trial calls it (paper and random orders, mAP)
     but with --points 3 (a trial has 21: 40 ranking passes instead of 4), both paths,
     N = 10,000: seconds and the largest curve difference;
  3. the NumPy path at N = 50,000 (ImageNet val's size): retrieval, and the backfill
     orders + curves with 2 points (memory does not depend on the points); peak memory as
     tracemalloc's peak (what the call allocates) and as the process RSS peak above the
     RSS before the call (sampled every 10 ms), against the N x N similarity matrix.

Differences between the paths are float noise of the similarity: the two matmuls (NumPy's
BLAS, torch's) round some scores differently in the last bit, which can swap near-ties;
on exact scores the paths agree exactly (tests/test_metrics_torch.py). The GPU timing of
the torch path is part 3 of gpu_check.py.

    python benchmarks/bench_eval_paths.py            # ~25 min on 2 cores at load 7-8 (mostly the N = 50,000 NumPy backfill)
    python benchmarks/bench_eval_paths.py --quick    # N = 2,000; memory part at 10,000: ~1 min
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from study.science import metrics  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def data(n: int, d: int, classes: int, seed: int):
    y = np.random.default_rng(seed).integers(0, classes, n)
    return C.clustered(n, d, y, seed=seed + 1, separation=0.25, classes=classes), y


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def measured(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """fn()'s result and wall / CPU seconds, tracemalloc peak and RSS peak above the start (MiB)."""
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], _rss())

    start = _rss()
    sampler = threading.Thread(target=sample, daemon=True)
    tracemalloc.start()
    sampler.start()
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    done.set()
    sampler.join()
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, {"seconds": wall, "cpu_seconds": cpu, "peak_traced_mib": traced / 2**20,
                 "peak_rss_above_start_mib": max(0, max(peak[0], _rss()) - start) / 2**20}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def backfill(old, new, y, device, points: int):
    """The trial's call: both orders (the paper's from the old side), then the curves; the queries are
    the new side itself (B(h_new)), the gallery turns from `old` (F(h_old)) into `new`."""
    orders = {kind: metrics.backfill_order(old, y, kind=kind, seed=0) for kind in ("paper", "random")}
    return metrics.backfill_curves(new, old, new, y, orders, points=points, metric="mAP", device=device)[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="N of the path comparison")
    ap.add_argument("--n-memory", type=int, default=50_000, help="N of the NumPy memory part")
    ap.add_argument("--d", type=int, default=1280)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--points", type=int, default=3,
                    help="backfill points of the path comparison (a trial: 21; each point is one ranking pass)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="N = 2,000; memory part at N = 10,000")
    ap.add_argument("--out", default=str(C.RESULTS / "eval_paths.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.n_memory, args.repeat = 2_000, 10_000, 1
    import torch

    load_before = os.getloadavg()
    x, y = data(args.n, args.d, args.classes, seed=0)
    paths = {"numpy": None, "torch-cpu": "cpu"}
    times: dict[str, list[float]] = {p: [] for p in paths}
    res: dict[str, Any] = {}
    for _ in range(args.repeat):   # interleaved: load spikes hit both alike
        for name, dev in paths.items():
            res[name], t = timed(lambda: metrics.retrieval(x, x, y, y, leave_one_out=True, device=dev))
            times[name].append(t)
    retrieval_rows = [{"path": p, "seconds": min(times[p]), "seconds_all": times[p], "metrics": res[p]}
                      for p in paths]
    retrieval_diff = max(abs(res["numpy"][k] - res["torch-cpu"][k]) for k in res["numpy"])
    print(f"[retrieval N={args.n}] numpy {min(times['numpy']):.2f} s, torch-cpu {min(times['torch-cpu']):.2f} s, "
          f"max diff {retrieval_diff:.1e}", flush=True)

    side = np.roll(x, 1, axis=1)   # a second gallery side of the same shape (what it holds does not matter)
    curves, bf_times = {}, {}
    for name, dev in paths.items():
        curves[name], bf_times[name] = timed(lambda: backfill(x, side, y, dev, args.points))
    curve_diff = max(float(np.max(np.abs(curves["numpy"][k] - curves["torch-cpu"][k]))) for k in curves["numpy"])
    print(f"[backfill N={args.n}, 2 orders x {args.points} points] numpy {bf_times['numpy']:.1f} s, "
          f"torch-cpu {bf_times['torch-cpu']:.1f} s, max diff {curve_diff:.1e}", flush=True)
    del x, y, side

    xm, ym = data(args.n_memory, args.d, args.classes, seed=0)
    full_mib = args.n_memory ** 2 * 4 / 2**20
    inputs_mib = xm.nbytes / 2**20
    mem_r, mem_stats = measured(lambda: metrics.retrieval(xm, xm, ym, ym, leave_one_out=True))
    print(f"[numpy retrieval N={args.n_memory}] {mem_stats['seconds']:.1f} s, peak traced "
          f"{mem_stats['peak_traced_mib']:.0f} MiB, RSS +{mem_stats['peak_rss_above_start_mib']:.0f} MiB "
          f"(input {inputs_mib:.0f} MiB; N x N matrix {full_mib:.0f} MiB)", flush=True)
    side = np.roll(xm, 1, axis=1)
    _, mem_bf = measured(lambda: backfill(xm, side, ym, None, 2))
    print(f"[numpy backfill N={args.n_memory}, 2 points] {mem_bf['seconds']:.1f} s, peak traced "
          f"{mem_bf['peak_traced_mib']:.0f} MiB, RSS +{mem_bf['peak_rss_above_start_mib']:.0f} MiB", flush=True)

    result = {
        "benchmark": "eval_paths",
        "params": vars(args),
        "task": "leave-one-out cosine retrieval (top-1/5 + mAP) and backfill curves, exact",
        "torch_threads": torch.get_num_threads(),
        "retrieval": {"n": args.n, "rows": retrieval_rows, "max_abs_diff": retrieval_diff},
        "backfill": {"n": args.n, "orders": 2, "points": args.points, "metric": "mAP",
                     "seconds": bf_times, "max_abs_curve_diff": curve_diff},
        "numpy_memory": {"n": args.n_memory, "d": args.d, "input_mib": inputs_mib, "similarity_matrix_mib": full_mib,
                         "retrieval": {**mem_stats, "metrics": mem_r}, "backfill_2_points": mem_bf},
        "targets": {"numpy_peak_mib_max": 1024, "max_abs_diff": 1e-4},
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "machine": C.machine_info(("numpy", "torch")),
        "notes": ["Metrics in percent; diffs in percentage points.",
                  "peak_traced_mib: the call's own allocations (normalised copies of the inputs + score blocks); "
                  "peak_rss_above_start_mib: the process's resident memory above its level before the call."],
    }
    out = C.write_result(result, args.out)
    rows = [["retrieval", f"N={args.n}, D={args.d}", f"{min(times['numpy']):.2f} s", f"{min(times['torch-cpu']):.2f} s",
             f"{retrieval_diff:.1e}"],
            ["backfill (2 orders, mAP)", f"N={args.n}, {args.points} points", f"{bf_times['numpy']:.1f} s",
             f"{bf_times['torch-cpu']:.1f} s", f"{curve_diff:.1e}"]]
    print()
    print(C.header_line(result["machine"]))
    print(C.markdown_table(["what", "size", "numpy", "torch-cpu", "max abs diff"], rows))
    print()
    print(C.markdown_table(
        ["NumPy path, N = {:,}".format(args.n_memory), "seconds", "peak traced MiB", "RSS above start MiB"],
        [["retrieval", f"{mem_stats['seconds']:.1f}", f"{mem_stats['peak_traced_mib']:.0f}",
          f"{mem_stats['peak_rss_above_start_mib']:.0f}"],
         ["backfill, 2 points", f"{mem_bf['seconds']:.1f}", f"{mem_bf['peak_traced_mib']:.0f}",
          f"{mem_bf['peak_rss_above_start_mib']:.0f}"]]))
    print(f"(input {inputs_mib:.0f} MiB; the N x N similarity matrix would be {full_mib:.0f} MiB)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
