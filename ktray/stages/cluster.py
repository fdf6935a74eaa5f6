"""The cluster stage: k-means on the teacher's features, by a group of Ray actors; pseudo-labels as Arrow.

    features/*.parquet ──► KMeansShard actors (one partition each, on its GPU if it has one)
                           per Lloyd step: the driver broadcasts C_t, each actor returns its
                           partial sums, counts and objective, the driver reduces (fixed order)
                       ──► labels.parquet (image_id, cluster, distance), centroids.npy, plots

The maths is ``ktray.algos.kmeans`` (plain functions, tested against faiss itself); this module
is the Ray side and the stage. With the images' shard directory, it also measures the
clusters' NMI/ARI against the real labels and draws a gallery of members per cluster.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ktray import metrics, schema
from ktray.algos.kmeans import (
    MIN_POINTS_PER_CENTROID,
    KMeansResult,
    Piece,
    Stats,
    _record,
    as_rows,
    assign,
    init_centroids,
    init_rows,
    load_pieces,
    make_index,
    partial_stats,
    plan_partitions,
    reduce_stats,
    size_histogram,
    split_empty_clusters,
    split_rng,
    train_rows,
    update_centroids,
)
from ktray.artifacts import LABELS, feature_files
from ktray.data.decode import decode_image
from ktray.data.shards import class_names, data_key, load_table, shard_files
from ktray.lifecycle import Output, StageSpec, ensure
from ktray.plots import objective_png, pick_clusters, save_png, sizes_png
from ktray.rundir import StageDir, filesystem, write_bytes_atomic, write_npy
from ktray.runtime import resolve_device

if TYPE_CHECKING:
    from ktray.config import Config


log = logging.getLogger(__name__)


class KMeansShard:
    """A Ray actor holding one partition of the feature rows (wrap with ``ray.remote``).

    The partition is loaded in ``__init__`` from its Parquet pieces (or an object-store
    array), so when Ray restarts a dead actor (``max_restarts``) it reloads the same rows;
    every method is a pure function of its arguments and the partition, so a retried call
    (``max_task_retries``) returns the same answer.
    """

    def __init__(
        self,
        source: Sequence[Piece] | np.ndarray,
        train_local: np.ndarray | None = None,
        *,
        device: str = "cpu",
        spherical: bool = False,
        threads: int = 0,
        ids: Sequence[str] | None = None,
    ):
        import faiss

        if threads > 0:
            faiss.omp_set_num_threads(threads)
        if isinstance(source, np.ndarray):
            self.x = as_rows(source)
            names = list(ids) if ids is not None else [str(i) for i in range(len(self.x))]
            self.ids = pa.chunked_array([pa.array(names, pa.string())])
        else:
            self.x, self.ids = load_pieces(source)
        self.train = self.x if train_local is None else self.x[train_local]
        self.device = device
        self.spherical = spherical
        self.gpu_res = faiss.StandardGpuResources() if device == "cuda" and faiss.get_num_gpus() > 0 else None

    def info(self) -> dict[str, Any]:
        return {"rows": len(self.x), "train_rows": len(self.train), "dim": int(self.x.shape[1])}

    def rows(self, local_train_idx: np.ndarray) -> np.ndarray:
        """Training rows by local index (initialisation)."""
        return self.train[local_train_idx]

    def stats(self, centroids: np.ndarray) -> Stats:
        """This partition's share of one Lloyd step over its training rows."""
        index = make_index(centroids, spherical=self.spherical, device=self.device, gpu_res=self.gpu_res)
        stats, _, _ = partial_stats(self.train, centroids, index=index, spherical=self.spherical)
        return stats

    def assign_all(self, centroids: np.ndarray) -> pa.Table:
        """Every row of the partition against the final centroids: a labels table slice."""
        index = make_index(centroids, spherical=self.spherical, device=self.device, gpu_res=self.gpu_res)
        labels, dist = assign(index, self.x, spherical=self.spherical, centroids=as_rows(centroids))
        return pa.table(
            {"image_id": self.ids, "cluster": labels.astype(np.int32), "distance": dist},
            schema=schema.LABELS,
        )


def remote_shard_class(max_restarts: int = 3) -> Any:
    import ray

    return ray.remote(max_restarts=max_restarts, max_task_retries=max_restarts)(KMeansShard)


def _locate(global_idx: np.ndarray, part_sizes: Sequence[int]) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Map global training-row indices to (part, positions in global_idx, local indices)."""
    bounds = np.concatenate([[0], np.cumsum(part_sizes)])
    part = np.searchsorted(bounds, global_idx, side="right") - 1
    out = []
    for p in range(len(part_sizes)):
        pos = np.flatnonzero(part == p)
        if len(pos):
            out.append((p, pos, global_idx[pos] - bounds[p]))
    return out


def distributed_lloyd(
    actors: Sequence[Any],
    k: int,
    niter: int,
    *,
    seed: int = 1234,
    init: str = "random",
    init_sample: int = 0,
    centroids: np.ndarray | None = None,
    spherical: bool = False,
    on_iter: Callable[[int, float, int, float], None] | None = None,
    verbose: bool = False,
) -> KMeansResult:
    """Lloyd iterations over ``actors`` (handles of :class:`KMeansShard`), reduced on the driver.

    Does not run the final assignment (see :func:`assign_all`), so the caller decides where
    the labels go.
    """
    import ray

    infos = ray.get([a.info.remote() for a in actors])
    train_sizes = [i["train_rows"] for i in infos]
    n_train = sum(train_sizes)
    if centroids is None:
        idx = init_rows(n_train, k, seed, init, init_sample)
        d = infos[0]["dim"]
        rows = np.empty((len(idx), d), np.float32)
        located = _locate(idx, train_sizes)
        fetched = ray.get([actors[p].rows.remote(local) for p, _, local in located])
        for (_, pos, _), got in zip(located, fetched):
            rows[pos] = got
        centroids = init_centroids(rows, k, seed, init)
    c = as_rows(centroids).copy()
    rng = split_rng(seed)
    result = KMeansResult(c, [], [], n_train=n_train)
    for it in range(niter):
        t0 = time.perf_counter()
        ref = ray.put(c)  # one broadcast per iteration through the object store
        parts = ray.get([a.stats.remote(ref) for a in actors])  # list order = actor order
        total = reduce_stats(parts)
        c = update_centroids(total.sums, total.counts, c, spherical=spherical)
        c, _, nsplit = split_empty_clusters(c, total.counts, rng, n=n_train)
        dt = time.perf_counter() - t0
        metrics.record_kmeans(it, total.objective, nsplit, sizes=total.counts)
        _record(result, it, niter, total.objective, nsplit, dt, verbose)
        if on_iter is not None:
            on_iter(it, total.objective, nsplit, dt)
    result.centroids = c
    return result


def start_shards(
    sources: Sequence[Sequence[Piece] | np.ndarray],
    train_local: Sequence[np.ndarray | None],
    *,
    device: str = "cpu",
    spherical: bool = False,
    cpus_per_actor: float = 1,
    ids: Sequence[Sequence[str] | None] | None = None,
    max_restarts: int = 3,
) -> list[Any]:
    """One :class:`KMeansShard` actor per source, one GPU each when ``device == 'cuda'``."""
    cls = remote_shard_class(max_restarts)
    group = []
    for i, src in enumerate(sources):
        group.append(
            # DEFAULT scheduling: outside any placement group the caller runs in (a Tune
            # trial's), whose bundles hold no CPU for the actors.
            cls.options(num_cpus=cpus_per_actor, num_gpus=1 if device == "cuda" else 0,
                        scheduling_strategy="DEFAULT").remote(
                src,
                train_local[i],
                device=device,
                spherical=spherical,
                threads=max(1, int(cpus_per_actor)),
                ids=None if ids is None else ids[i],
            )
        )
    return group


def assign_all(actors: Sequence[Any], centroids: np.ndarray) -> pa.Table:
    """The labels table of every row held by ``actors``, in partition order."""
    import ray

    ref = ray.put(as_rows(centroids))
    return pa.concat_tables(ray.get([a.assign_all.remote(ref) for a in actors]))


def stop_shards(actors: Sequence[Any]) -> None:
    import ray

    for a in actors:
        ray.kill(a, no_restart=True)


def label_agreement(labels: pa.Table, images: str) -> dict[str, float]:
    """NMI and ARI of the clusters against the images' real labels (labelled rows only)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    truth = load_table(images, columns=["image_id", "label"])
    joined = labels.select(["image_id", "cluster"]).join(truth, "image_id", join_type="inner")
    joined = joined.filter(pa.compute.is_valid(joined["label"]))
    if joined.num_rows == 0:
        return {}
    y = joined["label"].to_numpy()
    c = joined["cluster"].to_numpy()
    return {
        "nmi": float(normalized_mutual_info_score(y, c)),
        "ari": float(adjusted_rand_score(y, c)),
        "labelled_rows": float(joined.num_rows),
    }


def _inputs(features: StageDir, images: str | None) -> list[StageDir | str]:
    return [features] if images is None else [features, data_key(images)]


def spec(cfg: Config, features: StageDir, images: str | None = None) -> StageSpec:
    """``images`` (a shard directory) adds the NMI/ARI against real labels and the gallery;
    the compute device is not part of the hash."""
    return StageSpec("cluster", cfg, cfg.cluster.to_dict(), _inputs(features, images), compute,
                     args=(features, images), data=() if images is None else (images,))


def output_dir(cfg: Config, features: StageDir, images: str | None = None) -> StageDir:
    return spec(cfg, features, images).dir


def run(cfg: Config, features: StageDir, images: str | None = None, **how: Any) -> StageDir:
    """The labels' stage folder, computed first unless done (``how``: ``force``, ``tracker``)."""
    return ensure(spec(cfg, features, images), **how)


def compute(cfg: Config, sd: StageDir, features: StageDir, images: str | None) -> Output:
    """k-means on the features of ``features``; labels, centroids, plots."""
    import ray

    c = cfg.cluster

    files = feature_files(features)
    fs0, p0 = filesystem(files[0][0])
    dim = schema.feature_dim(pq.read_schema(p0, filesystem=fs0))
    n = sum(r for _, r in files)
    device = resolve_device(cfg.compute.device)
    num_actors = min(c.num_actors, n)
    if device == "cuda":  # one GPU per actor: more actors than GPUs would wait forever
        num_actors = max(1, min(num_actors, int(ray.cluster_resources().get("GPU", 0))))
    parts = plan_partitions(files, num_actors)
    part_rows = [sum(p.stop - p.start for p in part) for part in parts]
    sub = train_rows(n, c.k, c.seed, c.max_points_per_centroid)
    bounds = np.concatenate([[0], np.cumsum(part_rows)])
    train_local = [
        None if sub is None else sub[(sub >= bounds[i]) & (sub < bounds[i + 1])] - bounds[i]
        for i in range(num_actors)
    ]
    n_train = n if sub is None else len(sub)
    if n_train < MIN_POINTS_PER_CENTROID * c.k:
        log.warning("k-means: %d training rows for k=%d is below faiss's %d per centroid", n_train, c.k,
                    MIN_POINTS_PER_CENTROID)
    print(f"cluster: {n} rows x {dim} dims, k={c.k}, training on {n_train} rows, "
          f"{num_actors} actor(s) on {device}", flush=True)

    # Never ask for more CPUs than the cluster has: the actors would wait forever.
    cpus = min(float(c.cpus_per_actor), ray.cluster_resources().get("CPU", 1) / num_actors)
    actors = start_shards(parts, train_local, device=device, spherical=c.spherical, cpus_per_actor=cpus)
    try:
        result = distributed_lloyd(actors, c.k, c.niter, seed=c.seed, init=c.init, init_sample=c.init_sample,
                                   spherical=c.spherical, verbose=True)
        table = assign_all(actors, result.centroids)
    finally:
        stop_shards(actors)

    table = table.cast(schema.with_metadata(
        schema.LABELS, k=c.k, seed=c.seed, features=features.name, niter=c.niter, dim=dim,
    ))
    schema.check_labels(table)
    sizes = np.bincount(table["cluster"].to_numpy(), minlength=c.k)
    fs, path = filesystem(sd.path(LABELS))
    pq.write_table(table, path, filesystem=fs)
    metrics.record_rows("cluster", table.num_rows)
    write_npy(sd.path("centroids.npy"), result.centroids)

    agreement = label_agreement(table, images) if images is not None else {}
    stats = {
        "objective": result.objective,
        "splits": result.splits,
        "seconds": result.seconds,
        "size_histogram": size_histogram(sizes),
        "sizes": sizes.tolist(),
        **agreement,
    }
    write_bytes_atomic(sd.path("stats.json"), json.dumps(stats, indent=1).encode())

    files_out = [LABELS, "centroids.npy", "stats.json", "objective.png", "sizes.png"]
    objective_png(sd.path("objective.png"), result.objective)
    sizes_png(sd.path("sizes.png"), sizes)
    if images is not None and c.gallery_clusters > 0:
        cluster_gallery_png(sd.path("gallery.png"), table, images, n_clusters=c.gallery_clusters,
                                    per_row=c.gallery_images, seed=c.seed)
        files_out.append("gallery.png")

    summary = {
        "objective": result.objective[-1],
        "empty_splits": float(sum(result.splits)),
        "empty_clusters_final": float(np.sum(sizes == 0)),
        "cluster_size_min": float(sizes.min()),
        "cluster_size_median": float(np.median(sizes)),
        "cluster_size_max": float(sizes.max()),
        "seconds_per_iter": float(np.mean(result.seconds)),
        "rows": float(n),
        "train_rows": float(n_train),
        **{key: v for key, v in agreement.items() if not math.isnan(v)},
    }
    history = [
        {"step": i, "objective": o, "splits": float(s), "seconds": t}
        for i, (o, s, t) in enumerate(zip(result.objective, result.splits, result.seconds))
    ]
    print("cluster: " + ", ".join(f"{key} {v:.4g}" for key, v in summary.items()), flush=True)
    return Output(files_out, summary, history)


def fetch_images(images: str, image_ids: Sequence[str]) -> pa.Table:
    """The rows of the shard directory ``images`` whose id is in ``image_ids`` (a filtered scan)."""
    import pyarrow.dataset as pads

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
    save_png(fig, uri)
