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

import io
import json
import math
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ktray.algos.probes import (
    bootstrap_interval,
    fewshot_accuracy,
    fewshot_episodes,
    knn_predict,
    linear_probe,
    nmi,
    pool_to_max_dim,
)
from ktray.artifacts import PREDICTIONS, RESULTS, read_labels
from ktray.config import RANDOM_TRUNK, TORCHVISION_TRUNK, EvaluateConfig, parse_random_trunk
from ktray.data.decode import decode_batch
from ktray.data.shards import data_path, limited_data_key, load_table, read_images
from ktray.lifecycle import Output, StageSpec, ensure
from ktray.models.trunks import check_weights, load_any_trunk, standardise, trunk_key
from ktray.rundir import StageDir, write_bytes_atomic
from ktray.runtime import actor_cpus, resolve_device

if TYPE_CHECKING:
    from ktray.config import Config


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


        x = standardise(batch["pixels"], self.device)  # (B, 3, S, S), as the teacher and student saw images
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with (
            torch.inference_mode(),
            torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.amp and x.is_cuda),
        ):
            acts = self.trunk.taps(x, list(self.taps))  # {tap: (B, C, h, w)}
            out = {tap: pool_to_max_dim(acts[tap].float(), self.max_dim, self.pool) for tap in self.taps}
        passed = {k: batch[k] for k in ("image_id", "label", "split") if k in batch}
        return {**passed, **out}


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
    splits: tuple[str, ...],
    taps: tuple[str, ...] | None = None,
) -> dict[str, Features]:
    """Run every image of ``splits`` through the frozen ``trunk``; pooled taps per split on the driver.

    ``trunk`` is a weights URI, ``random:<arch>[:<width>]`` or an ``nn.Module``. Streaming
    Ray Data as in embed: decode, then the trunk on a fixed-size actor pool with one GPU per
    actor where the cluster has GPUs (Ray Data fuses the decode into the actors on CPU). The
    splits go through one pass, so the pool (a process that loads torch and the trunk) starts once.
    """
    from ray.data import ActorPoolStrategy

    e = cfg.evaluate
    taps = tuple(taps or e.taps)
    device = resolve_device(cfg.compute.device)
    gpu = device == "cuda"
    cpus = 1 if gpu else actor_cpus(cfg.compute.cpus_per_worker, e.num_actors)
    parts = [read_images(data_path, s, cfg.data.limit, block_rows=cfg.data.decode_batch_size) for s in splits]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
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
    parts_of: list[np.ndarray] = []
    cols: dict[str, list[np.ndarray]] = {t: [] for t in taps}
    for b in pooled.iter_batches(batch_format="numpy", batch_size=None):
        ids.append(np.asarray(b["image_id"]).astype(str))
        labels.append(np.asarray(b["label"], dtype=np.int64))
        parts_of.append(np.asarray(b["split"]).astype(str))
        for t in taps:
            cols[t].append(np.asarray(b[t], dtype=np.float32))
    all_splits = np.concatenate(parts_of) if parts_of else np.zeros(0, str)
    for split in splits:
        if not (all_splits == split).any():
            raise ValueError(f"{data_path}: no decodable images in split {split!r}")
    all_ids, all_labels = np.concatenate(ids), np.concatenate(labels)
    all_taps = {t: np.concatenate(cols[t]) for t in taps}
    out: dict[str, Features] = {}
    for split in splits:
        mine = np.flatnonzero(all_splits == split)
        order = mine[np.argsort(all_ids[mine], kind="stable")]
        out[split] = Features(all_ids[order], all_labels[order], {t: x[order] for t, x in all_taps.items()})
    return out


COMPARE_ONLY = ("compare_seeds", "seed_rows")  # evaluate settings left out of the hash


def eval_data_path(cfg: Config) -> str:
    """The labeled shards the trunk is measured on: ``evaluate.data``, else the pipeline's data."""
    return cfg.evaluate.data or data_path(cfg.data)


def params(cfg: Config, name: str) -> dict[str, Any]:
    """What the evaluation depends on besides the trunk and the data (the folder hash); compute
    settings are left out. The ``compare_*`` settings only pick which rows and seeds ``ktray
    compare`` runs and change no evaluation: ``compare_rows`` is hashed as its default and the
    others not at all, so asking for other rows or seeds reuses every evaluation already done."""
    e = {k: v for k, v in cfg.evaluate.to_dict().items() if k not in COMPARE_ONLY}
    e["compare_rows"] = list(EvaluateConfig().compare_rows)
    return {
        "evaluate": e,
        "train_split": cfg.data.train_split,
        "val_split": cfg.data.val_split,
        "limit": cfg.data.limit,
        "seed": cfg.seed,
        "name": name,
    }


def _inputs(cfg: Config, trunk: str, labels: StageDir | None) -> list[StageDir | str]:
    # The data with the rule a limited run picks its rows by (data.limited_rows).
    data = limited_data_key(eval_data_path(cfg), cfg.data.limit)
    inputs: list[StageDir | str] = [trunk_key(trunk, cfg.transfer.width, cfg.seed), data]
    return [*inputs, labels] if labels is not None else inputs


def spec(cfg: Config, trunk: str, labels: StageDir | None = None, name: str = "student") -> StageSpec:
    """``trunk``: a weights file (``teacher.pt``, ``student.pt``) or ``random:<arch>[:<width>]``;
    ``labels`` (a cluster stage) adds the NMI of its pseudo-labels against the real labels."""
    check = (partial(parse_random_trunk, trunk, cfg.transfer.width) if trunk.startswith(RANDOM_TRUNK)
             else None if trunk.startswith(TORCHVISION_TRUNK) else partial(check_weights, trunk))
    # The NMI of the pseudo-labels reads the real labels of the pipeline's data.
    data = tuple(dict.fromkeys([eval_data_path(cfg), *([data_path(cfg.data)] if labels is not None else [])]))
    return StageSpec("evaluate", cfg, params(cfg, name), _inputs(cfg, trunk, labels), compute,
                     args=(trunk, labels, name), check=check, data=data)


def output_dir(cfg: Config, trunk: str, labels: StageDir | None = None, name: str = "student") -> StageDir:
    return spec(cfg, trunk, labels, name).dir


def run(cfg: Config, trunk: str, labels: StageDir | None = None, name: str = "student", **how: Any) -> StageDir:
    """The evaluation's stage folder, computed first unless done (``how``: ``force``, ``tracker``)."""
    return ensure(spec(cfg, trunk, labels, name), **how)


def cluster_nmi(cfg: Config, labels: StageDir) -> dict[str, float]:
    """NMI of the cluster stage's pseudo-labels against the real labels of the same images.

    The pseudo-labels belong to the pipeline's data (``data.path``), not to the set the
    trunk is measured on; images are matched by ``image_id``, unlabeled ones left out.
    """
    import pyarrow.compute as pc


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


def evaluate_features(cfg: Config, train: Features, val: Features) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """All the measures on extracted features: linear probe per tap, then kNN and few-shot on the best tap.

    Returns the results (each top-1 with its 95% bootstrap interval over the val images, ``ci95``)
    and, per tap and for ``knn``, which labeled val images were classified right (in ``val`` order):
    two trunks measured on the same images can then be compared image by image.
    """
    e = cfg.evaluate
    tr = train.labels >= 0
    va = val.labels >= 0
    ytr, yva = train.labels[tr], val.labels[va]
    classes = int(max(ytr.max(initial=-1), yva.max(initial=-1)) + 1)
    out: dict[str, Any] = {"taps": {}, "n_train": int(tr.sum()), "n_val": int(va.sum()), "classes": classes,
                           "chance": 1.0 / max(classes, 1)}
    correct: dict[str, np.ndarray] = {}
    for tap, xtr in train.taps.items():
        t0 = time.time()
        res = linear_probe(
            xtr[tr], ytr, val.taps[tap][va], yva, c_grid=e.probe_c, max_iter=e.probe_max_iter, seed=cfg.seed
        )
        res["seconds"] = time.time() - t0
        correct[tap] = res.pop("correct")
        res["ci95"] = bootstrap_interval(correct[tap], seed=cfg.seed)
        out["taps"][tap] = res
        print(f"evaluate: {tap} ({res['dim']} dims) linear top-1 {res['top1']:.4f} (C={res['C']:g}, "
              f"{res['seconds']:.1f} s)", flush=True)
    best = max(out["taps"], key=lambda t: out["taps"][t]["top1"])
    out["best_tap"] = best
    correct["knn"] = knn_predict(train.taps[best][tr], ytr, val.taps[best][va], k=e.knn_k,
                                 temperature=e.knn_temperature) == yva
    out["knn_top1"] = float(correct["knn"].mean())
    out["knn_ci95"] = bootstrap_interval(correct["knn"], seed=cfg.seed)
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
    return out, correct


def result_row(results: dict[str, Any], taps: tuple[str, ...]) -> dict[str, Any]:
    """One table row (name, top-1 per tap, kNN, few-shot, NMI) of a ``results.json``."""
    row: dict[str, Any] = {"name": results["name"]}
    for t in taps:
        tap = results["taps"].get(t, {})
        row[t] = tap.get("top1", math.nan)
        row[f"{t}_lo"], row[f"{t}_hi"] = tap.get("ci95", (math.nan, math.nan))
    row["knn"] = results["knn_top1"]
    row["knn_lo"], row["knn_hi"] = results.get("knn_ci95", (math.nan, math.nan))
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


def _with_interval(r: dict[str, Any], key: str) -> str:
    """``47.3 (45.8-48.9)``: the figure and its bootstrap interval, in %; the figure alone without one."""
    lo, hi = r.get(f"{key}_lo", math.nan), r.get(f"{key}_hi", math.nan)
    if math.isnan(lo) or math.isnan(r[key]):
        return _fmt(r[key])
    return f"{_fmt(r[key])} ({100 * lo:.1f}-{100 * hi:.1f})"


def format_markdown(rows: list[dict[str, Any]], taps: tuple[str, ...]) -> str:
    """Top-1 (%) per tap with its 95% bootstrap interval, kNN on the best tap, few-shot mean +- 95%
    interval, NMI: the paper's table layout."""
    head = ["method", *taps, "kNN", "few-shot", "NMI"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        fs = "-" if math.isnan(r["fewshot"]) else f"{100 * r['fewshot']:.1f} ± {100 * r['fewshot_ci95']:.1f}"
        cells = [r["name"], *(_with_interval(r, t) for t in taps), f"{_with_interval(r, 'knn')} [{r['knn_tap']}]",
                 fs, _fmt(r["nmi"], pct=False)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compute(cfg: Config, sd: StageDir, trunk: str, labels: StageDir | None, name: str) -> Output:
    """Evaluate a frozen trunk on ``evaluate.data`` (else ``data.path``): ``results.json`` (+ .csv, .md)."""
    path = eval_data_path(cfg)
    taps = tuple(cfg.evaluate.taps)
    print(f"evaluate: {name} ({trunk}) on {path}, taps {', '.join(taps)}", flush=True)
    t0 = time.time()
    features = extract_features(cfg, trunk, path, (cfg.data.train_split, cfg.data.val_split), taps)
    train, val = features[cfg.data.train_split], features[cfg.data.val_split]
    extract_s = time.time() - t0
    n_img = len(train.image_ids) + len(val.image_ids)
    print(f"evaluate: features of {n_img} images in {extract_s:.1f} s ({n_img / max(extract_s, 1e-9):.1f} img/s)",
          flush=True)
    measures, correct = evaluate_features(cfg, train, val)
    results: dict[str, Any] = {"name": name, "trunk": trunk, "data": path, **measures}
    results["extract_images_per_s"] = n_img / max(extract_s, 1e-9)
    if labels is not None:
        results.update(cluster_nmi(cfg, labels))
        print(f"evaluate: NMI(pseudo-labels, real labels) = {results['nmi']:.4f}", flush=True)
    row = result_row(results, taps)
    write_bytes_atomic(sd.path(f"{RESULTS}.json"), json.dumps(results, indent=2, default=float).encode())
    buf = io.BytesIO()
    np.savez(buf, image_id=val.image_ids[val.labels >= 0].astype(str), **correct)
    write_bytes_atomic(sd.path(PREDICTIONS), buf.getvalue())
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
    return Output([f"{RESULTS}.json", f"{RESULTS}.csv", f"{RESULTS}.md", PREDICTIONS], summary)
