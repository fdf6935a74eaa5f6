"""Lloyd k-means as map-reduce steps, with faiss doing the nearest-centroid search (no Ray here).

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

Everything numeric is a plain function here (:func:`assign`, :func:`partial_stats`,
:func:`update_centroids`, :func:`split_empty_clusters`, :func:`lloyd`) that a unit test
calls without Ray; the actors (``KMeansShard``, ``distributed_lloyd``) are the cluster
stage's, in ``ktray.stages.cluster``.

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

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ktray import schema
from ktray.rundir import filesystem
from ktray.schema import features_to_numpy

# faiss Clustering.cpp: "a bit above machine epsilon for float16".
SPLIT_EPS = 1.0 / 1024.0


# faiss warns below this many training points per centroid.
MIN_POINTS_PER_CENTROID = 39


# Rows per search/accumulate call: bounds the float64 copy made for the sums.
CHUNK_ROWS = 65536


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


def size_histogram(counts: np.ndarray, bins: int = 20) -> dict[str, list[float]]:
    """Histogram of cluster sizes on log-spaced bins (sizes span orders of magnitude)."""
    hi = max(int(counts.max()), 1)
    edges = np.unique(np.round(np.geomspace(1, hi + 1, bins + 1)).astype(np.int64))
    hist, _ = np.histogram(counts, bins=np.concatenate([[0], edges]))
    return {"edges": [0, *edges.tolist()], "counts": hist.tolist()}
