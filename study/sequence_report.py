"""Presenting sequence trials (`study.science.sequence`): a trial's matrices as CSV and heatmap, and the study
report's table of AC / AM / final-step ZS per method and lambda with its plot against lambda."""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from study.science import keys as K
from study.report import sweep_panel

SUMMARY = (("AC", "top1"), ("AM", "top1"), ("AC", "mAP"), ("AM", "mAP"))


def sequence_length(metrics: Mapping[str, float]) -> int:
    """T of a sequence trial's metrics (0: not a sequence trial)."""
    t = 0
    while K.seq_matrix_key("top1", t, t) in metrics:
        t += 1
    return t


def matrix(metrics: Mapping[str, float], t: int, stat: str, compose: str = "chain") -> np.ndarray:
    """The T x T matrix of `stat` from a trial's metrics; NaN above the diagonal (never measured)."""
    m = np.full((t, t), math.nan)
    for i in range(t):
        for j in range(i + 1):
            m[i, j] = metrics[K.seq_matrix_key(stat, i, j, compose)]
    return m


def write_matrices(metrics: Mapping[str, float], t: int, folder: Path, title: str = "") -> list[Path]:
    """`matrix_<stat>[_direct].csv` (rows: query model i, columns: gallery model j) and one heatmap PNG
    of them all (`matrix.png`) in `folder`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    composes = [c for c in K.COMPOSE_MODES if K.seq_matrix_key("top1", 1, 0, c) in metrics]
    panels = [(stat, c) for c in composes for stat in K.SEQ_STATS]
    files = []
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, (stat, compose) in zip(axes[0], panels):
        m = matrix(metrics, t, stat, compose)
        path = folder / f"matrix_{stat}{'' if compose == 'chain' else '_' + compose}.csv"
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["query\\gallery", *range(t)])
            w.writerows([i, *("" if math.isnan(v) else f"{v:.4f}" for v in row)] for i, row in enumerate(m))
        files.append(path)
        ax.imshow(np.ma.masked_invalid(m), cmap="viridis", vmin=0, vmax=100)
        for i in range(t):
            for j in range(i + 1):
                ax.text(j, i, f"{m[i, j]:.1f}", ha="center", va="center", color="white", fontsize=8)
        ac, am = metrics[K.seq_summary_key("AC", stat, compose)], metrics[K.seq_summary_key("AM", stat, compose)]
        ax.set_title(f"{stat} ({compose}): AC {ac:.2f}, AM {am:.1f}", fontsize=8)
        ax.set_xlabel("gallery model j")
        ax.set_ylabel("query model i")
        ax.set_xticks(range(t))
        ax.set_yticks(range(t))
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "matrix.png", dpi=100)
    plt.close(fig)
    return [*files, folder / "matrix.png"]


def summarize(groups: Mapping[tuple[str, str, str, str], Sequence[Mapping[str, float]]]) -> list[dict[str, Any]]:
    """Per (sequence, data set, method, lambda) group of finished trials' metrics: mean and std over
    seeds of AC / AM (top-1 and mAP) and of the final-step ZS (the map newest -> oldest)."""
    rows = []
    for key, runs in groups.items():
        t = sequence_length(runs[0]) if runs else 0
        if t < 3:
            continue
        row: dict[str, Any] = {"sequence": key[0], "dataset": key[1], "method": key[2], "lambda": key[3],
                               "n": len(runs)}
        cols = {f"{name}/{stat}": K.seq_summary_key(name, stat) for name, stat in SUMMARY}
        cols["ZS final"] = K.seq_zs_key(t - 1, 0)
        for col, metric in cols.items():
            v = np.array([r.get(metric, math.nan) for r in runs], dtype=float)
            v = v[~np.isnan(v)]
            row[col] = (float(v.mean()), float(v.std())) if v.size else (math.nan, math.nan)
        rows.append(row)
    return rows


COLUMNS = (*(f"{name}/{stat}" for name, stat in SUMMARY), "ZS final")


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ["sequence", "data set", "method", "lambda", "seeds", *COLUMNS]
    lines = ["", "## Sequences: AC (share, strict >), AM (%) and final-step ZS (newest -> oldest map), "
             "mean ± std over seeds", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["sequence"], r["dataset"], r["method"], r["lambda"] or "-", str(r["n"]),
                 *("n/a" if math.isnan(r[c][0]) else f"{r[c][0]:.2f} ± {r[c][1]:.2f}" for c in COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_against_lambda(rows: list[dict[str, Any]], path: Path) -> bool:
    """Per (sequence, data set): AC and AM (top-1) against lambda; orthogonal and affine as the two ends."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        cells[(r["sequence"], r["dataset"])].append(r)
    if not cells:
        return False
    fig, axes = plt.subplots(len(cells), 2, figsize=(11, 3.4 * len(cells)), squeeze=False)
    for ((seq, ds), group), ax_row in zip(cells.items(), axes):
        lam_rows = sorted((r for r in group if r["method"] == "lambda"), key=lambda r: float(r["lambda"]))
        for ax, col in zip(ax_row, ("AC/top1", "AM/top1")):
            sweep_panel(ax, lam_rows, group, lambda r, col=col: r[col], col, f"{seq} on {ds}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
