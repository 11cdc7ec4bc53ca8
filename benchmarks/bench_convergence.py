"""Benchmark: convergence of every method against Adam steps, to the plateau (issue 14, item 1).

Runs `study.science.trial.run_trial` on offline pairs with a long schedule and the cheap
per-epoch evaluation at every `--eval-every` epochs, and records B/old, B/B top-1,
D(W) = orth/B and ZS (zs/mean) against steps, for orthogonal, a few lambdas and
affine. A run is at its plateau when B/old moves by less than `PLATEAU_POINTS`
over the last 20 % of its steps (the issue's criterion); the first step from
which that holds for the rest of the run is reported as the plateau step.

    python benchmarks/bench_convergence.py                       # the three pairs, PCA 256
    python benchmarks/bench_convergence.py --pca 0 --pairs lite0-lite2 --methods lambda:12 affine
    python benchmarks/bench_convergence.py --quick               # the MNIST pair, 200 steps

Writes `benchmarks/results/convergence[_<tag>].json` and one figure per pair in `docs/img/`.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import _common as C

PLATEAU_POINTS = 0.5  # points of B/old top-1 over the last 20 % of the steps
PAIRS = {  # name: (old, new, data set, train split, eval split, zero-shot sets)
    "lite0-lite2": ("tf_efficientnet_lite0", "tf_efficientnet_lite2", "mnist", "train", "test",
                    (("photos", "all"), ("lfw_subset", "train"))),
    "mnist_old-mnist_new": ("mnist_old", "mnist_new", "mnist", "train", "test", (("digits", "test"),)),
    "lite0-lite1-digits": ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "digits", "train", "test",
                           (("photos", "all"), ("lfw_subset", "train"))),
}
METHODS = ("orthogonal", "lambda:3", "lambda:12", "lambda:22", "affine")


def plateau_step(steps: list[float], values: list[float], points: float = PLATEAU_POINTS) -> float:
    """The first evaluated step from which B/old stays within `points` of its final value."""
    final = values[-1]
    for i in range(len(values)):
        if all(abs(v - final) < points for v in values[i:]):
            return steps[i]
    return math.nan


def last_fifth_change(steps: list[float], values: list[float]) -> tuple[float, float]:
    """Over the evaluations in the last 20 % of the steps: (max - min of B/old, final minus first value)."""
    cut = steps[-1] * 0.8
    tail = [v for s, v in zip(steps, values) if s >= cut]
    return max(tail) - min(tail), tail[-1] - tail[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), help="method or lambda:<value>")
    p.add_argument("--steps", type=int, default=1600, help="Adam steps (rounded up to whole epochs)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--schedule", default="constant", choices=("constant", "cosine"))
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (the paper: 1e-3)")
    p.add_argument("--evals", type=int, default=40, help="cheap evaluations along the run")
    p.add_argument("--pca", type=int, default=256, help="TrialConfig.pca; 0 = the features as they are")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--center", action="store_true", help="TrialConfig.center: subtract each model's train mean")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="the MNIST pair, 200 steps, 3 methods")
    p.add_argument("--tag", default="", help="suffix of the result file and figures")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.pairs, args.steps, args.methods = ["mnist_old-mnist_new"], 200, ["orthogonal", "lambda:3", "affine"]
    C.setup_env()
    import torch

    import backbones
    from study.science.trial import TrialData, run_trial

    torch.set_num_threads(args.threads)
    suffix = f"_{args.tag}" if args.tag else ""
    rows = []
    for pair in args.pairs:
        old, new, dataset, train, ev, zero_shot = PAIRS[pair]
        get = lambda b, d, s: backbones.extract(b, d, s, progress=False)  # noqa: E731
        data = TrialData(get(old, dataset, train), get(new, dataset, train), get(old, dataset, ev),
                         get(new, dataset, ev), {z: get(new, z, split) for z, split in zero_shot})
        n_train = len(data.old_train.y)
        steps_per_epoch = math.ceil(n_train / args.batch_size)
        epochs = math.ceil(args.steps / steps_per_epoch)
        eval_every = max(1, epochs // args.evals)
        for entry in args.methods:
            method, _, lam = entry.partition(":")
            cfg = {"method": method, "lam": float(lam) if lam else None, "epochs": epochs,
                   "batch_size": args.batch_size, "eval_every": eval_every, "seed": args.seed, "lr": args.lr,
                   "lr_schedule": args.schedule, "center": args.center,
                   "pca": args.pca or None, "num_threads": args.threads}
            t0 = time.perf_counter()
            result = run_trial(cfg, data)
            seconds = time.perf_counter() - t0
            curves = result.curves
            steps = [e * steps_per_epoch for e in curves["eval_epoch"]]
            b_old = curves["B/old/top1"]
            tail_range, tail_drift = last_fifth_change(steps, b_old)
            row = {
                "pair": pair, "method": entry, "pca": args.pca or None, "lr": args.lr, "schedule": args.schedule, "steps": epochs * steps_per_epoch,
                "batch_size": args.batch_size, "seconds": round(seconds, 1),
                "train_s_per_step": round(result.metrics["time/train_s"] / (epochs * steps_per_epoch), 4),
                "curve": {"step": steps, **{k: curves[k] for k in ("B/old/top1", "B/B/top1", "orth/B", "zs/mean")}},
                "final": {k: result.metrics[k] for k in ("old/old/top1", "new/new/top1", "B/old/top1", "B/B/top1",
                                                         "B/F/top1", "orth/B", "zs/mean", "backfill/auc_paper",
                                                         "backfill/auc_random")},
                "plateau_step": plateau_step(steps, b_old),
                "last_fifth_change": tail_range,
                "last_fifth_drift": tail_drift,
            }
            rows.append(row)
            f = row["final"]
            print(f"{pair} {entry} pca={args.pca}: {row['steps']} steps in {seconds:.0f} s "
                  f"({row['train_s_per_step'] * 1000:.0f} ms/step); B/old {f['B/old/top1']:.1f} "
                  f"(old/old {f['old/old/top1']:.1f}), B/B {f['B/B/top1']:.1f}, D {f['orth/B']:.2f}, "
                  f"ZS {f['zs/mean']:.2f}; plateau from step {row['plateau_step']:.0f}, "
                  f"last-20% change {row['last_fifth_change']:.2f}", flush=True)
    result = {"benchmark": "convergence", "args": vars(args), "plateau_points": PLATEAU_POINTS, "runs": rows}
    path = C.write_result(result, C.RESULTS / f"convergence{suffix}.json")
    if not args.no_plots:
        _plot(rows, suffix)
    print(C.header_line(result["machine"]))
    print(C.markdown_table(
        ("pair", "method", "steps", "ms/step", "B/old", "B/B", "D(W)", "ZS", "plateau step", "last-20% change"),
        [(r["pair"], r["method"], r["steps"], f"{r['train_s_per_step'] * 1000:.0f}", f"{r['final']['B/old/top1']:.1f}",
          f"{r['final']['B/B/top1']:.1f}", f"{r['final']['orth/B']:.2f}", f"{r['final']['zs/mean']:.2f}",
          f"{r['plateau_step']:.0f}", f"{r['last_fifth_change']:.2f}") for r in rows]))
    print(f"-> {path}")
    return 0


def _plot(rows: list[dict], suffix: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("B/old/top1", "B/old top-1 %"), ("B/B/top1", "B/B top-1 %"), ("orth/B", "D(W) = ||WᵀW − I||_F"),
              ("zs/mean", "ZS (points)"))
    for pair in dict.fromkeys(r["pair"] for r in rows):
        fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
        for r in (r for r in rows if r["pair"] == pair):
            for ax, (key, label) in zip(axes, panels):
                ax.plot(r["curve"]["step"], r["curve"][key], label=r["method"])
                ax.set_xlabel("Adam step")
                ax.set_title(label)
        axes[0].legend(fontsize=8)
        pca = rows[0]["pca"]
        fig.suptitle(f"{pair}: convergence (batch {rows[0]['batch_size']}, lr {rows[0]['lr']:g} {rows[0]['schedule']}, PCA {pca or 'none'})")
        fig.tight_layout()
        out = C.ROOT / "docs" / "img" / f"convergence_{pair}{suffix}.png"
        fig.savefig(out, dpi=90)
        plt.close(fig)
        print(f"-> {out}")


if __name__ == "__main__":
    sys.exit(main())
