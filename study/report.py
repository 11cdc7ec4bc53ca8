"""The study's report, built from its MLflow runs: summary table (CSV + Markdown) and plots.

    python study/report.py --tracking-uri sqlite:///$PWD/mlflow.db --study NAME [--out DIR]

Rows are method x lambda x pair x data set; values are mean +- std over seeds
of the final metrics (keys from ``study/science/keys.py``). Failed trials are listed
under the table.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

if __name__ == "__main__" and sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # see study/run.py: never let study/ shadow top-level packages

from study.science import keys as K  # noqa: E402
from study import tracking as T  # noqa: E402
from study.science.config import METHODS  # noqa: E402

# The paper's rows, in the paper's order, with short column labels.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("old/old/top1", "old/old"), ("new/new/top1", "new/new"), ("B/old/top1", "B/old"), ("B/F/top1", "B/F"),
    ("B/B/top1", "B/B"), ("F/F/top1", "F/F"), (K.ZS_MEAN, "ZS"), (K.ORTH, "||WtW-I||"),
    (K.BACKFILL_AUC_PAPER, "backfill"), (K.BACKFILL_AUC_RANDOM, "backfill(rand)"), ("ecc/B/old", "ECC"),
)


@dataclass
class Report:
    rows: list[dict[str, Any]]
    failed: list[dict[str, str]]
    markdown: str
    files: list[Path] = field(default_factory=list)


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=tracking_uri)


def fetch_runs(tracking_uri: str, study: str) -> tuple[Any, list[Any]]:
    """The study's latest parent run and all its child runs."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(study)
    if exp is None:
        known = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise LookupError(f"no study `{study}` at {tracking_uri}; studies there: {known}")
    parents = client.search_runs([exp.experiment_id], filter_string=f"tags.`{T.ROLE_TAG}` = '{T.STUDY_ROLE}'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise LookupError(f"study `{study}` has no study run at {tracking_uri}")
    parent = parents[0]
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.`{T.PARENT_TAG}` = '{parent.info.run_id}'",
                                  max_results=50000)
    return parent, children


def _group_key(run: Any) -> tuple[str, str, str, str]:
    t = run.data.tags
    return (t.get(T.PAIR_TAG, ""), t.get(T.DATASET_TAG, ""), t.get(T.METHOD_TAG, ""), t.get(T.LAMBDA_TAG, ""))


def _sort_key(key: tuple[str, str, str, str]) -> tuple:
    pair, ds, method, lam = key
    rank = METHODS[method].order if method in METHODS else math.inf   # rows of unknown methods last
    return (pair, ds, rank, float(lam) if lam else -1.0)


def summarize(children: Sequence[Any]) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Group FINISHED runs by (pair, data set, method, lambda); mean and std over seeds."""
    groups: dict[tuple, list[Any]] = defaultdict(list)
    failed = []
    for run in children:
        if run.info.status == "FINISHED":
            groups[_group_key(run)].append(run)
        elif run.info.status == "FAILED":
            error_lines = run.data.tags.get(T.ERROR_TAG, "").strip().splitlines()
            failed.append({"run": run.info.run_name or run.info.run_id, "error": error_lines[-1] if error_lines else ""})
    rows = []
    for key in sorted(groups, key=_sort_key):
        runs = groups[key]
        row: dict[str, Any] = {"pair": key[0], "dataset": key[1], "method": key[2], "lambda": key[3], "n": len(runs)}
        for metric, _ in COLUMNS:
            vals = np.array([run.data.metrics.get(metric, math.nan) for run in runs], dtype=float)
            vals = vals[~np.isnan(vals)]
            row[metric] = (float(vals.mean()), float(vals.std())) if vals.size else (math.nan, math.nan)
        rows.append(row)
    return rows, failed


def _fmt(mean_std: tuple[float, float]) -> str:
    mean, std = mean_std
    return "n/a" if math.isnan(mean) else f"{mean:.2f} ± {std:.2f}"


def to_markdown(study: str, rows: list[dict[str, Any]], failed: list[dict[str, str]]) -> str:
    head = ["pair", "data set", "method", "lambda", "seeds", *(label for _, label in COLUMNS)]
    lines = [f"## Study `{study}`: top-1 % (mean ± std over seeds)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["pair"], r["dataset"], r["method"], r["lambda"] or "-", str(r["n"]),
                 *(_fmt(r[m]) for m, _ in COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    if failed:
        lines += ["", f"Failed trials ({len(failed)}):"] + [f"- {f['run']}: {f['error']}" for f in failed]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["pair", "dataset", "method", "lambda", "n"] + [f"{m}{s}" for m, _ in COLUMNS for s in ("", "_std")])
        for r in rows:
            w.writerow([r["pair"], r["dataset"], r["method"], r["lambda"], r["n"]]
                       + [v for m, _ in COLUMNS for v in r[m]])


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------

def _cells(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    cells: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        cells[(r["pair"], r["dataset"])].append(r)
    return cells


def plot_lambda_sweep(rows: list[dict[str, Any]], path: Path) -> bool:
    """Downstream gain (B/B - new/new) and ZS vs lambda; orthogonal and affine as reference lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cells = {k: v for k, v in _cells(rows).items() if any(r["method"] == "lambda" for r in v)}
    if not cells:
        return False
    fig, axes = plt.subplots(len(cells), 2, figsize=(11, 3.6 * len(cells)), squeeze=False)
    for (pair, ds), ax_row in zip(cells, axes):
        group = cells[(pair, ds)]
        lam_rows = sorted((r for r in group if r["method"] == "lambda"), key=lambda r: float(r["lambda"]))
        for ax, metric, label in ((ax_row[0], "B/B/top1", "B/B top-1 - new/new top-1 (gain)"), (ax_row[1], K.ZS_MEAN, "ZS (zero-shot retention)")):
            def value(r: dict[str, Any]) -> tuple[float, float]:
                if metric == "B/B/top1":
                    return (r["B/B/top1"][0] - r["new/new/top1"][0], r["B/B/top1"][1])
                return r[metric]
            sweep_panel(ax, lam_rows, group, value, label, f"{pair} on {ds}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def sweep_panel(ax: Any, lam_rows: list[dict[str, Any]], group: list[dict[str, Any]],
                value: Any, label: str, title: str) -> None:
    """One panel against lambda: `value(row) -> (mean, std)` of the lambda rows with error bars, the
    group's orthogonal and affine rows as reference lines."""
    ys = [value(r) for r in lam_rows]
    if lam_rows:
        ax.errorbar([float(r["lambda"]) for r in lam_rows], [y[0] for y in ys], yerr=[y[1] for y in ys],
                    marker="o", label="lambda-orthogonal")
    for ref, style in (("orthogonal", "--"), ("affine", ":")):
        for r in group:
            if r["method"] == ref:
                ax.axhline(value(r)[0], linestyle=style, color="gray" if ref == "orthogonal" else "red", label=ref)
    ax.set_xlabel("lambda")
    ax.set_ylabel(label)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated when both coordinates are maximised."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return front


def plot_pareto(rows: list[dict[str, Any]], path: Path) -> bool:
    """Compatibility (B/old top-1) vs zero-shot retention (ZS), one point per method/lambda and cell."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cells = _cells(rows)
    usable = {k: [r for r in v if not math.isnan(r["B/old/top1"][0]) and not math.isnan(r[K.ZS_MEAN][0])] for k, v in cells.items()}
    usable = {k: v for k, v in usable.items() if v}
    if not usable:
        return False
    fig, axes = plt.subplots(1, len(usable), figsize=(5.5 * len(usable), 4.2), squeeze=False)
    for ax, ((pair, ds), group) in zip(axes[0], usable.items()):
        pts = [(r[K.ZS_MEAN][0], r["B/old/top1"][0]) for r in group]
        front = set(pareto_front(pts))
        for i, (r, (x, y)) in enumerate(zip(group, pts)):
            label = r["method"] if r["method"] != "lambda" else f"λ={r['lambda']}"
            ax.scatter([x], [y], color="C3" if i in front else "C0", zorder=3)
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        fx = sorted((pts[i] for i in front))
        ax.plot([p[0] for p in fx], [p[1] for p in fx], color="C3", alpha=0.5, label="Pareto front")
        ax.set_xlabel("ZS (higher = new model's zero-shot kept)")
        ax.set_ylabel("B/old top-1 (compatibility)")
        ax.set_title(f"{pair} on {ds}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def backfill_ylabel(runs: Sequence[Any]) -> str:
    """The y-axis of the backfill curves: the runs' `backfill_metric` (a TrialConfig field, a param of
    every trial run), e.g. "mAP (%)"; several when the runs differ."""
    names = sorted({run.data.params.get("backfill_metric", "") for run in runs} - {""})
    return f"{' / '.join(names) or 'backfill metric'} (%)"


def plot_backfill(client: Any, children: Sequence[Any], path: Path) -> bool:
    """Backfill curves (paper order solid, random dashed), mean over seeds, per cell and method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves: dict[tuple[str, str], dict[str, dict[str, list[np.ndarray]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    runs_of: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for run in children:
        if run.info.status != "FINISHED" or K.BACKFILL_AUC_PAPER not in run.data.metrics:
            continue
        pair, ds, method, lam = _group_key(run)
        runs_of[(pair, ds)].append(run)
        label = method if method != "lambda" else f"λ={lam}"
        for key in (K.CURVE_PAPER, K.CURVE_RANDOM):
            hist = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            if hist:
                curves[(pair, ds)][label][key].append(np.array([m.value for m in hist]))
    if not curves:
        return False
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.2), squeeze=False)
    for ax, ((pair, ds), by_label) in zip(axes[0], curves.items()):
        for i, (label, by_key) in enumerate(sorted(by_label.items())):
            for key, style in ((K.CURVE_PAPER, "-"), (K.CURVE_RANDOM, "--")):
                if by_key.get(key):
                    y = np.mean(np.stack(by_key[key]), axis=0)
                    ax.plot(np.linspace(0, 1, len(y)), y, style, color=f"C{i % 10}",
                            label=f"{label} ({'paper order' if key == K.CURVE_PAPER else 'random'})")
        ax.set_xlabel("beta (fraction of gallery backfilled)")
        ax.set_ylabel(backfill_ylabel(runs_of[(pair, ds)]))
        ax.set_title(f"{pair} on {ds}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------
# Inside a deployed index (`index:` section of the space; keys in study/science/keys.py)
# ---------------------------------------------------------------------------

INDEX_DROP_ROWS = ("old/old", "B/old", "B/F")
"""Rows whose top-1 drop from exact search the index table shows (old/old: the index's own cost)."""


def index_names(children: Sequence[Any]) -> list[str]:
    """Index kinds found in the runs' metrics (`index/<name>/old/old/top1`), in first-seen order."""
    names: dict[str, None] = {}
    for run in children:
        for key in run.data.metrics:
            parts = key.split("/")
            if parts[0] == "index" and key == K.index_key(parts[1], "old/old", "top1"):
                names[parts[1]] = None
    return list(names)


def summarize_index(children: Sequence[Any]) -> list[dict[str, Any]]:
    """Per (pair, data set, method, lambda) and index kind: mean and std over seeds of the top-1 drop
    (exact minus index, points) of INDEX_DROP_ROWS, recall@k of old/old and B/old, and the backfill
    areas inside the index and by exact search."""
    names = index_names(children)
    groups: dict[tuple, list[Any]] = defaultdict(list)
    for run in children:
        if run.info.status == "FINISHED":
            groups[_group_key(run)].append(run)
    rows = []
    for key in sorted(groups, key=_sort_key):
        for name in names:
            per_run: dict[str, list[float]] = defaultdict(list)
            for run in groups[key]:
                m = run.data.metrics
                for row in INDEX_DROP_ROWS:
                    per_run[f"{row} drop"].append(m.get(f"{row}/top1", math.nan) - m.get(K.index_key(name, row, "top1"), math.nan))
                for row in ("old/old", "B/old"):
                    recall = [v for k, v in m.items() if k.startswith(K.index_key(name, row, K.RECALL))]
                    per_run[f"{row} recall"].append(recall[0] if recall else math.nan)
                per_run["backfill"].append(m.get(K.index_key(name, K.BACKFILL_AUC_PAPER), math.nan))
                per_run["backfill exact"].append(m.get(K.index_key(K.INDEX_EXACT, K.BACKFILL_AUC_PAPER), math.nan))
            row_out: dict[str, Any] = {"pair": key[0], "dataset": key[1], "method": key[2], "lambda": key[3],
                                       "index": name, "n": len(groups[key])}
            for col, vals in per_run.items():
                v = np.array(vals, dtype=float)
                v = v[~np.isnan(v)]
                row_out[col] = (float(v.mean()), float(v.std())) if v.size else (math.nan, math.nan)
            rows.append(row_out)
    return rows


INDEX_COLUMNS = ("old/old drop", "B/old drop", "B/F drop", "old/old recall", "B/old recall", "backfill",
                 "backfill exact")


def index_markdown(rows: list[dict[str, Any]]) -> str:
    head = ["pair", "data set", "method", "lambda", "index", *INDEX_COLUMNS]
    lines = ["", "## Inside a faiss index: top-1 drop from exact search (exact − index, points), recall@k (%) and "
             "backfill area (top-1, paper order) in the index and by exact search", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["pair"], r["dataset"], r["method"], r["lambda"] or "-", r["index"], *(_fmt(r[c]) for c in INDEX_COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_index_drop(rows: list[dict[str, Any]], path: Path) -> bool:
    """Per cell: B/old top-1 drop (bars, one per index kind) per method and lambda, the old/old drop of the
    same index as a black tick; and B/old recall@k beside old/old's."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not rows:
        return False
    cells: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        cells[(r["pair"], r["dataset"])].append(r)
    names = list(dict.fromkeys(r["index"] for r in rows))
    fig, axes = plt.subplots(len(cells), 2, figsize=(12, 3.8 * len(cells)), squeeze=False)
    width = 0.8 / len(names)
    for ((pair, ds), group), ax_row in zip(cells.items(), axes):
        labels = list(dict.fromkeys(r["method"] if r["method"] != "lambda" else f"λ={r['lambda']}" for r in group))
        for ax, (value, ref, ylabel) in zip(ax_row, (("B/old drop", "old/old drop", "top-1 drop, exact − index (points)"),
                                                     ("B/old recall", "old/old recall", "recall@k vs exact (%)"))):
            for j, name in enumerate(names):
                rs = {(r["method"] if r["method"] != "lambda" else f"λ={r['lambda']}"): r for r in group if r["index"] == name}
                xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(labels))]
                ax.bar(xs, [rs[lab][value][0] for lab in labels], width, yerr=[rs[lab][value][1] for lab in labels],
                       color=f"C{j}", label=f"{name}: B/old")
                ax.scatter(xs, [rs[lab][ref][0] for lab in labels], marker="_", s=200, color="black", zorder=3,
                           label="old/old (same index)" if j == 0 else None)
            ax.set_xticks(range(len(labels)), labels)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{pair} on {ds}", fontsize=9)
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def build_report(tracking_uri: str, study: str, out_dir: Path) -> Report:
    """Summary table and plots for a study, written to `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    from study import sequence_report

    _, children = fetch_runs(tracking_uri, study)
    seq_runs = [r for r in children if r.info.status == "FINISHED" and sequence_report.sequence_length(r.data.metrics)]
    children = [r for r in children if r not in seq_runs]
    rows, failed = summarize(children)
    index_rows = summarize_index(children)
    seq_groups: dict[tuple, list[dict[str, float]]] = defaultdict(list)
    for run in sorted(seq_runs, key=lambda r: _sort_key(_group_key(r))):
        seq_groups[_group_key(run)].append(run.data.metrics)
    seq_rows = sequence_report.summarize(seq_groups)
    markdown = (to_markdown(study, rows, failed) if rows or failed or not seq_rows else "")
    markdown += ((index_markdown(index_rows) if index_rows else "")
                + (sequence_report.markdown(seq_rows) if seq_rows else ""))
    md_path, csv_path = out_dir / "summary.md", out_dir / "summary.csv"
    md_path.write_text(markdown)
    write_csv(csv_path, rows)
    files = [csv_path, md_path]
    for name, fn in (("lambda_sweep.png", lambda p: plot_lambda_sweep(rows, p)), ("pareto.png", lambda p: plot_pareto(rows, p)),
                     ("backfill.png", lambda p: plot_backfill(_client(tracking_uri), children, p)),
                     ("index_drop.png", lambda p: plot_index_drop(index_rows, p)),
                     ("sequence_ac_am.png", lambda p: sequence_report.plot_against_lambda(seq_rows, p))):
        if fn(out_dir / name):
            files.append(out_dir / name)
    return Report(rows=rows, failed=failed, markdown=markdown, files=files)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="study/report.py", description="Summary table and plots of a study from MLflow.")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--out", default=None, help="output folder (default reports/<study>)")
    args = p.parse_args(argv)
    from study.tracking import default_tracking_uri
    uri = args.tracking_uri or default_tracking_uri(Path.cwd())
    try:
        report = build_report(uri, args.study, Path(args.out or Path("reports") / args.study))
    except LookupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.markdown)
    print("wrote: " + ", ".join(str(f) for f in report.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
