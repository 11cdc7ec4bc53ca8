"""Benchmark: one trial's time, broken down, per method (issue 5, item 5).

`study.science.trial.run_trial` on random clustered features at two sizes:

  default   the embedded default's EfficientNet-Lite pair on MNIST: 4,000 train and
            1,000 eval rows, d = n = 1280, 10 classes, 92 zero-shot rows (photos test),
            batch 256, 40 epochs (TrialConfig's defaults)
  paper     N = 50,000 train rows, 10,000 eval rows (a CIFAR-100-sized test split),
            d = n = 1024, 100 classes, no zero-shot set, batch 512 and 40 epochs
            (search_spaces/paper.yaml)

for the methods orthogonal (B = exp(P)), affine and lambda (lam = 12, alpha = 10).
Nothing in the project is edited: the phases are timed by wrapping, for the
duration of the run, the names study.science.trial looks up (train's batch_loss and
on_epoch, build_regularizer's callable, the orthogonal parametrization's forward,
_Evaluator.rows, _backfill, _zero_shot). Phases:

  train      loss forward (includes the regulariser's and exp(P)'s forward),
             backward + Adam step (the rest of each step), cheap eval at epoch ends
  eval       final retrieval rows, zero-shot, backfill curves

Forward/backward of the regulariser and of exp(P) are also timed in isolation per
step (fwd + bwd), next to a whole affine training step, so their share of a step is
visible. `--epochs` / `--paper-epochs` cut training (the paper size takes minutes);
per-epoch times are reported and the full-length trial is extrapolated.
`--profile` adds a torch.profiler table (top ops by self CPU time) of one epoch.

    python benchmarks/bench_trial.py                           # default size 40 epochs, paper size 2 epochs
    python benchmarks/bench_trial.py --quick                   # small sizes, 2 epochs
    python benchmarks/bench_trial.py --sizes paper --paper-epochs 5
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

METHODS = {
    "orthogonal": {"method": "orthogonal"},
    "affine": {"method": "affine"},
    "lambda": {"method": "lambda", "lam": 12.0, "alpha": 10.0},
}
SIZES = {
    "default": dict(n_train=4000, n_eval=1000, dim=1280, classes=10, zero_shot=92, batch_size=256, full_epochs=40),
    "paper": dict(n_train=50_000, n_eval=10_000, dim=1024, classes=100, zero_shot=0, batch_size=512, full_epochs=40),
}
QUICK = {
    "default": dict(n_train=1000, n_eval=300, dim=256, classes=10, zero_shot=92, batch_size=256, full_epochs=40),
    "paper": dict(n_train=4000, n_eval=1000, dim=512, classes=100, zero_shot=0, batch_size=512, full_epochs=40),
}


class Timers:
    """Accumulated seconds and call counts per phase name (CUDA-synchronised when asked).

    `phase` is where run_trial is: "setup", "loss" (inside a training step's loss forward),
    "step" (the rest of a training step), "epoch end" or "eval"."""

    def __init__(self, sync: bool) -> None:
        self.s: dict[str, float] = defaultdict(float)
        self.n: dict[str, int] = defaultdict(int)
        self.sync = sync
        self.phase = "setup"

    def _now(self) -> float:
        if self.sync:
            import torch
            torch.cuda.synchronize()
        return time.perf_counter()

    def wrap(self, name, fn, phase: str | None = None, after: str | None = None):
        """Time fn under `name` (a string, or a function of this Timers giving one); set
        `phase` while it runs and `after` (default: the phase before) when it returns."""
        def timed(*a, **k):
            key = name(self) if callable(name) else name
            before = self.phase
            if phase is not None:
                self.phase = phase
            t = self._now()
            try:
                return fn(*a, **k)
            finally:
                self.s[key] += self._now() - t
                self.n[key] += 1
                self.phase = after if after is not None else before
        return timed


@contextlib.contextmanager
def instrumented(timers: Timers):
    """Wrap the names study.science.trial uses with timers; restore them on exit."""
    import study.science.trial as T

    saved = {k: getattr(T, k) for k in ("train", "build_regularizer", "make_backward", "_backfill", "_zero_shot")}
    saved_rows, saved_sides = T._Evaluator.rows, T._Evaluator.sides

    def train(params, batch_loss, n_samples, **kw):
        on_epoch = kw.get("on_epoch")
        if on_epoch is not None:
            kw["on_epoch"] = timers.wrap("train: epoch end (cheap eval)", on_epoch, phase="epoch end",
                                         after="step")
        loss = timers.wrap("train: loss forward", batch_loss, phase="loss", after="step")
        return timers.wrap("train: total", saved["train"], phase="step", after="eval")(params, loss, n_samples, **kw)

    def build_regularizer(name, cfg):
        reg = saved["build_regularizer"](name, cfg)
        return None if reg is None else timers.wrap("train: regulariser forward", reg)

    def make_backward(kind, n, **kw):
        B = saved["make_backward"](kind, n, **kw)
        for plist in getattr(getattr(B, "parametrizations", None), "values", lambda: [])():
            for p in plist:
                p.forward = timers.wrap(lambda t: f"exp(P) forward [{t.phase}]", p.forward)
        return B

    def rows(self, *a, **k):
        return timers.wrap(lambda t: f"retrieval rows [{t.phase}]", saved_rows)(self, *a, **k)

    def sides(self, *a, **k):
        return timers.wrap(lambda t: f"apply adapters [{t.phase}]", saved_sides)(self, *a, **k)

    T.train, T.build_regularizer, T.make_backward = train, build_regularizer, make_backward
    T._backfill = timers.wrap("eval: backfill curves", saved["_backfill"])
    T._zero_shot = timers.wrap("eval: zero-shot", saved["_zero_shot"])
    T._Evaluator.rows, T._Evaluator.sides = rows, sides
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(T, k, v)
        T._Evaluator.rows, T._Evaluator.sides = saved_rows, saved_sides


def one_trial(method: str, size: dict, data, epochs: int, device: str, profile: bool) -> dict:
    import torch

    from study.science.trial import run_trial

    cfg = {**METHODS[method], "epochs": epochs, "batch_size": size["batch_size"], "device": device}
    timers = Timers(sync=device.startswith("cuda"))
    prof_rows = None
    if profile:   # a separate 1-epoch run; not part of the timings
        from torch.profiler import ProfilerActivity, profile as tprofile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        with tprofile(activities=acts) as prof:
            run_trial({**cfg, "epochs": 1}, data)
        prof_rows = [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count}
                     for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]]
    with instrumented(timers):
        t = time.perf_counter()
        res = run_trial(cfg, data)
    total = time.perf_counter() - t
    s = dict(timers.s)
    steps = math.ceil(size["n_train"] / size["batch_size"]) * epochs
    train = s.get("train: total", 0.0)
    fwd = s.get("train: loss forward", 0.0)
    end = s.get("train: epoch end (cheap eval)", 0.0)
    ev = res.metrics["time/eval_s"]
    setup = total - res.metrics["time/train_s"] - ev
    per_epoch = train / epochs
    out = {
        "method": method, "epochs": epochs, "steps": steps, "total_s": total, "setup_s": setup,
        "train_s": train, "train_per_epoch_s": per_epoch,
        "loss_forward_per_epoch_s": fwd / epochs,
        "regulariser_forward_per_epoch_s": s.get("train: regulariser forward", 0.0) / epochs,
        "expP_forward_per_epoch_s": s.get("exp(P) forward [loss]", 0.0) / epochs,
        "expP_forward_outside_loss_s": sum(v for k, v in s.items() if k.startswith("exp(P) forward [")
                                           and k != "exp(P) forward [loss]"),
        "backward_step_per_epoch_s": (train - fwd - end) / epochs,
        "cheap_eval_per_epoch_s": end / epochs,
        "eval_s": ev,
        "eval_rows_s": s.get("retrieval rows [eval]", 0.0),
        "eval_zero_shot_s": s.get("eval: zero-shot", 0.0),
        "eval_backfill_s": s.get("eval: backfill curves", 0.0),
        "timers_s": s, "calls": dict(timers.n),
        "full_epochs": size["full_epochs"],
        "extrapolated_full_s": setup + per_epoch * size["full_epochs"] + ev,
        "B/old/top1": res.metrics.get("B/old/top1"), "orth/B": res.metrics.get("orth/B"),
        "profile_top_ops": prof_rows,
    }
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out


def isolated(n: int, d: int, batch: int, device: str, repeat: int = 5) -> dict:
    """Per training step, fwd + bwd: the lambda regulariser (lam 12, alpha 10) on a dense W [n, n]
    with D(W) = lam - 2 (gate sigmoid(alpha (D - lam)) ~ 2e-9) and with D(W) = lam - 8.4 (gate ~ 3e-37:
    its gradient products are denormal floats, slow on CPUs), exp(P) of the orthogonal B, and a whole
    affine compat-loss step (no regulariser) at `batch` rows, for scale."""
    import torch
    from torch.nn.utils import parametrize

    from study.science.adapters import make_backward, make_forward
    from study.science.config import TrialConfig
    from study.science.losses import compat_loss
    from study.science.regularizers import lambda_orthogonality

    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeat):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return min(times)

    from study.science.adapters import orthogonality_deviation

    lam, alpha = 12.0, 10.0

    def w_with_deviation(target: float):
        """A dense W = I + s R with ||W^T W - I||_F = target (bisection on s)."""
        R = torch.randn(n, n, generator=g) / n**0.5
        eye = torch.eye(n)

        def dev_of(s: float) -> float:
            return float(orthogonality_deviation(eye + s * R))

        lo, hi = 0.0, 1e-3
        while dev_of(hi) < target:
            hi *= 2
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if dev_of(mid) < target else (lo, mid)
        return (eye + hi * R).to(dev).requires_grad_(True)

    reg_times = {}
    for regime, D in (("normal", lam - 2.0), ("denormal", lam - 8.4)):
        W = w_with_deviation(D)   # sigmoid(alpha (D - lam)): ~2e-9, or ~3e-37 (its products are denormal floats)

        def reg():
            lambda_orthogonality(W, lam, alpha).backward()

        reg_times[regime] = best(reg)

    # exp(P) at a trained-looking P (a random skew matrix of spectral norm ~2, not P = 0, where
    # torch's Taylor degree drops to almost nothing), ours and torch.linalg.matrix_exp on the same P
    Bo = make_backward("orthogonal", n).to(dev)
    with torch.no_grad():
        Bo.parametrizations.weight.original.copy_(torch.randn(n, n, generator=g) * (0.7 / n**0.5))
    lower = Bo.parametrizations.weight.original.detach().tril(-1)
    P = (lower - lower.mT).requires_grad_(True)
    G = torch.randn(n, n, generator=g).to(dev)

    def orth():
        with parametrize.cached():
            (Bo.weight * G).sum().backward()

    def orth_torch():
        (torch.linalg.matrix_exp(P) * G).sum().backward()

    Ba, Fa = make_backward("affine", n).to(dev), make_forward(d, n).to(dev)
    cfg = TrialConfig.from_dict({"method": "affine"})
    ho = torch.nn.functional.normalize(torch.randn(batch, d, generator=g), dim=1).to(dev)
    hn = torch.nn.functional.normalize(torch.randn(batch, n, generator=g), dim=1).to(dev)
    y = torch.randint(0, 10, (batch,), generator=g).to(dev)

    def step():
        compat_loss(ho, hn, y, Ba, Fa, None, cfg)["loss/total"].backward()

    return {"n": n, "batch": batch, "regulariser_fwd_bwd_s": reg_times["normal"],
            "regulariser_fwd_bwd_denormal_s": reg_times["denormal"], "expP_fwd_bwd_s": best(orth),
            "expP_torch_matrix_exp_fwd_bwd_s": best(orth_torch), "expP_spectral_norm": float(torch.linalg.matrix_norm(P.detach(), 2)),
            "affine_step_fwd_bwd_s": best(step)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="default,paper", help="comma list of: default, paper")
    ap.add_argument("--methods", default="orthogonal,affine,lambda")
    ap.add_argument("--epochs", type=int, default=40, help="epochs at the default size (its full length: 40)")
    ap.add_argument("--paper-epochs", type=int, default=2, help="epochs at paper size (full length 40, extrapolated)")
    ap.add_argument("--paper-eval", type=int, default=None,
                    help="eval rows at paper size (default 10,000; each of its ~50 retrievals takes seconds on 1 CPU)")
    ap.add_argument("--threads", type=int, default=1, help="torch/BLAS threads (1 = one trial's CPU in a study)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", action="store_true", help="torch.profiler top ops of one extra 1-epoch trial")
    ap.add_argument("--quick", action="store_true", help="small sizes (default 1000 x 256, paper 4000 x 512), 2 epochs")
    ap.add_argument("--out", default=str(C.RESULTS / "trial.json"))
    args = ap.parse_args(argv)
    sizes = {k: dict(v) for k, v in (QUICK if args.quick else SIZES).items()}
    if args.paper_eval:
        sizes["paper"]["n_eval"] = args.paper_eval
    if args.quick:
        args.epochs = args.paper_epochs = 2

    C.setup_env(fresh_cache=True)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)   # study.science.metrics sizes its pool from it, as in a Ray trial
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows, micro = [], []
    with threadpool_limits(args.threads):
        for size_name in args.sizes.split(","):
            size = sizes[size_name]
            epochs = args.epochs if size_name == "default" else args.paper_epochs
            arrays = C.random_pair(size["n_train"], size["n_eval"], size["dim"], size["dim"], classes=size["classes"],
                                   zero_shot=size["zero_shot"])
            data = C.trial_data(arrays)
            m = isolated(size["dim"], size["dim"], size["batch_size"], args.device)
            m["size"] = size_name
            micro.append(m)
            print(f"[{size_name}] per step: regulariser fwd+bwd {1e3 * m['regulariser_fwd_bwd_s']:.1f} ms "
                  f"({1e3 * m['regulariser_fwd_bwd_denormal_s']:.1f} ms with a denormal gate), "
                  f"exp(P) fwd+bwd {1e3 * m['expP_fwd_bwd_s']:.1f} ms (torch's matrix_exp "
                  f"{1e3 * m['expP_torch_matrix_exp_fwd_bwd_s']:.1f} ms), affine step {1e3 * m['affine_step_fwd_bwd_s']:.1f} ms",
                  flush=True)
            for method in args.methods.split(","):
                r = one_trial(method, size, data, epochs, args.device, args.profile)
                r.update(size=size_name, **{k: v for k, v in size.items() if k != "full_epochs"})
                rows.append(r)
                print(f"[{size_name}/{method}] {epochs} epochs: {r['total_s']:.1f} s (train {r['train_s']:.1f}, "
                      f"eval {r['eval_s']:.1f}); {r['train_per_epoch_s']:.2f} s/epoch", flush=True)
    load_after = os.getloadavg()

    for m in micro:   # shares: what the isolated costs are of a step of each method
        a = m["affine_step_fwd_bwd_s"]
        m["regulariser_share_of_lambda_step"] = m["regulariser_fwd_bwd_s"] / (a + m["regulariser_fwd_bwd_s"])
        m["expP_share_of_orthogonal_step"] = m["expP_fwd_bwd_s"] / (a + m["expP_fwd_bwd_s"])
    for r in rows:
        aff = next((x for x in rows if x["size"] == r["size"] and x["method"] == "affine"), None)
        r["train_per_epoch_vs_affine"] = r["train_per_epoch_s"] / aff["train_per_epoch_s"] if aff else None

    result = {
        "benchmark": "trial",
        "params": {k: getattr(args, k) for k in ("sizes", "methods", "epochs", "paper_epochs", "paper_eval", "threads",
                                                   "device", "profile", "quick")},
        "sizes": {k: sizes[k] for k in args.sizes.split(",")},
        "task": "run_trial on random clustered features, phases timed by wrapping study.science.trial's names",
        "rows": rows,
        "isolated_per_step": micro,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "machine": C.machine_info(),
        "notes": [
            "loss forward includes the regulariser's forward (lambda) and exp(P)'s forward (orthogonal, once "
            "per step under parametrize.cached); backward + step = train - loss forward - epoch end.",
            "epoch end = run_trial's cheap eval (B/old, B/B, B/F top-1 every eval_every=5 epochs and at the "
            "first and last) and the on_epoch report; averaged per epoch.",
            "setup = tensors, normalisation, evaluator, adapters (total - train - eval).",
            "extrapolated_full_s = setup + per-epoch train x full epochs (40) + final eval.",
            "isolated_per_step: min of 5 fwd+bwd calls; shares are of (affine step + that cost). exp(P) is "
            "the project's (study.science.skew_expm: one eigh, exact Daleckii-Krein gradient) and, on the same P "
            "(spectral norm ~2), torch.linalg.matrix_exp's (Taylor + scaling-squaring; its backward is exp "
            "of a 2n x 2n block), which the orthogonal B used before. The "
            "regulariser is also timed at D = lam - 8.4, where the unfloored gate sigmoid(alpha (D - lam)) "
            "~ 3e-37 makes its backward matmuls work on denormal floats (100x slower on this CPU, seen "
            "before study/science/regularizers.py floored the gate's argument at -40): a regression check, it "
            "should match the normal-gate column.",
            f"threads: torch and BLAS limited to {args.threads} (OMP_NUM_THREADS too, which study.science.metrics "
            "reads), as for a 1-CPU trial in a study.",
        ],
    }
    out = C.write_result(result, args.out)
    mi = result["machine"]
    print()
    print(f"threads {args.threads}, device {args.device}; {C.header_line(mi)}; "
          f"load {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print()
    print(C.markdown_table(
        ["size", "method", "epochs", "train s/epoch", "x affine", "loss fwd s/ep", "reg fwd s/ep", "exp(P) fwd s/ep",
         "bwd+step s/ep", "cheap eval s/ep", "eval s (rows / zs / backfill)", "trial s", "full 40-epoch trial s (extrap.)"],
        [[r["size"], r["method"], r["epochs"], C.fmt(r["train_per_epoch_s"]), C.fmt(r["train_per_epoch_vs_affine"]),
          C.fmt(r["loss_forward_per_epoch_s"]), C.fmt(r["regulariser_forward_per_epoch_s"]),
          C.fmt(r["expP_forward_per_epoch_s"]), C.fmt(r["backward_step_per_epoch_s"]),
          C.fmt(r["cheap_eval_per_epoch_s"]),
          f"{r['eval_s']:.1f} ({r['eval_rows_s']:.1f} / {r['eval_zero_shot_s']:.1f} / {r['eval_backfill_s']:.1f})",
          C.fmt(r["total_s"], ".1f"), C.fmt(r["extrapolated_full_s"], ".0f")] for r in rows]))
    print()
    print(C.markdown_table(
        ["size", "n", "batch", "affine step fwd+bwd ms", "regulariser fwd+bwd ms", "share of a lambda step",
         "regulariser, denormal gate, ms", "exp(P) fwd+bwd ms", "torch matrix_exp fwd+bwd ms",
         "share of an orthogonal step"],
        [[m["size"], m["n"], m["batch"], C.fmt(1e3 * m["affine_step_fwd_bwd_s"], ".1f"),
          C.fmt(1e3 * m["regulariser_fwd_bwd_s"], ".1f"), C.fmt(100 * m["regulariser_share_of_lambda_step"], ".0f") + "%",
          C.fmt(1e3 * m["regulariser_fwd_bwd_denormal_s"], ".1f"),
          C.fmt(1e3 * m["expP_fwd_bwd_s"], ".1f"), C.fmt(1e3 * m["expP_torch_matrix_exp_fwd_bwd_s"], ".1f"),
          C.fmt(100 * m["expP_share_of_orthogonal_step"], ".0f") + "%"]
         for m in micro]))
    if args.profile:
        for r in rows:
            if r["profile_top_ops"]:
                print(f"\ntop ops, {r['size']}/{r['method']}, one epoch (self CPU s): " + "; ".join(
                    f"{o['op']} {o['self_cpu_s']:.2f}" for o in r["profile_top_ops"][:8]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
