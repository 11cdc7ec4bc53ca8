"""Command line: list the registries, extract features, train a class-extension backbone."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields

from ._cache import DTYPES, SHARD_ROWS
from ._registry import TrainCfg, backbone_cfg, dataset_cfg, list_backbones, list_datasets
from ._synthetic import PATTERN as SYNTHETIC_PATTERN


def parse_classes(text: str) -> tuple[int, ...]:
    """'0-4' -> (0, 1, 2, 3, 4); '0,2,5-6' -> (0, 2, 5, 6)."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"`--classes` must look like 0-4 or 0,2,5-6, got {text!r}") from None
    return tuple(out)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(map(str, header)), *([str(c) for c in r] for r in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cmd_list(args: argparse.Namespace) -> int:
    rows = []
    for n in list_backbones(args.pattern):
        c = backbone_cfg(n)
        note = f"classes {min(c.train.classes)}-{max(c.train.classes)}, seed {c.train.seed}" if c.train else ""
        rows.append((n, c.source, c.arch, c.dim, c.input_size, "yes" if c.offline else "no", note))
    print("Backbones")
    print(_table(("name", "source", "arch", "dim", "input", "offline", "trained on"), rows))
    rows = []
    for n in list_datasets(args.pattern):
        c = dataset_cfg(n)
        rows.append((n, ",".join(c.splits), c.num_classes, c.resolution or "-", "yes" if c.offline else "no",
                     c.description))
    print("\nData sets")
    print(_table(("name", "splits", "classes", "res", "offline", "description"), rows))
    print(f"\nSynthetic data sets of any size: {SYNTHETIC_PATTERN} (features from backbones synthetic_<dim>, "
          "no images or model; 64 px noise images for real backbones)")
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from ._extract import extract, extraction_count

    before = extraction_count()
    f = extract(args.backbone, args.dataset, args.split, cache_dir=args.cache_dir, batch_size=args.batch_size,
                device=args.device, progress=not args.quiet, dtype=args.dtype, shard_rows=args.shard_rows)
    state = "cached" if f.meta["from_cache"] else "extracted"
    print(f"{state} x{list(f.x.shape)} {f.x.dtype} y{list(f.y.shape)}: embedded {extraction_count() - before} "
          f"of {len(f.meta['shards'])} shards", file=sys.stderr)
    print(f.meta["path"])
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ._train import save_checkpoint, train

    cfg = TrainCfg(args.arch, args.dataset, args.classes, args.seed, args.embed_dim, epochs=args.epochs,
                   image_size=args.image_size, in_chans=args.in_chans, batch_size=args.batch_size,
                   lr=args.lr, max_per_class=args.max_per_class)
    dataset_cfg(cfg.dataset)
    print(f"training {asdict(cfg)}", file=sys.stderr)
    ckpt = train(cfg, device=args.device, progress=not args.quiet)
    save_checkpoint(ckpt, args.out)
    m = ckpt["metrics"]
    print(f"trained {m['images']} images in {m['seconds']:.1f} s, train acc {m['train_acc']:.3f}",
          file=sys.stderr)
    print(f"{args.out} digest {ckpt['digest']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m backbones", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("list", help="print the backbone and data set registries")
    ls.add_argument("pattern", nargs="?", default="*", help="fnmatch filter on names")
    ls.set_defaults(fn=_cmd_list)

    ex = sub.add_parser("extract", help="extract (or find cached) features; prints the cache path")
    ex.add_argument("--backbone", required=True)
    ex.add_argument("--dataset", required=True)
    ex.add_argument("--split", required=True)
    ex.add_argument("--cache-dir", default=None, help="cache root (default: $LAMBDA_COMPAT_CACHE or ~/.cache)")
    ex.add_argument("--batch-size", type=int, default=64)
    ex.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ex.add_argument("--quiet", action="store_true", help="no progress bar")
    ex.add_argument("--dtype", default="float32", choices=DTYPES, help="storage precision")
    ex.add_argument("--shard-rows", type=int, default=SHARD_ROWS,
                    help="rows per shard (the unit of resume); a multiple of --batch-size keeps the numbers of one pass")
    ex.set_defaults(fn=_cmd_extract)

    tr = sub.add_parser("train", help="train a class-extension backbone and write its checkpoint")
    tr.add_argument("--arch", required=True, help="timm architecture, e.g. resnet18")
    tr.add_argument("--dataset", default="mnist")
    tr.add_argument("--classes", type=parse_classes, required=True, help="e.g. 0-4")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--embed-dim", type=int, default=128)
    default = {f.name: f.default for f in fields(TrainCfg)}
    tr.add_argument("--epochs", type=int, default=default["epochs"])
    tr.add_argument("--image-size", type=int, default=default["image_size"])
    tr.add_argument("--in-chans", type=int, default=default["in_chans"])
    tr.add_argument("--batch-size", type=int, default=default["batch_size"])
    tr.add_argument("--lr", type=float, default=default["lr"])
    tr.add_argument("--max-per-class", type=int, default=None, help="cap training images per class")
    tr.add_argument("--device", default="cpu")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    tr.add_argument("--out", required=True, help="checkpoint path to write")
    tr.set_defaults(fn=_cmd_train)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; errors print one line to stderr and return 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (KeyError, ValueError, RuntimeError, OSError) as err:
        msg = str(err.args[0]) if type(err) is KeyError and err.args else str(err)
        print(f"error: {' '.join(msg.split())}", file=sys.stderr)
        return 2
