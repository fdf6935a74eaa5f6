"""k-means: the pure math against faiss, the Ray actor group against the reference, the stage.

Every comparison is against faiss itself (``faiss.Kmeans``, ``IndexFlatL2``) or against
the single-process reference :func:`ktray.algos.kmeans.lloyd`, which calls faiss directly; the
expected values are derived in the test, none are typed in.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ktray import schema
from ktray.algos import kmeans as km
from ktray.artifacts import feature_files
from ktray.config import Config, replace
from ktray.data.shards import load_table
from ktray.rundir import StageDir, stage_dir, write_manifest
from ktray.stages import cluster


def blobs(n: int, d: int, centers: int, seed: int = 0, spread: float = 4.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centers, d)) * spread
    return (means[rng.integers(0, centers, n)] + rng.standard_normal((n, d))).astype(np.float32)


def far_init(x: np.ndarray, k_near: int, k_far: int, seed: int = 0) -> np.ndarray:
    """k_near data rows plus k_far centroids far outside the data: those start empty."""
    rng = np.random.default_rng(seed)
    near = x[rng.choice(len(x), k_near, replace=False)]
    far = np.abs(x).max() * 10 + rng.standard_normal((k_far, x.shape[1])).astype(np.float32)
    return np.concatenate([near, far]).astype(np.float32)


def write_features(root: Path, x: np.ndarray, ids: list[str], n_files: int = 3) -> StageDir:
    """A finished embed-stage folder holding ``x`` in uneven Parquet files (the features schema)."""
    sd = stage_dir(str(root), "embed", {"test": n_files, "n": len(x)}, [])
    sd.make()
    (Path(sd.uri) / "features").mkdir()
    cuts = np.unique(np.linspace(0, len(x), n_files + 1).astype(int) + np.r_[0, np.arange(1, n_files) * 7, 0])
    for i, (a, b) in enumerate(itertools.pairwise(cuts)):
        flat = pa.array(x[a:b].reshape(-1), pa.float32())
        t = pa.table(
            {"image_id": pa.array(ids[a:b], pa.string()),
             "feature": pa.FixedSizeListArray.from_arrays(flat, x.shape[1])},
            schema=schema.features_schema(x.shape[1]),
        )
        pq.write_table(t, str(Path(sd.uri) / "features" / f"part-{i:05d}.parquet"))
    write_manifest(sd, config={})
    return sd


# --------------------------------------------------------------------------- pure math


def test_assign_and_partial_stats_match_a_direct_computation() -> None:
    x = blobs(3000, 12, 8)
    c = x[:10].copy()
    labels, dist = km.assign(c, x)
    d2 = ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1)  # (N, k)
    assert np.array_equal(labels, d2.argmin(1))
    np.testing.assert_allclose(dist, d2.min(1), rtol=1e-4, atol=1e-3)
    stats, labels2, _ = km.partial_stats(x, c)
    assert np.array_equal(labels2, labels)
    assert stats.sums.dtype == np.float64 and stats.counts.sum() == len(x)
    for j in range(10):
        np.testing.assert_allclose(stats.sums[j], x[labels == j].astype(np.float64).sum(0), rtol=1e-10, atol=1e-8)
    np.testing.assert_allclose(stats.objective, d2.min(1).sum(), rtol=1e-5)


def test_torch_index_agrees_with_faiss() -> None:
    x = blobs(2000, 16, 5, seed=1)
    c = x[::97].copy()
    lf, df = km.assign(km.make_index(c), x)
    lt, dt = km.assign(km.make_index(c, device="torch-cpu"), x)
    assert np.array_equal(lf, lt)
    np.testing.assert_allclose(dt, df, rtol=1e-4, atol=1e-3)


def test_spherical_assignment_reports_squared_l2() -> None:
    x = blobs(1000, 8, 4, seed=2)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = x[:6] / np.linalg.norm(x[:6], axis=1, keepdims=True)
    ls, ds = km.assign(c, x, spherical=True)
    ll, dl = km.assign(c, x)
    assert np.array_equal(ls, ll)  # unit vectors: max inner product = min L2
    np.testing.assert_allclose(ds, dl, atol=1e-5)


def test_split_empty_clusters_follows_faiss_rule() -> None:
    d = 6
    centroids = np.arange(4 * d, dtype=np.float32).reshape(4, d) + 1
    counts = np.array([0, 1, 1, 5])  # n=7, k=4: p = (size-1)/(n-k) = 0, 0, 4/3: only cluster 3 can donate
    out, sizes, nsplit = km.split_empty_clusters(centroids, counts, np.random.default_rng(0))
    assert nsplit == 1
    sign = np.where(np.arange(d) % 2 == 0, 1, -1)
    eps = np.float32(1 / 1024)
    np.testing.assert_array_equal(out[0], centroids[3] * (1 + eps * sign).astype(np.float32))
    np.testing.assert_array_equal(out[3], centroids[3] * (1 - eps * sign).astype(np.float32))
    np.testing.assert_array_equal(out[1:3], centroids[1:3])
    assert sizes.tolist() == [2.5, 1, 1, 2.5]  # the donor's count is halved
    # Same RNG seed, same splits; a different seed may choose other donors.
    counts = np.array([0, 0, 40, 30, 0, 30])
    a = km.split_empty_clusters(centroids.repeat(2, 0)[:6], counts, np.random.default_rng(5))
    b = km.split_empty_clusters(centroids.repeat(2, 0)[:6], counts, np.random.default_rng(5))
    assert np.array_equal(a[0], b[0]) and a[2] == 3 and np.all(a[1] > 0)
    assert a[1].sum() == counts.sum()


def test_split_donor_frequency_is_faiss_scan() -> None:
    """Donor frequencies match the exact law of faiss's cyclic accept/reject scan."""
    counts = np.array([0, 11, 31, 61])  # n=103, k=4 -> p = 10/99, 30/99, 60/99
    p = (counts - 1) / (counts.sum() - len(counts))
    p = np.clip(p, 0, None)
    # P(first acceptance at j) over the cyclic scan = q_j / (1 - prod(1 - p)) with q_j = p_j prod_{i<j}(1 - p_i)
    q = p * np.concatenate([[1], np.cumprod(1 - p)[:-1]])
    expected = q / q.sum()
    rng = np.random.default_rng(0)
    trials = 4000
    donors = np.zeros(4)
    c = np.ones((4, 2), np.float32)
    for _ in range(trials):
        _out, sizes, _ = km.split_empty_clusters(c, counts, rng)
        donors[np.flatnonzero(sizes[1:] != counts[1:]) + 1] += 1  # the donor's size was halved
    observed = donors / trials
    # 4000 draws: standard error < 0.008; allow 4 sigma.
    np.testing.assert_allclose(observed, expected, atol=0.032)


def test_lloyd_matches_faiss_kmeans_from_the_same_start() -> None:
    x = blobs(6000, 16, 30, seed=3)
    k, niter = 40, 12
    init = x[km.init_rows(len(x), k, seed=7)]
    ours = km.lloyd(x, k, niter, centroids=init)
    ref = faiss.Kmeans(x.shape[1], k, niter=niter, seed=7, max_points_per_centroid=10**7)
    ref.train(x, init_centroids=init.copy())
    assert len(ours.objective) == niter
    assert abs(ours.objective[-1] - ref.obj[-1]) <= 0.01 * ref.obj[-1]
    # Lloyd never increases the objective (the splits aside, which do not happen here).
    assert sum(ours.splits) == 0
    assert np.all(np.diff(ours.objective) <= 1e-6 * ours.objective[0])


def test_lloyd_within_one_percent_of_faiss_kmeans_from_their_own_starts() -> None:
    # Unstructured data has no basin that a lucky start could find: both land near the same optimum.
    x = np.random.default_rng(4).standard_normal((8000, 8)).astype(np.float32)
    k, niter = 32, 25
    ours = km.lloyd(x, k, niter, seed=11)
    ref = faiss.Kmeans(x.shape[1], k, niter=niter, seed=11, max_points_per_centroid=10**7)
    ref.train(x)
    assert abs(ours.objective[-1] - ref.obj[-1]) <= 0.01 * ref.obj[-1]


def test_spherical_lloyd_matches_faiss_spherical_kmeans() -> None:
    x = blobs(4000, 12, 20, seed=9)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    k, niter = 24, 10
    init = x[km.init_rows(len(x), k, seed=1)]
    ours = km.lloyd(x, k, niter, centroids=init, spherical=True)
    np.testing.assert_allclose(np.linalg.norm(ours.centroids, axis=1), 1, rtol=1e-5)
    # For unit rows, sum ||x - c||^2 = 2n - 2 sum x.c: faiss's objective (sum of inner products) maps onto ours.
    ref = faiss.Kmeans(x.shape[1], k, niter=niter, seed=1, spherical=True, max_points_per_centroid=10**7)
    ref.train(x, init_centroids=init.copy())
    assert abs(ours.objective[-1] - (2 * len(x) - 2 * ref.obj[-1])) <= 0.01 * ours.objective[-1]
    assert np.all(np.diff(ours.objective) <= 1e-6 * ours.objective[0])


def test_empty_clusters_are_split_and_none_remain() -> None:
    x = blobs(2000, 8, 6, seed=5)
    init = far_init(x, 6, 4)
    res = km.lloyd(x, 10, 10, centroids=init)
    assert res.splits[0] == 4  # the 4 far centroids get no rows in the first assignment
    assert np.bincount(res.labels, minlength=10).min() > 0


def test_subsampling_trains_on_k_times_max_points() -> None:
    x = blobs(3000, 8, 5, seed=6)
    res = km.lloyd(x, 10, 3, max_points_per_centroid=50, seed=2)
    assert res.n_train == 500 and len(res.labels) == 3000
    assert km.train_rows(400, 10, 0, 50) is None  # n <= k * max: no subsampling, as faiss


def test_plan_partitions_cover_every_row_once() -> None:
    files = [("a", 5), ("b", 0), ("c", 12), ("d", 3)]
    for parts in (1, 2, 3, 4, 7):
        plan = km.plan_partitions(files, parts)
        rows = [(p.uri, r) for part in plan for p in part for r in range(p.start, p.stop)]
        assert rows == [(u, r) for u, n in files for r in range(n)]
        sizes = [sum(p.stop - p.start for p in part) for part in plan]
        assert max(sizes) - min(sizes) <= 1


# --------------------------------------------------------------------------- Ray actors


@pytest.fixture(scope="module")
def feature_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[StageDir, np.ndarray, list[str]]:
    x = blobs(1200, 10, 12, seed=8)
    ids = [f"img/{i:05d}.jpg" for i in range(len(x))]
    return write_features(tmp_path_factory.mktemp("runs"), x, ids), x, ids


def _shards(files: list[tuple[str, int]], actors: int, sub: np.ndarray | None = None) -> list:
    parts = km.plan_partitions(files, actors)
    sizes = [sum(p.stop - p.start for p in part) for part in parts]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    train_local = [None if sub is None else sub[(sub >= bounds[i]) & (sub < bounds[i + 1])] - bounds[i]
                   for i in range(actors)]
    return cluster.start_shards(parts, train_local, cpus_per_actor=0.25)


@pytest.mark.parametrize("actors", [1, 2, 4])
def test_distributed_equals_reference(ray_session: None, feature_dir, actors: int) -> None:
    sd, x, ids = feature_dir
    k, niter = 16, 8
    init = far_init(x, 13, 3)  # the same start for 1, 2 and 4 actors; the far ones force splits
    ref = km.lloyd(x, k, niter, centroids=init, seed=9)
    group = _shards(feature_files(sd), actors)
    try:
        res = cluster.distributed_lloyd(group, k, niter, centroids=init, seed=9)
        table = cluster.assign_all(group, res.centroids)
    finally:
        cluster.stop_shards(group)
    assert res.splits == ref.splits and ref.splits[0] == 3
    np.testing.assert_allclose(res.objective, ref.objective, rtol=1e-9)
    np.testing.assert_allclose(res.centroids, ref.centroids, rtol=1e-6, atol=1e-6)
    assert table["image_id"].to_pylist() == ids
    assert np.array_equal(table["cluster"].to_numpy(), ref.labels)
    np.testing.assert_allclose(table["distance"].to_numpy(), ref.distances, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["random", "kmeans++"])
def test_distributed_init_and_subsample_equal_reference(ray_session: None, feature_dir, init: str) -> None:
    sd, x, _ = feature_dir
    k, niter, seed, mpc = 12, 4, 3, 60
    ref = km.lloyd(x, k, niter, seed=seed, init=init, max_points_per_centroid=mpc)
    sub = km.train_rows(len(x), k, seed, mpc)
    assert sub is not None and len(sub) == k * mpc
    group = _shards(feature_files(sd), 3, sub)
    try:
        res = cluster.distributed_lloyd(group, k, niter, seed=seed, init=init)
        table = cluster.assign_all(group, res.centroids)
    finally:
        cluster.stop_shards(group)
    assert res.n_train == ref.n_train == k * mpc
    np.testing.assert_allclose(res.objective, ref.objective, rtol=1e-9)
    assert np.array_equal(table["cluster"].to_numpy(), ref.labels)


def test_restarted_actor_reloads_its_partition(ray_session: None, feature_dir) -> None:
    import ray

    sd, x, _ = feature_dir
    k, niter = 10, 4
    init = x[:k].copy()
    ref = km.lloyd(x, k, niter, centroids=init)
    group = _shards(feature_files(sd), 2)
    killed = []

    def kill_second(it: int, *_: float) -> None:
        if it == 1:  # the next stats() call meets a dead actor: Ray restarts it and retries
            ray.kill(group[1], no_restart=False)
            killed.append(it)

    try:
        res = cluster.distributed_lloyd(group, k, niter, centroids=init, on_iter=kill_second)
    finally:
        cluster.stop_shards(group)
    assert killed == [1]
    np.testing.assert_allclose(res.objective, ref.objective, rtol=1e-9)


# --------------------------------------------------------------------------- stage


def test_run_writes_labels_plots_and_nmi(ray_session: None, sample_shards: str, run_root: str) -> None:
    images = load_table(sample_shards, split="train", columns=["image_id", "label"])
    ids = images["image_id"].to_pylist()
    y = images["label"].to_numpy()
    rng = np.random.default_rng(0)
    # Features that carry the class (a mean per class + noise): the clusters must find it.
    x = (np.eye(10, 16)[y] * 6 + rng.standard_normal((len(ids), 16))).astype(np.float32)
    features = write_features(Path(run_root), x, ids, n_files=2)
    cfg = replace(Config(root=run_root), ["cluster.k=10", "cluster.niter=10", "cluster.num_actors=2",
                                          "cluster.seed=5", "compute.device=cpu", "cluster.gallery_clusters=4",
                                          "cluster.gallery_images=4"])
    sd = cluster.run(cfg, features, images=sample_shards)
    assert sd.done()
    labels = pq.read_table(sd.path("labels.parquet"))
    k = schema.check_labels(labels, images["image_id"])  # every image once, ids in 0..k-1
    assert k == 10 and labels.num_rows == len(ids)
    meta = schema.read_metadata(labels.schema)
    assert meta["seed"] == 5 and meta["features"] == features.name
    centroids = np.load(sd.path("centroids.npy"))
    assert centroids.shape == (10, 16)
    # The labels are the nearest centroids' (what faiss says for the saved centroids).
    order = {i: n for n, i in enumerate(ids)}
    xl = x[[order[i] for i in labels["image_id"].to_pylist()]]
    assert np.array_equal(labels["cluster"].to_numpy(), km.assign(centroids, xl)[0])
    manifest = sd.manifest()
    summary = manifest["metrics"]["summary"]
    from sklearn.metrics import normalized_mutual_info_score

    truth = dict(zip(ids, y))
    nmi = normalized_mutual_info_score([truth[i] for i in labels["image_id"].to_pylist()],
                                       labels["cluster"].to_numpy())
    assert summary["nmi"] == pytest.approx(nmi) and nmi > 0.8
    assert summary["empty_clusters_final"] == 0
    assert len(manifest["metrics"]["history"]) == 10
    stats = json.loads(Path(sd.path("stats.json")).read_text())
    assert sum(stats["size_histogram"]["counts"]) == 10 and sum(stats["sizes"]) == len(ids)
    for name in ("gallery.png", "objective.png", "sizes.png"):
        assert Path(sd.path(name)).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cluster.run(cfg, features, images=sample_shards) == sd  # done: returned without work
