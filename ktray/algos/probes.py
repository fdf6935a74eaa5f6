"""Measures of a frozen trunk's features: linear probes, kNN, few-shot prototypes, NMI.

The paper (Noroozi et al. 2018, Sec. 5 and Table 4) measures what a trunk learned by fitting a
linear classifier on each conv layer's activations, pooled spatially until the layer has at
most ~9k dimensions. Later self-supervised work adds a weighted kNN classifier (solo-learn),
prototype few-shot classification ("How Well Do Self-Supervised Models Transfer?", Ericsson et
al. 2021) and the NMI of pseudo-labels against real labels (DeepCluster). Plain numpy / torch /
scikit-learn on arrays: no Ray, no files.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np


def pool_grid(channels: int, height: int, width: int, max_dim: int) -> int:
    """Side ``g`` of the largest square grid with ``channels * g * g <= max_dim``.

    Table 4 of the paper "resizes the layer's output spatially until it has fewer than 9k
    dimensions"; the grid never grows beyond the layer's own size, and is at least 1 (a
    layer wider than ``max_dim`` channels is then kept whole, globally pooled).
    """
    g = math.isqrt(max(max_dim // max(channels, 1), 1))
    return max(1, min(g, height, width))


def pool_to_max_dim(activation: Any, max_dim: int, mode: Literal["max", "avg"] = "max") -> np.ndarray:
    """Adaptive-pool ``(N, C, H, W)`` activations to a ``g x g`` grid and flatten to ``(N, C*g*g)``.

    ``activation`` is a numpy array or a torch tensor; the result is float32 numpy.
    """
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(activation)
    if x.ndim == 2:  # already flat (a fully connected tap)
        return x.float().cpu().numpy()
    if x.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) activations, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    g = pool_grid(c, h, w, max_dim)
    pool = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d
    return pool(x.float(), g).reshape(n, c * g * g).cpu().numpy()  # (N, C*g*g)


def zscore(train_x: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Zero mean, unit variance per dimension, statistics from ``train_x`` only."""
    mean = train_x.mean(axis=0, dtype=np.float64).astype(np.float32)
    std = train_x.std(axis=0, dtype=np.float64).astype(np.float32)
    std[std < 1e-6] = 1.0  # dead units (ReLU zeros) stay zero instead of dividing by 0
    return [((x - mean) / std).astype(np.float32) for x in (train_x, *others)]


class SoftmaxRegression:
    """Multinomial logistic regression fitted by full-batch L-BFGS in float32 (torch).

    The objective is scikit-learn's ``LogisticRegression(C)``, divided by ``C * n``: mean
    cross-entropy + ``||W||^2 / (2 C n)``, intercept unpenalised, so ``C`` means the same.
    Torch because scikit-learn's float64 L-BFGS took ~25 s per fit on 9k-dim taps on CI's
    2 cores; ``fit(init=...)`` warm-starts along the C grid, as a regularisation path does.
    """

    def __init__(self, c: float, max_iter: int = 200) -> None:
        self.c, self.max_iter = c, max_iter
        self.classes: np.ndarray | None = None
        self.weight: Any = None  # (D, K)
        self.bias: Any = None  # (K,)

    def fit(self, x: np.ndarray, y: np.ndarray, init: SoftmaxRegression | None = None) -> SoftmaxRegression:
        import torch
        import torch.nn.functional as F

        self.classes, target = np.unique(y, return_inverse=True)
        xt = torch.as_tensor(x, dtype=torch.float32)  # (N, D)
        yt = torch.as_tensor(target, dtype=torch.int64)  # (N,)
        k = len(self.classes)
        same = init is not None and init.classes is not None and np.array_equal(init.classes, self.classes)
        w = init.weight.clone() if same else torch.zeros(x.shape[1], k)  # type: ignore[union-attr]
        b = init.bias.clone() if same else torch.zeros(k)  # type: ignore[union-attr]
        w.requires_grad_(True)
        b.requires_grad_(True)
        lam = 1.0 / (self.c * len(yt))
        opt = torch.optim.LBFGS(
            [w, b], lr=1.0, max_iter=self.max_iter, history_size=20, line_search_fn="strong_wolfe",
            tolerance_grad=1e-5, tolerance_change=1e-9,
        )

        def closure() -> Any:
            opt.zero_grad()
            loss = F.cross_entropy(xt @ w + b, yt) + 0.5 * lam * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.weight, self.bias = w.detach(), b.detach()
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        import torch

        assert self.classes is not None, "fit first"
        scores = torch.as_tensor(x, dtype=torch.float32) @ self.weight + self.bias  # (N, K)
        return self.classes[scores.argmax(dim=1).numpy()]


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    *,
    c_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1),
    holdout: float = 0.2,
    max_iter: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Multinomial logistic regression on frozen features; top-1 on ``val``.

    The protocol of Ericsson et al. (2021): standardise, fit L-BFGS softmax regression,
    choose the inverse regularisation ``C`` on a held-out part of *train* (never on val),
    refit on all of train with that ``C``, report top-1 on val. The grid is short on
    purpose (CPU budget); the reference sweeps 45 values of ``logspace(-6, 5)``.
    """
    from sklearn.model_selection import train_test_split

    train_x = np.asarray(train_x, dtype=np.float32)
    val_x = np.asarray(val_x, dtype=np.float32)
    train_y = np.asarray(train_y)
    val_y = np.asarray(val_y)
    if len(np.unique(train_y)) < 2:
        raise ValueError("linear_probe: train labels hold fewer than two classes")

    grid = sorted(c_grid)
    search: dict[str, float] = {}
    if len(grid) > 1:
        _, counts = np.unique(train_y, return_counts=True)
        stratify = train_y if counts.min() >= 2 else None
        fit_idx, hold_idx = train_test_split(
            np.arange(len(train_y)), test_size=holdout, random_state=seed, stratify=stratify
        )
        fx, hx = zscore(train_x[fit_idx], train_x[hold_idx])
        prev: SoftmaxRegression | None = None
        for c in grid:  # strongest regularisation first; each fit starts from the previous one
            prev = SoftmaxRegression(c, max_iter).fit(fx, train_y[fit_idx], init=prev)
            search[f"{c:g}"] = float((prev.predict(hx) == train_y[hold_idx]).mean())
        # Ties go to the stronger regularisation (smaller C): the first maximum in the ascending grid.
        best_c = float(grid[int(np.argmax([search[f"{c:g}"] for c in grid]))])
    else:
        best_c = float(grid[0])

    tx, vx = zscore(train_x, val_x)
    clf = SoftmaxRegression(best_c, max_iter).fit(tx, train_y)
    correct = clf.predict(vx) == val_y
    return {
        "top1": float(correct.mean()),
        "correct": correct,  # per val image, for bootstrap intervals and paired comparisons
        "train_top1": float((clf.predict(tx) == train_y).mean()),
        "C": best_c,
        "search": search,
        "dim": int(train_x.shape[1]),
        "n_train": len(train_y),
        "n_val": len(val_y),
    }


def _l2n(x: Any) -> Any:
    import torch

    return torch.nn.functional.normalize(torch.as_tensor(np.asarray(x, dtype=np.float32)), dim=1)


def knn_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> np.ndarray:
    """Weighted kNN on cosine similarity, solo-learn's rule: votes ``exp(sim / T)`` over the top ``k``."""
    import torch

    train = _l2n(train_x)  # (Ntr, D)
    ty = torch.as_tensor(np.asarray(train_y, dtype=np.int64))
    classes = int(ty.max()) + 1
    k = min(k, len(train))
    preds = []
    for start in range(0, len(test_x), chunk):
        q = _l2n(test_x[start : start + chunk])  # (B, D)
        sim, idx = (q @ train.T).topk(k, dim=1)  # (B, k)
        votes = torch.zeros(len(q), classes).scatter_add_(1, ty[idx], (sim / temperature).exp())  # (B, classes)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)


def bootstrap_interval(correct: np.ndarray, *, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of an accuracy over its evaluation images.

    ``correct`` is one boolean per image; the images are drawn with replacement ``resamples``
    times (Efron's percentile interval, 2.5th and 97.5th percentiles of the resampled means). It
    measures how much the figure depends on which images were evaluated, not on training noise
    (seeds measure that).
    """
    return _percentile_interval(np.asarray(correct, dtype=np.float64), resamples, seed)


def _percentile_interval(values: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """2.5th and 97.5th percentiles of the means of ``values`` resampled with replacement."""
    if values.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def paired_interval(
    a: np.ndarray, b: np.ndarray, *, resamples: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """Accuracy of ``a`` minus that of ``b`` on the same images, with its 95% paired-bootstrap interval.

    ``a`` and ``b`` say, image by image, whether two trunks got each image right; resampling
    the images (not each row on its own) keeps what the two share, so the interval of the
    difference is narrower than the two rows' intervals side by side suggest.
    """
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    lo, hi = _percentile_interval(diff, resamples, seed)
    return (float(diff.mean()) if diff.size else math.nan), lo, hi


def knn_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 of :func:`knn_predict` on ``test``."""
    pred = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature)
    return float((pred == np.asarray(test_y)).mean())


def fewshot_episodes(
    labels: np.ndarray, ways: int, shots: int, queries: int, episodes: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Sample N-way K-shot episodes: ``support (E, ways, shots)`` and ``query (E, ways, queries)`` row indices.

    Per episode, ``ways`` classes are drawn among those with at least ``shots + queries``
    rows, then ``shots + queries`` distinct rows per class, split into support and query:
    a query row can never be a support row of its episode.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    by_class = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels[labels >= 0])}
    eligible = np.array(sorted(c for c, rows in by_class.items() if len(rows) >= shots + queries))
    if len(eligible) < ways:
        raise ValueError(
            f"few-shot: {ways}-way {shots}-shot with {queries} queries needs {ways} classes with at least "
            f"{shots + queries} images; only {len(eligible)} have enough"
        )
    support = np.empty((episodes, ways, shots), dtype=np.int64)
    query = np.empty((episodes, ways, queries), dtype=np.int64)
    for e in range(episodes):
        for w, c in enumerate(rng.choice(eligible, size=ways, replace=False)):
            rows = rng.choice(by_class[int(c)], size=shots + queries, replace=False)
            support[e, w], query[e, w] = rows[:shots], rows[shots:]
    return support, query


def fewshot_accuracy(
    features: np.ndarray,
    support: np.ndarray,
    query: np.ndarray,
    metric: Literal["cosine", "euclidean"] = "cosine",
) -> dict[str, float]:
    """Prototype classification per episode; mean accuracy and its 95% interval (1.96 std / sqrt(E)).

    Prototype = the mean support feature of a class (Snell et al. 2017); a query takes the
    class of its nearest prototype. With ``cosine`` features are L2-normalised first.
    """
    import torch

    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
    s = x[torch.as_tensor(support)]  # (E, W, S, D)
    q = x[torch.as_tensor(query)]  # (E, W, Q, D)
    protos = s.mean(dim=2)  # (E, W, D)
    e, w, nq, d = q.shape
    qf = q.reshape(e, w * nq, d)  # (E, W*Q, D)
    if metric == "cosine":
        score = qf @ torch.nn.functional.normalize(protos, dim=2).transpose(1, 2)  # (E, W*Q, W)
    else:
        score = -torch.cdist(qf, protos)  # (E, W*Q, W)
    truth = torch.arange(w).repeat_interleave(nq)  # (W*Q,)
    acc = (score.argmax(dim=2) == truth).float().mean(dim=1).numpy()  # (E,)
    return {
        "mean": float(acc.mean()),
        "ci95": float(1.96 * acc.std() / math.sqrt(len(acc))),
        "episodes": len(acc),
    }


def nmi(pseudo: np.ndarray, real: np.ndarray) -> float:
    """Normalised mutual information of cluster ids against real labels (rows with a real label only)."""
    from sklearn.metrics import normalized_mutual_info_score

    pseudo, real = np.asarray(pseudo), np.asarray(real)
    keep = real >= 0
    return float(normalized_mutual_info_score(real[keep], pseudo[keep]))
