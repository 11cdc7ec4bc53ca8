"""Benchmark: a faiss index kind's cost in a trial at the default grid's size (issue 13).

Per index kind of `search_spaces/index.yaml` (plus PQ16 alone): train on 4,000 x 1280
(the MNIST train split), fill with 1,000 x 1280 (the test split), search 1,000 queries
for the top 10 + 1, and replay the 21-point backfill (in place, or rebuilt per step for
HNSW); then one whole `study.science.index_eval.evaluate` call with all kinds, as a trial runs it.
faiss on 1 thread, as in a 1-CPU trial. Also the factory's default polysemous training
of IVF64,PQ16 (skipped by the project; same ids and distances), for the record.

    python benchmarks/bench_index.py              # default size
    python benchmarks/bench_index.py --quick      # 1,000 x 256 train, 300 gallery
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import _common as C  # noqa: E402

KINDS = ({"factory": "Flat"}, {"factory": "IVF64,Flat", "nprobe": 8}, {"factory": "IVF64,PQ16", "nprobe": 8},
         {"factory": "PQ16"}, {"factory": "HNSW32", "efSearch": 64})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--gallery", type=int, default=1000)
    ap.add_argument("--d", type=int, default=1280)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--points", type=int, default=21)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(C.RESULTS / "index.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.train, args.gallery, args.d = 1000, 300, 256

    import faiss

    from study.science import index_eval as ix

    rng = np.random.default_rng(0)
    y_tr, y = rng.integers(0, 10, args.train), rng.integers(0, 10, args.gallery)
    train = C.clustered(args.train, args.d, y_tr, seed=1, classes=10)
    gallery = C.clustered(args.gallery, args.d, y, seed=2, classes=10)
    new = gallery + 0.5 * C.clustered(args.gallery, args.d, y, seed=3, classes=10)
    order = rng.permutation(args.gallery)
    _, counts = ix._counts(args.gallery, args.points)
    machine = C.machine_info(("numpy", "faiss-cpu"))
    rows = []
    with ix.index_threads(args.threads):
        for entry in KINDS:
            spec = ix.IndexSpec.from_dict(entry)
            with C.Clock() as t_train:
                index = ix.DeployedIndex(spec, train, "cosine")
            with C.Clock() as t_fill:
                index.fill(gallery)
            with C.Clock() as t_search:
                index.search(gallery, 10, leave_one_out=True)
            with C.Clock() as t_backfill:
                done = 0
                for c in counts:
                    index.replace(order[done:c], new[order[done:c]])
                    done = int(c)
                    index.search(new, 1, leave_one_out=True)
            rows.append({"index": spec.name, "in_place": index.in_place, "train_s": t_train.wall,
                         "fill_s": t_fill.wall, "search_s": t_search.wall, "backfill_s": t_backfill.wall})
        poly = faiss.index_factory(args.d, "IVF64,PQ16", faiss.METRIC_INNER_PRODUCT)
        with C.Clock() as t_poly:
            poly.train(ix._prepare(train, "cosine"))
        specs = [ix.IndexSpec.from_dict(e) for e in KINDS]
        bf = ix.Backfill(new, gallery, new, train, order, args.points)
        with C.Clock() as t_eval:
            ix.evaluate(specs, y=y, old_train=train, old=gallery, b_new=new, f_old=gallery, backfill=bf,
                        num_threads=args.threads)
    result = {
        "benchmark": "index",
        "params": vars(args),
        "machine": machine,
        "rows": rows,
        "polysemous_training_s": {"IVF64,PQ16 (factory default)": t_poly.wall},
        "evaluate_all_kinds_s": t_eval.wall,
        "notes": ["one faiss thread (a 1-CPU trial); random clustered features, cosine (inner product on unit rows)",
                  "search: the gallery's own 1,000 items as queries, top 10 + 1 (own item dropped)",
                  "backfill: 21 points, remove_ids + add_with_ids (in place) or a rebuild per step, and a top-1 "
                  "search at each point",
                  "evaluate_all_kinds_s: one study.science.index_eval.evaluate call over all kinds (5 rows each, recall "
                  "references, the backfill and its exact curve), as a trial with `index:` runs it"],
    }
    out = C.write_result(result, args.out)
    print(C.header_line(machine))
    print(f"train {args.train} x {args.d}, gallery {args.gallery}, {args.threads} faiss thread(s)\n")
    print(C.markdown_table(["index", "train s", "fill s", "search s", "backfill (21 pts) s", "in place"],
                           [[r["index"], f"{r['train_s']:.3f}", f"{r['fill_s']:.3f}", f"{r['search_s']:.3f}",
                             f"{r['backfill_s']:.3f}", r["in_place"]] for r in rows]))
    print(f"\nIVF64,PQ16 with the factory's polysemous training: train {t_poly.wall:.2f} s")
    print(f"one evaluate() with all {len(specs)} kinds: {t_eval.wall:.2f} s")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
