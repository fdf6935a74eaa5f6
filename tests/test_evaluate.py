"""Evaluation math (no Ray): pooling, linear probe, kNN, few-shot episodes, NMI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ktray.algos.probes import (
    SoftmaxRegression,
    bootstrap_interval,
    fewshot_accuracy,
    fewshot_episodes,
    knn_accuracy,
    knn_predict,
    linear_probe,
    nmi,
    paired_interval,
    pool_grid,
    pool_to_max_dim,
)
from ktray.config import load_config
from ktray.data.decode import decode_batch
from ktray.data.shards import load_table
from ktray.models.trunks import build_random_trunk
from ktray.stages import evaluate, real_labels
from ktray.stages.evaluate import TapExtractor, extract_features


def blobs(n_per_class: int, classes: int, dim: int, sep: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs whose class means are ``sep`` apart per axis: separable by construction."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((classes, dim)).astype(np.float32) * sep
    y = np.repeat(np.arange(classes), n_per_class)
    x = means[y] + rng.standard_normal((len(y), dim)).astype(np.float32)
    return x, y


# ----------------------------------------------------------------------------- pooling


@pytest.mark.parametrize(
    ("c", "h", "max_dim", "grid"),
    [
        (96, 55, 9216, 9),  # AlexNet conv1: 96 * 81 = 7776 <= 9216 < 96 * 100
        (256, 27, 9216, 6),  # conv2: 256 * 36 = 9216 exactly
        (384, 13, 9216, 4),  # conv3/conv4: 384 * 16 = 6144 < 9216 < 384 * 25
        (8, 3, 9216, 3),  # never larger than the layer itself
        (20000, 7, 9216, 1),  # wider than the budget: global pooling, whole channels kept
    ],
)
def test_pool_grid_is_the_largest_square_under_the_budget(c: int, h: int, max_dim: int, grid: int) -> None:
    assert pool_grid(c, h, h, max_dim) == grid
    g = pool_grid(c, h, h, max_dim)
    if 1 < g < h:
        assert c * g * g <= max_dim < c * (g + 1) ** 2


def test_pool_to_max_dim_max_pools_each_cell() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 6, 6)).astype(np.float32)
    out = pool_to_max_dim(x, max_dim=4 * 9)  # grid 3: cells of 2x2
    assert out.shape == (3, 36)
    manual = x.reshape(3, 4, 3, 2, 3, 2).max(axis=(3, 5)).reshape(3, 36)
    np.testing.assert_allclose(out, manual)
    avg = pool_to_max_dim(x, max_dim=4 * 9, mode="avg")
    np.testing.assert_allclose(avg, x.reshape(3, 4, 3, 2, 3, 2).mean(axis=(3, 5)).reshape(3, 36), atol=1e-6)


# ----------------------------------------------------------------------------- linear probe


def test_linear_probe_separates_separable_features() -> None:
    x, y = blobs(60, classes=10, dim=64, sep=3.0, seed=1)
    vx, vy = blobs(30, classes=10, dim=64, sep=3.0, seed=1)  # same means (same seed), fresh noise below
    vx = vx + np.random.default_rng(2).standard_normal(vx.shape).astype(np.float32) * 0.1
    out = linear_probe(x, y, vx, vy, seed=0)
    assert out["top1"] >= 0.98
    assert out["C"] in (1e-4, 1e-3, 1e-2, 1e-1)
    assert set(out["search"]) == {"0.0001", "0.001", "0.01", "0.1"}


def test_linear_probe_on_random_features_stays_near_chance() -> None:
    rng = np.random.default_rng(3)
    classes, n_val = 10, 600
    x = rng.standard_normal((800, 128)).astype(np.float32)
    y = rng.integers(0, classes, 800)
    vx = rng.standard_normal((n_val, 128)).astype(np.float32)
    vy = rng.integers(0, classes, n_val)
    out = linear_probe(x, y, vx, vy, seed=0)
    chance = 1 / classes
    # Val labels are independent of everything fitted: top1 ~ Binomial(n_val, 0.1) / n_val; 5 sigma.
    assert abs(out["top1"] - chance) < 5 * math.sqrt(chance * (1 - chance) / n_val)


def test_linear_probe_chooses_c_on_train_not_val() -> None:
    """Val labels never reach the fit: scrambling them leaves C and the model unchanged."""
    x, y = blobs(40, classes=5, dim=32, sep=0.6, seed=4)
    vx, vy = blobs(20, classes=5, dim=32, sep=0.6, seed=5)
    a = linear_probe(x, y, vx, vy, seed=0)
    b = linear_probe(x, y, vx, np.random.default_rng(0).permutation(vy), seed=0)
    assert a["C"] == b["C"] and a["search"] == b["search"] and a["train_top1"] == b["train_top1"]


def test_bootstrap_interval_brackets_the_accuracy_and_narrows_as_sqrt_n() -> None:
    rng = np.random.default_rng(0)
    small, large = rng.random(400) < 0.6, rng.random(6400) < 0.6
    lo_s, hi_s = bootstrap_interval(small, seed=1)
    lo_l, hi_l = bootstrap_interval(large, seed=1)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    # Binomial: 2 * 1.96 * sqrt(p (1 - p) / n); 16x the images, a quarter of the width.
    assert (hi_s - lo_s) == pytest.approx(2 * 1.96 * math.sqrt(0.24 / 400), rel=0.15)
    assert (hi_s - lo_s) / (hi_l - lo_l) == pytest.approx(4.0, rel=0.2)
    assert bootstrap_interval(small, seed=1) == (lo_s, hi_s)  # seeded: the same interval again
    assert bootstrap_interval(np.ones(50, bool)) == (1.0, 1.0)


def test_paired_interval_resolves_a_difference_that_side_by_side_intervals_do_not() -> None:
    rng = np.random.default_rng(0)
    b = rng.random(2000) < 0.5
    a = b.copy()
    a[np.flatnonzero(~b)[:60]] = True  # a = b plus 60 more images right: +3 points, on shared images
    d, lo, hi = paired_interval(a, b, seed=0)
    assert d == pytest.approx(0.03) and 0 < lo < d < hi
    a_lo, _ = bootstrap_interval(a, seed=0)
    _, b_hi = bootstrap_interval(b, seed=0)
    assert a_lo < b_hi  # the rows' own intervals overlap; the paired one excludes 0
    assert paired_interval(b, b) == (0.0, 0.0, 0.0)


# ----------------------------------------------------------------------------- kNN


def test_knn_on_blobs_is_perfect() -> None:
    x, y = blobs(50, classes=6, dim=32, sep=4.0, seed=6)
    tx, ty = blobs(10, classes=6, dim=32, sep=4.0, seed=6)
    assert knn_accuracy(x, y, tx, ty, k=20) == 1.0


def test_knn_votes_are_weighted_by_similarity() -> None:
    # One query at angle 0; a class-1 neighbour at cosine 1.0, two class-0 neighbours at cosine 0.8.
    # Vote(1) = e^(1/T), vote(0) = 2 e^(0.8/T): class 1 wins iff T < 0.2 / ln 2 = 0.2885.
    train = np.array([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]], dtype=np.float32)
    labels = np.array([1, 0, 0])
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    assert knn_predict(train, labels, q, k=3, temperature=0.07)[0] == 1
    assert knn_predict(train, labels, q, k=3, temperature=1.0)[0] == 0
    assert knn_predict(train, labels, q, k=1, temperature=1.0)[0] == 1  # only the nearest votes


# ----------------------------------------------------------------------------- few-shot


def test_fewshot_queries_never_in_support() -> None:
    labels = np.repeat(np.arange(12), 25)
    labels[:25] = 99  # a class with plenty of rows, kept
    labels[25:40] = -1  # unlabeled rows are never drawn
    support, query = fewshot_episodes(labels, ways=5, shots=5, queries=15, episodes=200, seed=0)
    assert support.shape == (200, 5, 5) and query.shape == (200, 5, 15)
    for s, q in zip(support, query, strict=True):
        assert not set(s.ravel()) & set(q.ravel())
        assert len(set(s.ravel())) == s.size and len(set(q.ravel())) == q.size
        classes = labels[s[:, 0]]
        assert len(set(classes)) == 5 and (labels[s] == classes[:, None]).all()
        assert (labels[q] == classes[:, None]).all()
    assert (labels[support] >= 0).all() and (labels[query] >= 0).all()


def test_fewshot_refuses_too_few_classes() -> None:
    labels = np.repeat(np.arange(4), 30)
    with pytest.raises(ValueError, match="5 classes"):
        fewshot_episodes(labels, ways=5, shots=5, queries=15, episodes=1)


def test_fewshot_accuracy_separable_and_random() -> None:
    x, y = blobs(30, classes=10, dim=32, sep=4.0, seed=7)
    s, q = fewshot_episodes(y, ways=5, shots=5, queries=15, episodes=100, seed=1)
    for metric in ("cosine", "euclidean"):
        out = fewshot_accuracy(x, s, q, metric=metric)  # type: ignore[arg-type]
        assert out["mean"] == 1.0 and out["ci95"] == 0.0 and out["episodes"] == 100
    noise = np.random.default_rng(8).standard_normal(x.shape).astype(np.float32)
    out = fewshot_accuracy(noise, s, q)
    # 100 episodes x 75 queries of chance 1/5; episodes share nothing with the features' labels.
    assert abs(out["mean"] - 0.2) < 5 * math.sqrt(0.2 * 0.8 / 7500) + 0.02
    assert 0 < out["ci95"] < 0.05


# ----------------------------------------------------------------------------- NMI


def test_nmi_is_one_for_a_relabeling_and_near_zero_for_independent_ids() -> None:
    rng = np.random.default_rng(9)
    real = rng.integers(0, 10, 2000)
    perm = rng.permutation(10)
    assert nmi(perm[real], real) == pytest.approx(1.0)
    assert nmi(rng.integers(0, 10, 2000), real) < 0.02
    masked = real.copy()
    masked[:100] = -1  # unlabeled rows are left out, not counted as a class
    assert nmi(perm[real], masked) == pytest.approx(1.0)


def test_softmax_regression_solves_scikit_learns_objective() -> None:
    """Same C, same problem: the torch L-BFGS fit and scikit-learn's agree (the meaning of C carries over)."""
    from sklearn.linear_model import LogisticRegression

    x, y = blobs(40, classes=4, dim=16, sep=0.8, seed=10)
    for c in (0.01, 1.0):
        ours = SoftmaxRegression(c, max_iter=500).fit(x, y)
        ref = LogisticRegression(C=c, max_iter=5000, tol=1e-10).fit(x, y)
        # Softmax weights are defined up to a per-feature shift across classes; compare centred ones.
        w = ours.weight.numpy().T
        np.testing.assert_allclose(w - w.mean(0), ref.coef_ - ref.coef_.mean(0), atol=2e-3)
        assert (ours.predict(x) == ref.predict(x)).mean() == 1.0


# ----------------------------------------------------------------------------- the stage (Ray Data)

FAST = [
    "compute.cpus_per_worker=1",
    "evaluate.image_size=64",
    "evaluate.taps=[conv2, conv5]",
    "evaluate.fewshot_episodes=100",
    "evaluate.probe_max_iter=100",
]


def test_random_trunk_is_seeded() -> None:
    a = build_random_trunk("random:alexnet:0.25", width=1.0, seed=3)
    b = build_random_trunk("random:alexnet", width=0.25, seed=3)
    c = build_random_trunk("random:alexnet:0.25", width=1.0, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert a.width == 0.25 and all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert not all(np.array_equal(sa[k], sc[k]) for k in sa if sa[k].dtype.is_floating_point)


@pytest.mark.slow
def test_extracted_features_belong_to_their_images(ray_session: None, sample_shards: str, run_root: str) -> None:
    """Ray's actor pool returns batches in any order: each row's features and label must stay its own."""
    cfg = load_config(None, [f"root={run_root}", *FAST, "evaluate.batch_size=16"])
    both = extract_features(cfg, "random:alexnet:0.25", sample_shards, ("train", "val"), ("conv2", "conv5"))
    feats = both["val"]  # one pass over both splits, then each row back in its own split
    train_ids = load_table(sample_shards, "train")["image_id"].to_pylist()
    assert sorted(both["train"].image_ids.tolist()) == sorted(train_ids)
    table = load_table(sample_shards, "val")
    assert sorted(feats.image_ids.tolist()) == feats.image_ids.tolist() == sorted(table["image_id"].to_pylist())
    truth = dict(zip(table["image_id"].to_pylist(), table["label"].to_pylist(), strict=True))
    assert [truth[i] for i in feats.image_ids] == feats.labels.tolist()
    # Recompute a few rows directly, without Ray, and compare.
    rows = table.take([0, 57, 299])
    direct = TapExtractor("random:alexnet:0.25", ("conv2", "conv5"), cfg.evaluate.max_dim, seed=cfg.seed)(
        decode_batch(
            {"image_id": np.asarray(rows["image_id"].to_pylist(), dtype=object),
             "image": rows["image"].to_pylist(), "label": rows["label"].to_numpy()},
            cfg.evaluate.image_size,
        )
    )
    pos = np.searchsorted(feats.image_ids, direct["image_id"].astype(str))
    for tap in ("conv2", "conv5"):
        np.testing.assert_allclose(feats.taps[tap][pos], direct[tap], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_evaluate_stage_on_the_sample(ray_session: None, sample_shards: str, run_root: str) -> None:
    import json

    cfg = load_config(None, [f"root={run_root}", *FAST])
    labels = real_labels.run(cfg)  # "clusters" = the real classes: their NMI is exactly 1
    sd = evaluate.run(cfg, "random:alexnet:0.25", labels=labels, name="Random")
    assert sd.done()
    res = json.loads(Path(sd.path("results.json")).read_text())
    assert res["classes"] == 10 and res["n_train"] == 1000 and res["n_val"] == 300
    assert set(res["taps"]) == {"conv2", "conv5"} and res["best_tap"] in res["taps"]
    chance, sigma = 0.1, math.sqrt(0.1 * 0.9 / 300)
    for tap in res["taps"].values():
        assert 0 <= tap["top1"] <= 1 and tap["C"] in cfg.evaluate.probe_c
        assert tap["ci95"][0] <= tap["top1"] <= tap["ci95"][1]  # the bootstrap interval brackets the figure
    assert res["knn_ci95"][0] <= res["knn_top1"] <= res["knn_ci95"][1]
    with np.load(sd.path("predictions.npz")) as z:  # which val images each tap got right, in image_id order
        assert len(z["image_id"]) == 300 and list(z["image_id"]) == sorted(z["image_id"])
        assert z["conv2"].mean() == pytest.approx(res["taps"]["conv2"]["top1"])
    # Random conv features are far from useless (the paper's random row: 12-16% on 1000 classes).
    assert max(t["top1"] for t in res["taps"].values()) > chance + 5 * sigma
    assert 0 <= res["knn_top1"] <= 1
    assert res["fewshot"]["episodes"] == 100 and 0 < res["fewshot"]["ci95"] < 0.1
    assert res["nmi"] == pytest.approx(1.0) and res["nmi_images"] == 1000
    md = Path(sd.path("results.md")).read_text()
    assert md.startswith("| method | conv2 | conv5 | kNN | few-shot | NMI |") and "| Random |" in md
    assert Path(sd.path("results.csv")).read_text().splitlines()[0].startswith("name,conv2,conv2_lo,conv2_hi,conv5")
    summary = sd.manifest()["metrics"]["summary"]
    assert summary["top1_conv2"] == res["taps"]["conv2"]["top1"] and summary["nmi"] == pytest.approx(1.0)
    assert evaluate.run(cfg, "random:alexnet:0.25", labels=labels, name="Random") == sd  # done: skipped
