"""The figures ktray writes: the k-means objective and cluster sizes, the compare bars, the sweep curve.

(The cluster gallery, which reads images, is drawn by the cluster stage; :func:`pick_clusters`
chooses its rows: the largest, the smallest and random clusters.)

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot state, no display)
and written with :func:`ktray.rundir.write_bytes_atomic`, so a run root may be a URI.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ktray.rundir import write_bytes_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def save_png(fig: Figure, uri: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    write_bytes_atomic(uri, buf.getvalue())


def objective_png(uri: str, objective: Sequence[float]) -> None:
    """Line plot of the k-means objective (sum of squared distances) per Lloyd iteration."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    ax.plot(np.arange(1, len(objective) + 1), objective, marker="o", ms=3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("iteration")
    ax.set_ylabel("objective (sum of squared L2)")
    ax.set_title("k-means objective")
    ax.grid(alpha=0.3)
    save_png(fig, uri)


def sizes_png(uri: str, sizes: np.ndarray) -> None:
    """Cluster sizes: sorted (rank plot) and as a histogram, with the empty count in the title."""
    from matplotlib.figure import Figure

    sizes = np.asarray(sizes)
    fig = Figure(figsize=(9, 3.2))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(np.sort(sizes)[::-1])
    ax1.set_xlabel("cluster rank")
    ax1.set_ylabel("images")
    ax1.set_yscale("log" if sizes.max() > 50 * max(1, np.median(sizes)) else "linear")
    ax1.set_title(f"k={len(sizes)}, empty={int(np.sum(sizes == 0))}, median={np.median(sizes):g}")
    ax1.grid(alpha=0.3)
    ax2.hist(sizes, bins=min(50, max(5, len(sizes) // 4)))
    ax2.set_xlabel("images per cluster")
    ax2.set_ylabel("clusters")
    ax2.grid(alpha=0.3)
    save_png(fig, uri)


def pick_clusters(sizes: np.ndarray, n: int, seed: int = 0) -> list[tuple[int, str]]:
    """Up to ``n`` non-empty clusters: a third largest, a third smallest, the rest random."""
    sizes = np.asarray(sizes)
    nonempty = np.flatnonzero(sizes > 0)
    order = nonempty[np.argsort(-sizes[nonempty], kind="stable")]
    n = min(n, len(order))
    n_big = (n + 2) // 3
    n_small = min((n + 1) // 3, n - n_big)
    chosen: list[tuple[int, str]] = [(int(c), "largest") for c in order[:n_big]]
    taken = {c for c, _ in chosen}
    for c in order[::-1][:n_small]:
        if int(c) not in taken:
            chosen.append((int(c), "smallest"))
            taken.add(int(c))
    rest = np.array([c for c in order if int(c) not in taken], dtype=np.int64)
    rng = np.random.default_rng(seed)
    for c in rng.permutation(rest)[: n - len(chosen)]:
        chosen.append((int(c), "random"))
    return chosen


def bar_chart(rows: list[dict[str, Any]], columns: list[str], uri: str) -> None:
    """Grouped bars (the compare table): one group per column (taps, kNN, few-shot), one bar per row."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 1.3 * len(columns) + 2), 4.2))
    ax = fig.add_subplot()
    width = 0.8 / max(len(rows), 1)
    xs = np.arange(len(columns))
    for i, r in enumerate(rows):
        vals = [100 * r[c] if not math.isnan(r[c]) else 0.0 for c in columns]
        # Error bars from the row's interval columns (``conv4_lo``/``conv4_hi``) where it has them.
        lo = [v - 100 * r.get(f"{c}_lo", math.nan) for v, c in zip(vals, columns, strict=True)]
        hi = [100 * r.get(f"{c}_hi", math.nan) - v for v, c in zip(vals, columns, strict=True)]
        err = np.nan_to_num(np.asarray([lo, hi]), nan=0.0)
        ax.bar(xs - 0.4 + width * (i + 0.5), vals, width, label=r["name"], yerr=err if err.any() else None,
               capsize=2, error_kw={"linewidth": 0.8})
    ax.set_xticks(xs, columns)
    ax.set_ylabel("top-1 (%)")
    ax.set_title("linear probe per tap, kNN and 5-way 5-shot (val split)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    save_png(fig, uri)


def sweep_chart(rows: list[dict[str, Any]], uri: str, metric: str) -> None:
    """Accuracy against k (a sweep), one line per max_foreign."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    for mf in sorted({r["max_foreign"] for r in rows}):
        pts = sorted((r["k"], r["objective"]) for r in rows if r["max_foreign"] == mf)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"max_foreign={mf}")
    ax.set_xscale("log")
    ax.set_xlabel("k (clusters)")
    ax.set_ylabel(metric)
    ax.legend()
    ax.grid(alpha=0.3)
    save_png(fig, uri)
