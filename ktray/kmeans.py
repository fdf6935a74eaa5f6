"""Distributed Lloyd k-means over Ray actors, with faiss doing the nearest-centroid search.

The cluster stage of the paper (Noroozi et al. 2018, Sec. 3: "we cluster the conv4
features of the teacher with k-means, k = 2000") turns the teacher's features into
pseudo-labels. At ImageNet scale the features do not fit one process comfortably, so the
rows are split over a group of :class:`KMeansShard` actors (one per GPU on a GPU cluster)
and each Lloyd iteration is a map-reduce over them::

    driver                                  actor i (holds rows X_i, loaded from Parquet)
    C_t ──ray.put──► ref ──────────────────► labels, d2 = search(index(C_t), X_i)
                                             S_i[c] = sum_{x in X_i, label=c} x   (float64)
                                             n_i[c], J_i = sum d2
    S = S_0 + S_1 + ...  (fixed actor order)◄──────────
    C_{t+1} = S / n, then split empty clusters (faiss's rule, seeded RNG on the driver)

Everything numeric is a plain function below (:func:`assign`, :func:`partial_stats`,
:func:`update_centroids`, :func:`split_empty_clusters`, :func:`lloyd`) that a unit test
calls without Ray; Ray sits in :class:`KMeansShard` and :func:`distributed_lloyd`.

Conventions (faiss's, so the numbers compare):

- The objective of iteration t is the sum of squared L2 distances of the training rows to
  their nearest centroid in C_t (what ``faiss.Kmeans.obj`` lists), computed *before*
  the update to C_{t+1}. The centroids returned are C_niter (after the last update).
- ``max_points_per_centroid`` (faiss default 256) *subsamples the training set* to
  k * max_points_per_centroid rows; it does not cap cluster sizes. All rows are assigned
  to the final centroids afterwards. 0 trains on every row (as DeepCluster and CompRess,
  who set it to 1e7).
- Spherical k-means (optional) L2-normalises the centroids after each update and searches
  by inner product; distances and objectives are still reported as squared L2.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ktray import metrics, schema
from ktray.rundir import StageDir, filesystem, stage_dir, write_bytes_atomic, write_manifest

if TYPE_CHECKING:

    from ktray.config import Config

log = logging.getLogger(__name__)

# faiss Clustering.cpp: "a bit above machine epsilon for float16".
SPLIT_EPS = 1.0 / 1024.0
# faiss warns below this many training points per centroid.
MIN_POINTS_PER_CENTROID = 39
# Rows per search/accumulate call: bounds the float64 copy made for the sums.
CHUNK_ROWS = 65536


# --------------------------------------------------------------------------- search


class TorchFlatIndex:
    """A flat (exact) index on a torch device, with faiss's ``search(x, 1)`` interface.

    Used on GPU actors when the installed faiss has no GPU support (``faiss-cpu`` wheels on
    a GPU cluster): the distance matrix is one matmul per chunk, as faiss's own GPU
    IndexFlat does. Distances are squared L2, computed as ||x||^2 + ||c||^2 - 2 x.c.
    """

    def __init__(self, centroids: np.ndarray, device: str = "cuda", inner_product: bool = False):
        import torch

        self.device = torch.device(device)
        self.inner_product = inner_product
        self.c = torch.as_tensor(np.ascontiguousarray(centroids, np.float32), device=self.device)  # (k, d)
        self.c_sq = (self.c * self.c).sum(1)  # (k,)

    def search(self, x: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        import torch

        assert k == 1, "only nearest-centroid search is needed"
        out_d, out_i = [], []
        with torch.no_grad():
            for start in range(0, len(x), CHUNK_ROWS):
                xb = torch.as_tensor(x[start : start + CHUNK_ROWS], device=self.device)  # (B, d)
                dots = xb @ self.c.T  # (B, k)
                if self.inner_product:
                    best, idx = dots.max(1)
                else:
                    d2 = self.c_sq[None, :] - 2 * dots  # ||x||^2 does not change the argmin
                    best, idx = d2.min(1)
                    best = best + (xb * xb).sum(1)
                out_d.append(best.float().cpu().numpy())
                out_i.append(idx.cpu().numpy())
        if not out_d:
            return np.zeros((0, 1), np.float32), np.zeros((0, 1), np.int64)
        return np.concatenate(out_d)[:, None], np.concatenate(out_i).astype(np.int64)[:, None]


def make_index(centroids: np.ndarray, *, spherical: bool = False, device: str = "cpu", gpu_res: Any = None) -> Any:
    """A flat index over ``centroids`` (k, d): faiss on CPU, faiss-GPU or torch on CUDA.

    ``device="cuda"`` uses a faiss GPU index when faiss was built with GPU support (pass
    ``gpu_res``, a ``faiss.StandardGpuResources`` kept for the actor's life), otherwise
    :class:`TorchFlatIndex`. ``device="torch-cpu"`` runs the torch path on CPU (tests).
    """
    import faiss

    c = np.ascontiguousarray(centroids, dtype=np.float32)
    d = c.shape[1]
    if device == "cuda" and faiss.get_num_gpus() > 0:
        res = gpu_res if gpu_res is not None else faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(res, d) if spherical else faiss.GpuIndexFlatL2(res, d)
    elif device in ("cuda", "torch-cpu"):
        return TorchFlatIndex(c, "cuda" if device == "cuda" else "cpu", inner_product=spherical)
    else:
        index = faiss.IndexFlatIP(d) if spherical else faiss.IndexFlatL2(d)
    index.add(c)
    return index


def as_rows(x: np.ndarray) -> np.ndarray:
    """``x`` as C-contiguous float32 (N, d), what faiss wants (no copy when it already is)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a (N, d) matrix, got shape {x.shape}")
    return x


def assign(
    index_or_centroids: Any, x: np.ndarray, *, spherical: bool = False, centroids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row: ``labels`` int64 (N,), ``distances`` float32 (N,), squared L2.

    Accepts a ready index (faiss or :class:`TorchFlatIndex`) or a centroid matrix (k, d),
    for which a CPU ``IndexFlatL2`` (``IndexFlatIP`` when spherical) is built. With a ready
    index and ``spherical``, pass its ``centroids`` too (GPU indexes cannot hand them back).
    """
    x = as_rows(x)
    if isinstance(index_or_centroids, np.ndarray):
        centroids = index_or_centroids
        index = make_index(centroids, spherical=spherical)
    else:
        index = index_or_centroids
    dist, labels = index.search(x, 1)  # (N, 1) each
    labels = labels[:, 0].astype(np.int64)
    dist = dist[:, 0]
    if spherical:
        # The index returned inner products; report squared L2 so distances mean one thing.
        if centroids is None:
            centroids = _index_centroids(index)
        c_sq = np.einsum("kd,kd->k", centroids, centroids)
        x_sq = np.einsum("nd,nd->n", x, x)
        dist = np.maximum(x_sq + c_sq[labels] - 2 * dist, 0)
    if len(labels) and labels.min() < 0:
        raise RuntimeError("faiss returned -1 labels: non-finite features or centroids")
    return labels, dist.astype(np.float32)


def _index_centroids(index: Any) -> np.ndarray:
    if isinstance(index, TorchFlatIndex):
        return index.c.cpu().numpy()
    import faiss

    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d).copy()


# --------------------------------------------------------------------------- statistics


@dataclass
class Stats:
    """One partition's share of a Lloyd step."""

    sums: np.ndarray  # (k, d) float64: sum of the rows assigned to each centroid
    counts: np.ndarray  # (k,) int64
    objective: float  # sum of squared L2 distances to the nearest centroid


def class_sums(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per-label sums of the rows of ``x`` in float64, (k, d); rows added in row order."""
    import scipy.sparse as sp

    n, d = x.shape
    out = np.zeros((k, d), np.float64)
    for start in range(0, n, CHUNK_ROWS):
        lab = labels[start : start + CHUNK_ROWS]
        onehot = sp.csr_matrix(
            (np.ones(len(lab), np.float64), (lab, np.arange(len(lab)))), shape=(k, len(lab))
        )  # (k, B)
        out += onehot @ x[start : start + CHUNK_ROWS].astype(np.float64)
    return out


def partial_stats(
    x: np.ndarray, centroids: np.ndarray | None = None, *, index: Any = None, spherical: bool = False
) -> tuple[Stats, np.ndarray, np.ndarray]:
    """Assign ``x`` (N, d) to the centroids (k, d); return its :class:`Stats`, labels and distances.

    Pass ``index`` to reuse one (GPU actors); ``centroids`` is then only used for k.
    """
    x = as_rows(x)
    if index is None:
        if centroids is None:
            raise ValueError("partial_stats needs centroids or an index")
        index = make_index(centroids, spherical=spherical)
    k = centroids.shape[0] if centroids is not None else index.ntotal
    labels, dist = assign(index, x, spherical=spherical, centroids=centroids)
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    stats = Stats(class_sums(x, labels, k), counts, float(dist.astype(np.float64).sum()))
    return stats, labels, dist


def reduce_stats(parts: Sequence[Stats]) -> Stats:
    """Sum partial stats in the given (fixed) order, so the result does not depend on timing."""
    sums = parts[0].sums.copy()
    counts = parts[0].counts.copy()
    objective = parts[0].objective
    for p in parts[1:]:
        sums += p.sums
        counts += p.counts
        objective += p.objective
    return Stats(sums, counts, objective)


def update_centroids(
    sums: np.ndarray, counts: np.ndarray, previous: np.ndarray, *, spherical: bool = False
) -> np.ndarray:
    """New centroids (k, d) float32 = sums / counts; empty clusters keep ``previous`` (split next)."""
    out = previous.astype(np.float64, copy=True)
    full = counts > 0
    out[full] = sums[full] / counts[full, None]
    if spherical:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out = out / np.maximum(norms, 1e-12)
    return out.astype(np.float32)


def split_empty_clusters(
    centroids: np.ndarray, counts: np.ndarray, rng: np.random.Generator, n: int | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """faiss's empty-cluster rule (``split_clusters`` in faiss/Clustering.cpp).

    For each empty cluster ci, in index order: scan the clusters cyclically from 0, accept
    cluster cj with probability (size_j - 1) / (n - k) (one uniform draw per candidate;
    after 10k candidates without acceptance, take the largest cluster); copy cj's centroid
    into ci; scale the two copies by (1 + eps) and (1 - eps) in alternating coordinates
    (eps = 1/1024; ci gets + on even coordinates, cj gets -); give ci half of cj's count.
    Sizes are updated as clusters are split, so a donor can be split again.

    The RNG is the driver's, seeded from the config, so 1, 2 or 4 actors split identically.
    Returns new centroids (float32), new (fractional) sizes and the number of splits.
    """
    k = len(counts)
    n = int(counts.sum()) if n is None else n
    sizes = counts.astype(np.float64, copy=True)
    out = centroids.astype(np.float32, copy=True)
    empty = np.flatnonzero(sizes == 0)
    if len(empty) == 0:
        return out, sizes, 0
    if n <= k:
        raise ValueError(f"cannot split empty clusters: {n} training rows for k={k} clusters (need n > k)")
    sign = np.where(np.arange(out.shape[1]) % 2 == 0, 1.0, -1.0).astype(np.float32)  # (d,)
    eps = np.float32(SPLIT_EPS)
    for ci in empty:
        cj = -1
        for _ in range(10):  # 10 passes over k candidates = faiss's 10 * k tries
            p = (sizes - 1.0) / float(n - k)
            hit = np.flatnonzero(rng.random(k) < p)
            if len(hit):
                cj = int(hit[0])
                break
        if cj < 0:
            cj = int(np.argmax(sizes))
        out[ci] = out[cj] * (1 + eps * sign)
        out[cj] = out[cj] * (1 - eps * sign)
        sizes[ci] = sizes[cj] / 2
        sizes[cj] -= sizes[ci]
    return out, sizes, len(empty)


def split_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, 3])


# --------------------------------------------------------------------------- initialisation


def train_rows(n: int, k: int, seed: int, max_points_per_centroid: int) -> np.ndarray | None:
    """Global indices of the rows k-means trains on (sorted), or None for all of them.

    faiss's rule: when n > k * max_points_per_centroid, draw that many rows at random.
    """
    if max_points_per_centroid <= 0 or n <= k * max_points_per_centroid:
        return None
    rng = np.random.default_rng([seed, 1])
    return np.sort(rng.choice(n, k * max_points_per_centroid, replace=False))


def init_rows(n_train: int, k: int, seed: int, init: str = "random", init_sample: int = 0) -> np.ndarray:
    """Indices (into the training rows) of the rows initialisation looks at.

    ``random``: k distinct rows, in draw order; they are the initial centroids.
    ``kmeans++``: a sample of ``init_sample`` rows (0: min(n, 32 k)) that k-means++ runs on.
    """
    if n_train < k:
        raise ValueError(f"cluster.k: {k} clusters need at least as many training rows, got {n_train}")
    rng = np.random.default_rng([seed, 2])
    if init == "random":
        return rng.choice(n_train, k, replace=False)
    m = min(n_train, init_sample or 32 * k)
    return np.sort(rng.choice(n_train, m, replace=False))


def init_centroids(rows: np.ndarray, k: int, seed: int, init: str = "random") -> np.ndarray:
    """Initial centroids (k, d) float32 from the rows :func:`init_rows` chose."""
    rows = as_rows(rows)
    if init == "random":
        return rows.copy()
    from sklearn.cluster import kmeans_plusplus

    centers, _ = kmeans_plusplus(rows, k, random_state=seed)
    return as_rows(centers)


# --------------------------------------------------------------------------- reference


@dataclass
class KMeansResult:
    centroids: np.ndarray  # (k, d) float32, after the last update
    objective: list[float]  # per iteration, before its update (faiss's obj)
    splits: list[int]  # empty clusters split per iteration
    seconds: list[float] = field(default_factory=list)  # wall time per iteration
    labels: np.ndarray | None = None  # (N,) final assignment of every row
    distances: np.ndarray | None = None  # (N,) squared L2 to the assigned centroid
    n_train: int = 0


def lloyd(
    x: np.ndarray,
    k: int,
    niter: int,
    *,
    seed: int = 1234,
    init: str = "random",
    init_sample: int = 0,
    centroids: np.ndarray | None = None,
    max_points_per_centroid: int = 0,
    spherical: bool = False,
    verbose: bool = False,
) -> KMeansResult:
    """Single-process reference k-means: the same steps as :func:`distributed_lloyd`, one faiss index.

    ``centroids`` overrides initialisation (tests compare implementations from the same start).
    """
    x = as_rows(x)
    sub = train_rows(len(x), k, seed, max_points_per_centroid)
    xt = x if sub is None else x[sub]
    if centroids is None:
        centroids = init_centroids(xt[init_rows(len(xt), k, seed, init, init_sample)], k, seed, init)
    c = as_rows(centroids).copy()
    rng = split_rng(seed)
    result = KMeansResult(c, [], [], n_train=len(xt))
    for it in range(niter):
        t0 = time.perf_counter()
        stats, _, _ = partial_stats(xt, c, spherical=spherical)
        c = update_centroids(stats.sums, stats.counts, c, spherical=spherical)
        c, _, nsplit = split_empty_clusters(c, stats.counts, rng, n=len(xt))
        _record(result, it, niter, stats.objective, nsplit, time.perf_counter() - t0, verbose)
    result.centroids = c
    result.labels, result.distances = assign(c, x, spherical=spherical)
    return result


def _record(result: KMeansResult, it: int, niter: int, obj: float, nsplit: int, dt: float, verbose: bool) -> None:
    result.objective.append(obj)
    result.splits.append(nsplit)
    result.seconds.append(dt)
    if verbose:
        print(f"k-means iter {it + 1}/{niter}: objective {obj:.6g}, {nsplit} empty clusters split, {dt:.3f} s",
              flush=True)


# --------------------------------------------------------------------------- Ray actors


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one features Parquet file."""

    uri: str
    start: int
    stop: int


def plan_partitions(files: Sequence[tuple[str, int]], num_parts: int) -> list[list[Piece]]:
    """Split the rows of ``files`` ((uri, num_rows) in order) into ``num_parts`` contiguous ranges.

    Partition p holds global rows [p*N//P, (p+1)*N//P): the same rows whatever the file
    layout, so the concatenation over partitions is the files' row order.
    """
    n = sum(r for _, r in files)
    bounds = [p * n // num_parts for p in range(num_parts + 1)]
    parts: list[list[Piece]] = []
    for p in range(num_parts):
        lo, hi = bounds[p], bounds[p + 1]
        pieces, offset = [], 0
        for uri, rows in files:
            a, b = max(lo, offset), min(hi, offset + rows)
            if a < b:
                pieces.append(Piece(uri, a - offset, b - offset))
            offset += rows
        parts.append(pieces)
    return parts


def features_to_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A ``fixed_size_list<float32>[d]`` column as a float32 (N, d) matrix."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    d = arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, d).astype(np.float32, copy=False)


def load_pieces(pieces: Sequence[Piece]) -> tuple[np.ndarray, pa.ChunkedArray]:
    """Read the rows of ``pieces``: features (N, d) float32 and image ids (Arrow strings, compact)."""
    xs, ids = [], []
    for piece in pieces:
        fs, path = filesystem(piece.uri)
        t = pq.read_table(path, filesystem=fs, columns=["image_id", "feature"]).slice(
            piece.start, piece.stop - piece.start
        )
        schema.feature_dim(t.schema)
        xs.append(features_to_numpy(t["feature"]))
        ids.extend(t["image_id"].chunks)
    return as_rows(np.concatenate(xs)), pa.chunked_array(ids, pa.string())


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


# --------------------------------------------------------------------------- stage


def feature_files(features: StageDir) -> list[tuple[str, int]]:
    """The features Parquet files of an embed stage, sorted, with their row counts."""
    fs, base = filesystem(features.path("features"))
    infos = fs.get_file_info(pa.fs.FileSelector(base, allow_not_found=True))
    paths = sorted(i.path for i in infos if i.type == pa.fs.FileType.File and i.base_name.endswith(".parquet"))
    if not paths:
        raise FileNotFoundError(f"{features.path('features')}: no features Parquet files")
    prefix = features.uri.split("://", 1)[0] + "://" if "://" in features.uri else ""
    return [(prefix + p, pq.ParquetFile(p, filesystem=fs).metadata.num_rows) for p in paths]


def resolve_device(cfg_device: str) -> str:
    """``auto`` -> ``cuda`` when the Ray cluster has GPUs, else ``cpu``."""
    if cfg_device != "auto":
        return cfg_device
    import ray

    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def size_histogram(counts: np.ndarray, bins: int = 20) -> dict[str, list[float]]:
    """Histogram of cluster sizes on log-spaced bins (sizes span orders of magnitude)."""
    hi = max(int(counts.max()), 1)
    edges = np.unique(np.round(np.geomspace(1, hi + 1, bins + 1)).astype(np.int64))
    hist, _ = np.histogram(counts, bins=np.concatenate([[0], edges]))
    return {"edges": [0, *edges.tolist()], "counts": hist.tolist()}


def label_agreement(labels: pa.Table, images: str) -> dict[str, float]:
    """NMI and ARI of the clusters against the images' real labels (labelled rows only)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from ktray.data import load_table

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


def _save_npy(uri: str, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    write_bytes_atomic(uri, buf.getvalue())


def _inputs(features: StageDir, images: str | None) -> list[StageDir | str]:
    if images is None:
        return [features]
    from ktray.data import data_key

    return [features, data_key(images)]


def output_dir(cfg: Config, features: StageDir, images: str | None = None) -> StageDir:
    """Where :func:`run` writes for this config and these inputs (the compute device is not part of it)."""
    return stage_dir(cfg.root, "cluster", cfg.cluster.to_dict(), _inputs(features, images))


def run(cfg: Config, features: StageDir, images: str | None = None) -> StageDir:
    """The cluster stage: k-means on the features of ``features``; labels, centroids, plots.

    ``images`` (a shard directory) adds the NMI/ARI against real labels and the gallery.
    """
    import ray

    from ktray import gallery

    c = cfg.cluster
    inputs = _inputs(features, images)
    sd = output_dir(cfg, features, images)
    if sd.done():
        return sd
    started = time.time()
    sd.make()
    from ktray.pipeline import init_ray

    init_ray()  # the job's cluster (RAY_ADDRESS) or a local one

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
    fs, path = filesystem(sd.path("labels.parquet"))
    pq.write_table(table, path, filesystem=fs)
    metrics.record_rows("cluster", table.num_rows)
    _save_npy(sd.path("centroids.npy"), result.centroids)

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

    files_out = ["labels.parquet", "centroids.npy", "stats.json", "objective.png", "sizes.png"]
    gallery.objective_png(sd.path("objective.png"), result.objective)
    gallery.sizes_png(sd.path("sizes.png"), sizes)
    if images is not None and c.gallery_clusters > 0:
        gallery.cluster_gallery_png(sd.path("gallery.png"), table, images, n_clusters=c.gallery_clusters,
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
    write_manifest(sd, config=c.to_dict(), inputs=inputs, files=files_out,
                   metrics={"summary": summary, "history": history}, started=started)
    return sd


__all__ = [
    "KMeansResult",
    "KMeansShard",
    "Piece",
    "Stats",
    "assign",
    "assign_all",
    "distributed_lloyd",
    "lloyd",
    "make_index",
    "output_dir",
    "partial_stats",
    "plan_partitions",
    "reduce_stats",
    "run",
    "split_empty_clusters",
    "start_shards",
    "update_centroids",
]
