"""Benchmark: float16 feature storage against float32 on the default grid's trials (issue 10, item 4).

`features: {dtype: float16}` halves the feature cache and what a trial reads; each
batch is cast back to float32 before training. This runs `study.science.trial.run_trial` on
the default grid's (`search_spaces/grid.yaml`) pairs and training settings, seed 0,
for orthogonal, lambda = 12 and affine, once on float32 features and once on the same
features rounded to float16 (exactly what a float16 cache entry stores: the float32
embedding cast, tests/test_cache.py), and reports each metric's difference.

    python benchmarks/bench_precision.py            # both pairs, 3 methods
    python benchmarks/bench_precision.py --quick    # the MNIST pair only
"""
from __future__ import annotations

import argparse
import sys
import time
from types import SimpleNamespace as NS

import _common as C

METRICS = ("old/old/top1", "new/new/top1", "B/old/top1", "B/F/top1", "B/B/top1", "F/F/top1", "B/old/mAP", "zs/mean",
           "orth/B", "backfill/auc_paper", "backfill/auc_random")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(C.RESULTS / "precision.json"))
    args = p.parse_args()
    C.setup_env()
    import numpy as np
    import torch

    import backbones
    from study.space import load_space
    from study.science.trial import TrialData, run_trial
    from study.tune import trial_config

    torch.set_num_threads(2)
    spec = load_space(C.ROOT / "search_spaces" / "grid.yaml")
    pairs = spec.pairs[1:] if args.quick else spec.pairs
    rows, diffs = [], {m: [] for m in METRICS}
    for pair in pairs:
        ds = spec.datasets[0]
        get = lambda b, d, s: backbones.extract(b, d, s, progress=False)  # noqa: E731
        f32 = TrialData(get(pair.old, ds.dataset, ds.train), get(pair.new, ds.dataset, ds.train),
                        get(pair.old, ds.dataset, ds.eval), get(pair.new, ds.dataset, ds.eval),
                        {z.dataset: get(pair.new, z.dataset, z.split) for z in spec.zero_shot_for(pair)})
        half = lambda f: NS(x=np.asarray(f.x).astype(np.float16), y=f.y)  # noqa: E731
        f16 = TrialData(half(f32.old_train), half(f32.new_train), half(f32.old_eval), half(f32.new_eval),
                        {k: half(v) for k, v in f32.zero_shot.items()})
        for method, lam in (("orthogonal", None), ("lambda", 12.0), ("affine", None)):
            cfg = trial_config({"train": spec.train, "method": method, "seed": 0, "lam": lam})
            t0 = time.perf_counter()
            a = run_trial(cfg, f32).metrics
            b = run_trial(cfg, f16).metrics
            for m in METRICS:
                diffs[m].append(b[m] - a[m])
            rows.append({"pair": pair.name, "method": method if lam is None else f"lambda {lam:g}",
                         "float32": {m: a[m] for m in METRICS}, "float16": {m: b[m] for m in METRICS},
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{pair.name} {rows[-1]['method']}: " + ", ".join(f"{m} {a[m]:.2f}->{b[m]:.2f}" for m in METRICS[2:6]),
                  flush=True)
    worst = {m: max(abs(v) for v in vs) for m, vs in diffs.items()}
    result = {"benchmark": "precision", "quick": args.quick, "trials": rows, "max_abs_diff": worst}
    path = C.write_result(result, args.out)
    print(C.header_line(result["machine"]))
    print(C.markdown_table(("metric", "max |float16 - float32| (points)"), [(m, f"{v:.3f}") for m, v in worst.items()]))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
