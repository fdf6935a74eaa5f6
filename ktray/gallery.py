"""Pictures of a clustering: a gallery of clusters, the objective per iteration, the sizes.

Pseudo-labels are only as good as the clusters look (the paper's Fig. 3 shows clusters of
its VGG16 Jigsaw++ features): a row of member images per cluster tells at a glance whether
a cluster is an object, a texture or a colour. Rows are taken from the largest, the
smallest and random clusters, the images of each row nearest to the centroid first.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot state, no display)
and written with :func:`ktray.rundir.write_bytes_atomic`, so a run root may be a URI.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ktray.rundir import filesystem, write_bytes_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _save(fig: Figure, uri: str) -> None:
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
    _save(fig, uri)


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
    _save(fig, uri)


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


def fetch_images(images: str, image_ids: Sequence[str]) -> pa.Table:
    """The rows of the shard directory ``images`` whose id is in ``image_ids`` (a filtered scan)."""
    import pyarrow.dataset as pads

    from ktray.data import shard_files

    files = shard_files(images)
    fs, _ = filesystem(files[0])
    ds = pads.dataset([filesystem(f)[1] for f in files], format="parquet", filesystem=fs)
    return ds.to_table(columns=["image_id", "image", "label"], filter=pc.field("image_id").isin(list(image_ids)))


def cluster_gallery_png(
    uri: str,
    labels: pa.Table,
    images: str,
    *,
    n_clusters: int = 12,
    per_row: int = 8,
    seed: int = 0,
    thumb: int = 64,
) -> None:
    """One row of member images (nearest to the centroid first) per chosen cluster.

    Each row is titled with the cluster id, its size, why it was chosen and, when the images
    carry real labels, the majority class and its share of the shown images.
    """
    from matplotlib.figure import Figure

    from ktray.data import class_names, decode_image

    cluster = labels["cluster"].to_numpy()
    dist = labels["distance"].to_numpy()
    ids = np.asarray(labels["image_id"].to_pylist(), dtype=object)
    k = int(cluster.max()) + 1 if len(cluster) else 0
    sizes = np.bincount(cluster, minlength=k)
    chosen = pick_clusters(sizes, n_clusters, seed)
    rows: list[tuple[int, str, list[str]]] = []
    for c, why in chosen:
        members = np.flatnonzero(cluster == c)
        members = members[np.argsort(dist[members], kind="stable")][:per_row]
        rows.append((c, why, list(ids[members])))
    wanted = [i for _, _, m in rows for i in m]
    table = fetch_images(images, wanted) if wanted else pa.table({"image_id": [], "image": [], "label": []})
    by_id = {i: (img, lab) for i, img, lab in zip(
        table["image_id"].to_pylist(), table["image"].to_pylist(), table["label"].to_pylist()
    )}
    try:
        names = class_names(images)
    except FileNotFoundError:
        names = []

    fig = Figure(figsize=(per_row * 1.1, max(1, len(rows)) * 1.25))
    axes = fig.subplots(max(1, len(rows)), per_row, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, (c, why, members) in enumerate(rows):
        shown_labels = []
        for j, image_id in enumerate(members):
            img, lab = by_id.get(image_id, (None, None))
            pixels = decode_image(img, thumb) if img is not None else None
            if pixels is not None:
                axes[r, j].imshow(pixels)
            if lab is not None:
                shown_labels.append(int(lab))
        title = f"cluster {c} ({why}, n={sizes[c]})"
        if shown_labels:
            top = int(np.bincount(shown_labels).argmax())
            share = shown_labels.count(top) / len(shown_labels)
            name = names[top] if top < len(names) else str(top)
            title += f": {share:.0%} {name}"
        axes[r, 0].set_title(title, loc="left", fontsize=8)
    _save(fig, uri)
