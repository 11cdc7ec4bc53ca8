"""Benchmark: why the paper's backfill order wins on one pair and not on another (issue 14).

Backfilling gallery item i replaces F(h_old_i) by B(h_new_i); it helps the curve when
the item is misplaced on the old side (its nearest gallery neighbour has another label)
and well placed on the new side. The paper's order backfills the items whose F(h_old)
lies farthest from its class mean first. This trains the default grid's trials
(`search_spaces/grid.yaml`'s `train:`, seed 0) and, on the evaluation split, reports for
the first `--share` of the paper's order against all items (what a random order takes on
average): the share misplaced among F(h_old) (leave-one-out 1-NN, cosine), the share
misplaced among B(h_new), and the share fixed (misplaced old, placed new).

    python benchmarks/bench_backfill_order.py
"""
from __future__ import annotations

import argparse
import sys

import _common as C

METHODS = (("orthogonal", None), ("lambda", 3.0), ("lambda", 12.0), ("affine", None))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--share", type=float, default=0.2, help="head of the paper's order compared")
    p.add_argument("--out", default=str(C.RESULTS / "backfill_order.json"))
    args = p.parse_args()
    C.setup_env()
    import numpy as np
    import torch

    import backbones
    from study.science import metrics
    from study.science.preprocess import Preprocess
    from study.space import load_space
    from study.science.trial import TrialData, run_trial
    from study.tune import trial_config

    torch.set_num_threads(1)
    spec = load_space(C.ROOT / "search_spaces" / "grid.yaml")
    ds = spec.datasets[0]

    def misplaced(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per item: its leave-one-out cosine nearest neighbour has another label."""
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        s = u @ u.T
        np.fill_diagonal(s, -np.inf)
        return y[s.argmax(1)] != y

    rows = []
    for pair in spec.pairs:
        get = lambda b, s: backbones.extract(b, ds.dataset, s, progress=False)  # noqa: E731
        data = TrialData(get(pair.old, ds.train), get(pair.new, ds.train), get(pair.old, ds.eval), get(pair.new, ds.eval))
        for method, lam in METHODS:
            cfg = trial_config({"train": spec.train, "method": method, "seed": 0, "lam": lam})
            result = run_trial({**cfg, "num_threads": 1}, data)
            side = {}
            for name, train, ev in (("old", data.old_train, data.old_eval), ("new", data.new_train, data.new_eval)):
                prep = Preprocess(train.x, normalize=cfg.get("normalize", True), center=cfg.get("center", False),
                                  pca=cfg.get("pca"), seed=0, device=torch.device("cpu"))
                side[name] = prep(torch.as_tensor(np.asarray(ev.x))).numpy()
            st = {k: v.numpy() for k, v in result.state.items()}
            f_old = side["old"] @ st["F.weight"].T + st["F.bias"]
            b_new = side["new"] @ st["B.weight"].T + st.get("B.bias", 0.0)
            y = np.asarray(data.old_eval.y)
            order = metrics.backfill_order(f_old / np.linalg.norm(f_old, axis=1, keepdims=True), y, kind="paper")
            head = order[: int(round(args.share * len(y)))]
            wrong_old, wrong_new = misplaced(f_old, y), misplaced(b_new, y)
            fixed = wrong_old & ~wrong_new
            row = {"pair": pair.name, "method": method if lam is None else f"lambda {lam:g}",
                   "auc_paper": result.metrics["backfill/auc_paper"], "auc_random": result.metrics["backfill/auc_random"]}
            for key, mask in (("misplaced_F_old", wrong_old), ("misplaced_B_new", wrong_new), ("fixed", fixed)):
                row[key] = {"paper_head": float(mask[head].mean() * 100), "all": float(mask.mean() * 100)}
            rows.append(row)
            print(f"{pair.name} {row['method']}: auc paper {row['auc_paper']:.1f} / random {row['auc_random']:.1f}; "
                  + "; ".join(f"{k} head {row[k]['paper_head']:.1f}% vs all {row[k]['all']:.1f}%"
                              for k in ("misplaced_F_old", "misplaced_B_new", "fixed")), flush=True)
    result = {"benchmark": "backfill_order", "share": args.share, "rows": rows}
    path = C.write_result(result, args.out)
    print(C.header_line(result["machine"]))
    print(C.markdown_table(
        ("pair", "method", "AUC paper / random", "misplaced F(h_old): head / all", "misplaced B(h_new): head / all",
         "fixed by backfilling: head / all"),
        [(r["pair"], r["method"], f"{r['auc_paper']:.1f} / {r['auc_random']:.1f}",
          *(f"{r[k]['paper_head']:.1f} / {r[k]['all']:.1f}" for k in ("misplaced_F_old", "misplaced_B_new", "fixed")))
         for r in rows]))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
