"""Benchmark: feature-extraction throughput against a bare timm forward (issue 5, item 3).

For each data set split, on the same model (the registry's backbone with its real
offline weights) at the same batch size and input resolution (the data set's hint):

  bare      model(batch) over pre-made tensors (every image preprocessed before the
            clock starts), torch.inference_mode, one warm-up batch
  project   backbones.extract(name, dataset, split) into a fresh cache folder, as the
            feature phase calls it: weights digest, model build, data set, the
            preprocessing + forward loop, the verified cache write
            - "loop" images/s: the preprocessing + forward loop alone (meta["images_per_s"])
            - "end-to-end" images/s: the whole call

Target: project loop images/s >= 0.9 x bare (the data pipeline is not the bottleneck);
end-to-end shown too. Also reports the preprocessing alone (images/s) and checks the
features agree with the bare forward's.

    python benchmarks/bench_extraction.py              # lite0: mnist/train (4000 @64 px), photos/all (184 @224 px)
    python benchmarks/bench_extraction.py --quick      # mnist/test (1000), photos/test (92), 1 repeat
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

TARGET = 0.9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--sets", default="mnist:train,photos:all", help="comma list of dataset:split")
    ap.add_argument("--batch-size", type=int, default=64, help="extract()'s default is 64")
    ap.add_argument("--repeat", type=int, default=3, help="bare/project pairs per set (interleaved); best taken")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all usable CPUs)")
    ap.add_argument("--quick", action="store_true", help="mnist:test and photos:test, 1 repeat")
    ap.add_argument("--out", default=str(C.RESULTS / "extraction.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.sets, args.repeat = "mnist:test,photos:test", 1

    guard = C.setup_env(fresh_cache=True)   # never the user's cache: every extract() below gets a fresh one
    import numpy as np
    import torch

    import backbones
    from backbones._models import input_resolution, preprocess_for

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    t = time.perf_counter()
    bb = backbones.load(args.backbone)
    load_s = time.perf_counter() - t
    model = bb.model.eval()

    rows = []
    for item in args.sets.split(","):
        dataset, split = item.split(":")
        dcfg = backbones.dataset_cfg(dataset)
        size = input_resolution(bb.cfg, dcfg)
        prep = preprocess_for(bb.cfg, size)
        data = backbones.load_dataset(dataset, split)
        n = len(data)
        with C.Clock() as c_prep:
            tensors = torch.cat([prep.batch([data.images[i] for i in range(s, min(n, s + args.batch_size))])
                                 for s in range(0, n, args.batch_size)])
        bare_s, proj_wall, proj_loop, diffs, bare_cpu, proj_cpu = [], [], [], [], [], []
        for rep in range(args.repeat):
            # bare forward over the pre-made tensors
            with torch.inference_mode():
                model(tensors[: args.batch_size])   # warm-up
                out = np.empty((n, bb.dim), np.float32)
                t, c = time.perf_counter(), time.process_time()
                for s in range(0, n, args.batch_size):
                    out[s:s + args.batch_size] = model(tensors[s:s + args.batch_size]).float().numpy()
                bare_s.append(time.perf_counter() - t)
                bare_cpu.append(time.process_time() - c)
            # the project's extraction into a fresh cache
            cache = tempfile.mkdtemp(prefix="lambda-compat-bench-extract-")
            try:
                t, c = time.perf_counter(), time.process_time()
                feats = backbones.extract(args.backbone, dataset, split, cache_dir=cache,
                                          batch_size=args.batch_size, progress=False)
                proj_wall.append(time.perf_counter() - t)
                proj_cpu.append(time.process_time() - c)
            finally:
                shutil.rmtree(cache, ignore_errors=True)
            assert not feats.meta["from_cache"]
            proj_loop.append(float(feats.meta["seconds"]))
            diffs.append(float(np.max(np.abs(feats.x - out))))
        bare_ips = n / min(bare_s)
        loop_ips = n / min(proj_loop)
        wall_ips = n / min(proj_wall)
        rows.append({
            "dataset": dataset, "split": split, "n": n, "resolution": size, "batch_size": args.batch_size,
            "bare_s": bare_s, "project_loop_s": proj_loop, "project_call_s": proj_wall,
            "bare_images_per_s": bare_ips, "project_loop_images_per_s": loop_ips,
            "project_call_images_per_s": wall_ips,
            "ratio_loop": loop_ips / bare_ips, "ratio_call": wall_ips / bare_ips,
            "bare_cpu_s": bare_cpu, "project_call_cpu_s": proj_cpu,
            "ratio_cpu": min(bare_cpu) / min(proj_cpu),
            "preprocess_images_per_s": n / c_prep.wall,
            "fixed_costs_s": statistics.median(w - lp for w, lp in zip(proj_wall, proj_loop)),
            "max_abs_diff_vs_bare": max(diffs),
            "ok": loop_ips / bare_ips >= TARGET,
        })
        print(f"[{dataset}/{split}] n={n} @{size}px: bare {bare_ips:.1f} img/s, project loop {loop_ips:.1f}, "
              f"call {wall_ips:.1f}", flush=True)
    load_after = os.getloadavg()

    result = {
        "benchmark": "extraction",
        "params": {k: getattr(args, k) for k in ("backbone", "sets", "batch_size", "repeat", "threads", "quick")},
        "task": "backbones.extract (fresh cache) vs bare timm forward over pre-made tensors, same model, "
                "batch size and resolution",
        "model_load_s": load_s,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
        "targets": {"ratio_loop_min": TARGET},
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "machine": C.machine_info(),
        "notes": [
            "images/s from the fastest repeat of each; ratio = project / bare.",
            "loop = extract()'s preprocessing + forward loop (its meta 'seconds'); call = the whole "
            "extract() call, which adds the weights digest, model build, data set access and the cache "
            "write (fixed_costs_s = call - loop).",
            "preprocess_images_per_s: the preprocessing alone as extract() does it (Preprocess.batch per batch: "
            "PIL resize and crop per image, one tensor conversion and normalisation per batch), with torch's default threads.",
            "ratio_cpu: bare CPU seconds / project call CPU seconds (process CPU time, all threads; less "
            "sensitive to other load than wall time, blind to overlap).",
            "max_abs_diff_vs_bare: the same features either way (the float noise of batch composition).",
        ],
    }
    out = C.write_result(result, args.out)
    shutil.rmtree(guard, ignore_errors=True)
    m = result["machine"]
    print()
    print(f"{args.backbone}, batch {args.batch_size}, torch threads {torch.get_num_threads()}; "
          f"{C.header_line(m)}; load {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print()
    print(C.markdown_table(
        ["set", "images", "px", "bare img/s", "project loop img/s", "loop / bare (>= 0.9)",
         "project call img/s", "call / bare", "CPU-time ratio", "fixed costs s", "preprocess only img/s",
         "max abs diff", "target"],
        [[f"{r['dataset']}/{r['split']}", r["n"], r["resolution"], C.fmt(r["bare_images_per_s"], ".1f"),
          C.fmt(r["project_loop_images_per_s"], ".1f"), C.fmt(r["ratio_loop"], ".2f"),
          C.fmt(r["project_call_images_per_s"], ".1f"), C.fmt(r["ratio_call"], ".2f"), C.fmt(r["ratio_cpu"], ".2f"),
          C.fmt(r["fixed_costs_s"], ".1f"), C.fmt(r["preprocess_images_per_s"], ".0f"),
          C.fmt(r["max_abs_diff_vs_bare"], ".1e"), C.verdict(r["ok"])] for r in rows]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
