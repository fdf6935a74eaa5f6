"""Evaluate a frozen trunk: linear probes per tap, kNN, few-shot prototypes, NMI.

The paper (Noroozi et al. 2018, Sec. 5 and Table 4) measures what a trunk learned by
freezing it and fitting a linear classifier on each conv layer's activations, pooled
spatially until the layer has at most ~9k dimensions. We add the measures of later
self-supervised work: a weighted kNN classifier (solo-learn), prototype few-shot
classification ("How Well Do Self-Supervised Models Transfer?", Ericsson et al. 2021)
and the NMI of the pseudo-labels against the real labels (DeepCluster).

The math here is plain numpy / torch / scikit-learn that a unit test can call without
Ray; Ray sits at the edge (:func:`extract_features`, :func:`run`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from ktray.config import Config
    from ktray.rundir import StageDir

# --------------------------------------------------------------------------- pooling


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


# --------------------------------------------------------------------------- linear probe


def _standardise(train_x: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
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
        fx, hx = _standardise(train_x[fit_idx], train_x[hold_idx])
        prev: SoftmaxRegression | None = None
        for c in grid:  # strongest regularisation first; each fit starts from the previous one
            prev = SoftmaxRegression(c, max_iter).fit(fx, train_y[fit_idx], init=prev)
            search[f"{c:g}"] = float((prev.predict(hx) == train_y[hold_idx]).mean())
        # Ties go to the stronger regularisation (smaller C): the first maximum in the ascending grid.
        best_c = float(grid[int(np.argmax([search[f"{c:g}"] for c in grid]))])
    else:
        best_c = float(grid[0])

    tx, vx = _standardise(train_x, val_x)
    clf = SoftmaxRegression(best_c, max_iter).fit(tx, train_y)
    return {
        "top1": float((clf.predict(vx) == val_y).mean()),
        "train_top1": float((clf.predict(tx) == train_y).mean()),
        "C": best_c,
        "search": search,
        "dim": int(train_x.shape[1]),
        "n_train": len(train_y),
        "n_val": len(val_y),
    }


# --------------------------------------------------------------------------- kNN


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


# --------------------------------------------------------------------------- few-shot


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


# --------------------------------------------------------------------------- NMI


def nmi(pseudo: np.ndarray, real: np.ndarray) -> float:
    """Normalised mutual information of cluster ids against real labels (rows with a real label only)."""
    from sklearn.metrics import normalized_mutual_info_score

    pseudo, real = np.asarray(pseudo), np.asarray(real)
    keep = real >= 0
    return float(normalized_mutual_info_score(real[keep], pseudo[keep]))


# --------------------------------------------------------------------------- trunks

RANDOM_PREFIX = "random:"


def build_random_trunk(spec: str, width: float, seed: int) -> Any:
    """``random:<arch>[:<width>]``: a randomly initialised trunk (the paper's "random" floor), seeded.

    The same seed gives the same weights in every extraction actor and in every run.
    """
    import torch

    from ktray.models import build_trunk

    parts = spec[len(RANDOM_PREFIX) :].split(":")
    arch = parts[0]
    if len(parts) > 1:
        width = float(parts[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_trunk(arch, width).eval()


def load_any_trunk(trunk: Any, width: float = 1.0, seed: int = 0) -> Any:
    """A frozen trunk (eval mode, no gradients) from a weights URI, a ``random:`` spec or a module."""
    from ktray.models import load_trunk

    if isinstance(trunk, str):
        module = build_random_trunk(trunk, width, seed) if trunk.startswith(RANDOM_PREFIX) else load_trunk(trunk)
    else:
        module = trunk
    module = module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def trunk_key(trunk: str, width: float, seed: int) -> str:
    """Identity of a trunk for the run directory: the content hash of its weights file."""
    import hashlib

    from ktray.rundir import config_hash, read_bytes

    if trunk.startswith(RANDOM_PREFIX):
        return "trunk-" + config_hash(trunk, width, seed)
    return "trunk-" + hashlib.sha256(read_bytes(trunk)).hexdigest()[:10]


# --------------------------------------------------------------------------- Ray edge


class TapExtractor:
    """Ray Data callable class: the frozen trunk loaded once per actor; pooled taps per image.

    Input batches come from ``ktray.data.decode_batch`` (``image_id``, ``pixels`` (B, S, S, 3)
    uint8, ``label``); the output has ``image_id``, ``label`` and one ``(B, D_tap)`` float32
    column per tap, each pooled to at most ``max_dim`` dimensions (paper Table 4).
    """

    def __init__(
        self,
        trunk: Any,
        taps: tuple[str, ...],
        max_dim: int,
        *,
        pool: Literal["max", "avg"] = "max",
        width: float = 1.0,
        seed: int = 0,
        device: str = "cpu",
        amp: bool = False,
        threads: float = 0,
    ) -> None:
        import torch

        if threads > 0 and device == "cpu":
            torch.set_num_threads(max(1, round(threads)))  # a fractional CPU share still runs one thread
        self.trunk = load_any_trunk(trunk, width, seed).to(device)
        if device == "cuda":
            self.trunk = self.trunk.to(memory_format=torch.channels_last)
        self.taps, self.max_dim, self.pool = tuple(taps), max_dim, pool
        self.device, self.amp = device, amp

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from ktray.embed import standardise

        x = standardise(batch["pixels"], self.device)  # (B, 3, S, S), as the teacher and student saw images
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with (
            torch.inference_mode(),
            torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.amp and x.is_cuda),
        ):
            acts = self.trunk.taps(x, list(self.taps))  # {tap: (B, C, h, w)}
            out = {tap: pool_to_max_dim(acts[tap].float(), self.max_dim, self.pool) for tap in self.taps}
        return {"image_id": batch["image_id"], "label": batch["label"], **out}


@dataclass
class Features:
    """Pooled taps of one split, rows sorted by ``image_id`` (actor pools return batches in any order)."""

    image_ids: np.ndarray  # (N,) str
    labels: np.ndarray  # (N,) int64, -1 for unlabeled
    taps: dict[str, np.ndarray]  # tap -> (N, D_tap) float32


def extract_features(
    cfg: Config,
    trunk: Any,
    data_path: str,
    split: str | None,
    taps: tuple[str, ...] | None = None,
) -> Features:
    """Run every image of ``split`` through the frozen ``trunk``; pooled taps on the driver.

    ``trunk`` is a weights URI, ``random:<arch>[:<width>]`` or an ``nn.Module``. Streaming
    Ray Data as in embed: decode, then the trunk on a fixed-size actor pool with one GPU per
    actor where the cluster has GPUs (Ray Data fuses the decode into the actors on CPU).
    """
    from ray.data import ActorPoolStrategy

    from ktray.data import decode_batch, read_images
    from ktray.embed import actor_cpus
    from ktray.kmeans import resolve_device

    e = cfg.evaluate
    taps = tuple(taps or e.taps)
    device = resolve_device(cfg.compute.device)
    gpu = device == "cuda"
    cpus = 1 if gpu else actor_cpus(cfg.compute.cpus_per_worker, e.num_actors)
    ds = read_images(data_path, split, cfg.data.limit, block_rows=cfg.data.decode_batch_size)
    decoded = ds.map_batches(
        decode_batch,
        fn_kwargs={"size": e.image_size, "mode": "center", "stage": "evaluate"},
        batch_size=cfg.data.decode_batch_size,
        batch_format="numpy",
    )
    pooled = decoded.map_batches(
        TapExtractor,
        fn_constructor_args=(trunk, taps, e.max_dim),
        fn_constructor_kwargs={
            "pool": e.pool,
            "width": cfg.transfer.width,
            "seed": cfg.seed,
            "device": device,
            "amp": cfg.compute.amp and gpu,
            "threads": cpus,
        },
        batch_size=e.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=e.num_actors),  # fixed size: GPU pools do not autoscale well
        num_gpus=1 if gpu else 0,
        num_cpus=cpus,
    )
    ids: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    cols: dict[str, list[np.ndarray]] = {t: [] for t in taps}
    for b in pooled.iter_batches(batch_format="numpy", batch_size=None):
        ids.append(np.asarray(b["image_id"]).astype(str))
        labels.append(np.asarray(b["label"], dtype=np.int64))
        for t in taps:
            cols[t].append(np.asarray(b[t], dtype=np.float32))
    if not ids:
        raise ValueError(f"{data_path}: no decodable images in split {split!r}")
    all_ids = np.concatenate(ids)
    order = np.argsort(all_ids, kind="stable")
    return Features(
        image_ids=all_ids[order],
        labels=np.concatenate(labels)[order],
        taps={t: np.concatenate(cols[t])[order] for t in taps},
    )


# --------------------------------------------------------------------------- stage

RESULTS = "results"  # results.json, results.csv, results.md


def eval_data_path(cfg: Config) -> str:
    """The labeled shards the trunk is measured on: ``evaluate.data``, else the pipeline's data."""
    from ktray.data import data_path

    return cfg.evaluate.data or data_path(cfg.data)


def stage_config(cfg: Config, name: str) -> dict[str, Any]:
    """What the evaluation depends on (the folder hash); compute settings are left out."""
    # compare_rows only picks which rows `ktray compare` shows; it changes no evaluation. It is hashed
    # as its default, so asking for other rows reuses every evaluation already done (folder names
    # from before this rule stay valid).
    from ktray.config import EvaluateConfig

    e = {**cfg.evaluate.to_dict(), "compare_rows": list(EvaluateConfig().compare_rows)}
    return {
        "evaluate": e,
        "train_split": cfg.data.train_split,
        "val_split": cfg.data.val_split,
        "limit": cfg.data.limit,
        "seed": cfg.seed,
        "name": name,
    }


def _inputs(cfg: Config, trunk: str, labels: StageDir | None) -> list[StageDir | str]:
    from ktray.data import limited_data_key

    # The data with the rule a limited run picks its rows by (data.limited_rows).
    data = limited_data_key(eval_data_path(cfg), cfg.data.limit)
    inputs: list[StageDir | str] = [trunk_key(trunk, cfg.transfer.width, cfg.seed), data]
    return [*inputs, labels] if labels is not None else inputs


def output_dir(cfg: Config, trunk: str, labels: StageDir | None = None, name: str = "student") -> StageDir:
    """Where :func:`run` writes for this trunk, these labels and this config."""
    from ktray.rundir import stage_dir

    return stage_dir(cfg.root, "evaluate", stage_config(cfg, name), _inputs(cfg, trunk, labels))


def cluster_nmi(cfg: Config, labels: StageDir) -> dict[str, float]:
    """NMI of the cluster stage's pseudo-labels against the real labels of the same images.

    The pseudo-labels belong to the pipeline's data (``data.path``), not to the set the
    trunk is measured on; images are matched by ``image_id``, unlabeled ones left out.
    """
    import pyarrow.compute as pc

    from ktray.data import data_path, load_table
    from ktray.transfer import read_labels

    pseudo, _ = read_labels(labels)
    real = load_table(data_path(cfg.data), None, ["image_id", "label"])
    real = real.filter(pc.is_valid(real["label"]))
    joined = pseudo.join(real, "image_id", join_type="inner")
    if joined.num_rows == 0:
        return {"nmi": math.nan, "nmi_images": 0.0}
    return {
        "nmi": nmi(joined["cluster"].to_numpy(), joined["label"].to_numpy()),
        "nmi_images": float(joined.num_rows),
    }


def evaluate_features(cfg: Config, train: Features, val: Features) -> dict[str, Any]:
    """All the measures on extracted features: linear probe per tap, then kNN and few-shot on the best tap."""
    e = cfg.evaluate
    tr = train.labels >= 0
    va = val.labels >= 0
    ytr, yva = train.labels[tr], val.labels[va]
    classes = int(max(ytr.max(initial=-1), yva.max(initial=-1)) + 1)
    out: dict[str, Any] = {"taps": {}, "n_train": int(tr.sum()), "n_val": int(va.sum()), "classes": classes,
                           "chance": 1.0 / max(classes, 1)}
    for tap, xtr in train.taps.items():
        t0 = time.time()
        res = linear_probe(
            xtr[tr], ytr, val.taps[tap][va], yva, c_grid=e.probe_c, max_iter=e.probe_max_iter, seed=cfg.seed
        )
        res["seconds"] = time.time() - t0
        out["taps"][tap] = res
        print(f"evaluate: {tap} ({res['dim']} dims) linear top-1 {res['top1']:.4f} (C={res['C']:g}, "
              f"{res['seconds']:.1f} s)", flush=True)
    best = max(out["taps"], key=lambda t: out["taps"][t]["top1"])
    out["best_tap"] = best
    out["knn_top1"] = knn_accuracy(
        train.taps[best][tr], ytr, val.taps[best][va], yva, k=e.knn_k, temperature=e.knn_temperature
    )
    try:
        support, query = fewshot_episodes(
            yva, e.fewshot_ways, e.fewshot_shots, e.fewshot_queries, e.fewshot_episodes, seed=cfg.seed
        )
        out["fewshot"] = {
            **fewshot_accuracy(val.taps[best][va], support, query, metric=e.fewshot_metric),
            "ways": e.fewshot_ways,
            "shots": e.fewshot_shots,
        }
    except ValueError as exc:  # too few classes or images in the val split for the episode shape
        out["fewshot"] = {"mean": math.nan, "ci95": math.nan, "episodes": 0, "note": str(exc)}
    print(f"evaluate: best tap {best}; kNN top-1 {out['knn_top1']:.4f}; {e.fewshot_ways}-way "
          f"{e.fewshot_shots}-shot {out['fewshot']['mean']:.4f} +- {out['fewshot']['ci95']:.4f}", flush=True)
    return out


def result_row(results: dict[str, Any], taps: tuple[str, ...]) -> dict[str, Any]:
    """One table row (name, top-1 per tap, kNN, few-shot, NMI) of a ``results.json``."""
    row: dict[str, Any] = {"name": results["name"]}
    for t in taps:
        row[t] = results["taps"][t]["top1"] if t in results["taps"] else math.nan
    row["knn"] = results["knn_top1"]
    row["knn_tap"] = results["best_tap"]
    row["fewshot"] = results["fewshot"]["mean"]
    row["fewshot_ci95"] = results["fewshot"]["ci95"]
    row["nmi"] = results.get("nmi", math.nan)
    return row


def _fmt(v: Any, pct: bool = True) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else (f"{100 * v:.1f}" if pct else f"{v:.3f}")
    return str(v)


def format_csv(rows: list[dict[str, Any]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def format_markdown(rows: list[dict[str, Any]], taps: tuple[str, ...]) -> str:
    """Top-1 (%) per tap, kNN on the best tap, few-shot mean +- 95% interval, NMI: the paper's table layout."""
    head = ["method", *taps, "kNN", "few-shot", "NMI"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        fs = "-" if math.isnan(r["fewshot"]) else f"{100 * r['fewshot']:.1f} ± {100 * r['fewshot_ci95']:.1f}"
        cells = [r["name"], *(_fmt(r[t]) for t in taps), f"{_fmt(r['knn'])} ({r['knn_tap']})", fs,
                 _fmt(r["nmi"], pct=False)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(cfg: Config, trunk: str, labels: StageDir | None = None, name: str = "student") -> StageDir:
    """Evaluate a frozen trunk on ``evaluate.data`` (else ``data.path``): ``results.json`` (+ .csv, .md).

    ``trunk``: a weights file (``teacher.pt``, ``student.pt``) or ``random:<arch>[:<width>]``.
    ``labels`` (a cluster stage) adds the NMI of its pseudo-labels against the real labels.
    """

    from ktray.rundir import write_bytes_atomic, write_manifest

    sd = output_dir(cfg, trunk, labels, name)
    if sd.done():
        return sd
    started = time.time()
    sd.make()
    from ktray.pipeline import init_ray

    init_ray()  # the job's cluster (RAY_ADDRESS) or a local one
    path = eval_data_path(cfg)
    taps = tuple(cfg.evaluate.taps)
    print(f"evaluate: {name} ({trunk}) on {path}, taps {', '.join(taps)}", flush=True)
    t0 = time.time()
    train = extract_features(cfg, trunk, path, cfg.data.train_split, taps)
    val = extract_features(cfg, trunk, path, cfg.data.val_split, taps)
    extract_s = time.time() - t0
    n_img = len(train.image_ids) + len(val.image_ids)
    print(f"evaluate: features of {n_img} images in {extract_s:.1f} s ({n_img / max(extract_s, 1e-9):.1f} img/s)",
          flush=True)
    results: dict[str, Any] = {"name": name, "trunk": trunk, "data": path, **evaluate_features(cfg, train, val)}
    results["extract_images_per_s"] = n_img / max(extract_s, 1e-9)
    if labels is not None:
        results.update(cluster_nmi(cfg, labels))
        print(f"evaluate: NMI(pseudo-labels, real labels) = {results['nmi']:.4f}", flush=True)
    row = result_row(results, taps)
    write_bytes_atomic(sd.path(f"{RESULTS}.json"), json.dumps(results, indent=2, default=float).encode())
    write_bytes_atomic(sd.path(f"{RESULTS}.csv"), format_csv([row]).encode())
    write_bytes_atomic(sd.path(f"{RESULTS}.md"), format_markdown([row], taps).encode())
    summary = {f"top1_{t}": results["taps"][t]["top1"] for t in taps}
    summary.update({
        "knn_top1": results["knn_top1"],
        "fewshot_acc": results["fewshot"]["mean"],
        "fewshot_ci95": results["fewshot"]["ci95"],
        "chance": results["chance"],
        "extract_images_per_s": results["extract_images_per_s"],
    })
    if "nmi" in results:
        summary["nmi"] = results["nmi"]
    write_manifest(
        sd,
        config=stage_config(cfg, name),
        inputs=_inputs(cfg, trunk, labels),
        files=[f"{RESULTS}.json", f"{RESULTS}.csv", f"{RESULTS}.md"],
        metrics={"summary": summary, "history": []},
        started=started,
    )
    return sd
