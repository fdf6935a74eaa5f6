"""Cluster classification (CC, paper Sec. 4): the student learns to classify the teacher's clusters.

CC carries the teacher's knowledge to a student of any architecture: the student (AlexNet in
the paper) never sees the teacher, only the pseudo-label each image got from k-means on the
teacher's conv4 features.

    shards ──► Ray Data: join on image_id ──► decode + random resized crop + flip ──► Ray Train
    (images)   (labels.parquet, broadcast)    (CPU, streamed)                        student

The join is a hash lookup by ``image_id`` (never by position), so it is correct whatever the
order of the shards or of the labels table. A fixed, seeded fraction of the images (the
held-out rule of ``ktray.data.subsets``, order-free) is held out to score pseudo-label accuracy.
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor

from ktray.artifacts import STUDENT, read_labels
from ktray.config import DISTILL_FIELDS
from ktray.data.decode import decode_batch
from ktray.data.shards import read_split, train_ids
from ktray.data.subsets import is_held_out
from ktray.lifecycle import Output
from ktray.models.heads import build_student
from ktray.models.trunks import save_weights, standardise
from ktray.rundir import StageDir
from ktray.training import TrainTask, fit, sgd_schedule

if TYPE_CHECKING:
    import ray.data

    from ktray.config import Config


LEARNS_FROM = "cluster"  # the upstream stage this student learns from (the pipeline wires it)


def transfer_params(cfg: Config) -> dict[str, Any]:
    """The ``transfer`` section as the student's folder hash sees it: without the distill settings CC never reads."""
    return {k: v for k, v in cfg.transfer.to_dict().items() if k not in DISTILL_FIELDS}


def check(cfg: Config, labels: StageDir) -> None:
    """The labels boundary: one cluster for every image this stage reads, and none for an image it does not."""
    read_labels(labels, train_ids(cfg.data))


def compute(cfg: Config, sd: StageDir, labels: StageDir) -> Output:
    """Train the student on the clusters of ``labels`` (a cluster stage); ``student.pt`` in ``sd``."""
    t = cfg.transfer
    table, k = read_labels(labels)  # its image ids were checked against the train split by `check`
    used = int((np.bincount(table["cluster"].to_numpy(), minlength=k) > 0).sum())
    print(f"transfer: {t.arch} x{t.width:g} student on {table.num_rows} images, {k} clusters "
          f"({used} non-empty), balanced={t.balanced}, holdout {t.holdout_fraction:.0%} -> {sd.uri}", flush=True)
    build = partial(build_student, t.arch, t.width, k)
    task = TrainTask(
        build_model=build,
        batch_fn=student_batch,
        loss_fn=F.cross_entropy,
        **sgd_schedule(t),
        seed=cfg.seed,
        unit="images",
        extra={"num_classes": k},
    )
    result = fit(task, build_datasets(cfg, table, k, cfg.compute.num_workers), cfg.compute, sd)
    student = build()
    student.load_state_dict(result.state_dict)
    save_weights(student.trunk, sd.path(STUDENT))
    last = result.summary
    summary = {
        **result.headline("loss", "train_acc", "images_per_s"),
        "num_classes": float(k),
        "nonempty_clusters": float(used),
        "chance": 1.0 / used,
    }
    if "val_acc" in last:
        summary.update({"holdout_acc": last["val_acc"], "holdout_loss": last["val_loss"]})
    print(f"transfer: done; held-out pseudo-label accuracy {summary.get('holdout_acc', math.nan):.3f} "
          f"(chance {summary['chance']:.4f})", flush=True)
    return Output([STUDENT], summary, result.history_rows())


def balanced_rates(clusters: np.ndarray, k: int) -> np.ndarray:
    """Expected draws per image of each cluster, ``(k,)``, for sampling uniformly over clusters.

    DeepCluster's sampler draws an epoch of N images as N / k' per non-empty cluster (k' of
    them), so a small cluster's images are repeated and a large one's thinned. Streaming
    cannot index at random; instead each image is emitted Poisson(rate) times with
    ``rate = (N / k') / size``: every cluster then contributes N / k' images per epoch in
    expectation, and the epoch keeps about N images.
    """
    sizes = np.bincount(np.asarray(clusters, dtype=np.int64), minlength=k).astype(np.float64)  # (k,)
    nonempty = int((sizes > 0).sum())
    per_cluster = sizes.sum() / max(nonempty, 1)
    with np.errstate(divide="ignore"):
        return np.where(sizes > 0, per_cluster / sizes, 0.0)


def join_clusters(
    batch: pa.Table,
    labels: pa.Table,
    part: str = "all",
    holdout_fraction: float = 0.0,
    seed: int = 0,
    rates: np.ndarray | None = None,
) -> pa.Table:
    """Attach each image's cluster id (column ``cluster``), looked up by ``image_id``: a hash join.

    ``part="train"`` keeps the images not held out and, with ``rates`` (balanced sampling),
    repeats each one Poisson(rate of its cluster) times; ``part="holdout"`` keeps only the
    held-out images, once each; ``all`` keeps every labeled image. Images without a label
    are dropped. Used as a Ray Data task on whole blocks (``batch_size=None``): the hash of
    the labels' ids is built once per block, ~0.2 s for ImageNet's 1.28M ids, against
    several seconds of decoding per block of images.
    """
    import pyarrow.compute as pc

    if part not in ("train", "holdout", "all"):
        raise ValueError(f"part: expected train, holdout or all, got {part!r}")
    pos = pc.index_in(batch["image_id"], value_set=labels["image_id"])  # (B,) row in labels, null if none
    keep = pos.is_valid().to_numpy(zero_copy_only=False)
    cluster = np.full(batch.num_rows, -1, dtype=np.int64)
    if keep.any():
        found = pos.to_numpy(zero_copy_only=False)[keep].astype(np.int64)
        cluster[keep] = labels["cluster"].to_numpy()[found]
    if part != "all":
        held = is_held_out(batch["image_id"].to_pylist(), holdout_fraction, seed)
        keep &= held if part == "holdout" else ~held
    repeats = keep.astype(np.int64)
    if part == "train" and rates is not None:
        # Fresh entropy on purpose: a fixed seed would draw the same "random" epoch every epoch.
        repeats = np.where(keep, np.random.default_rng().poisson(rates[np.maximum(cluster, 0)]), 0)
    take = np.repeat(np.arange(batch.num_rows), repeats)  # (B',) rows, repeated for balance
    out = batch.take(pa.array(take, pa.int64()))
    return out.append_column("cluster", pa.array(cluster[take].astype(np.int32), pa.int32()))


def decode_clusters(batch: dict[str, np.ndarray], size: int, mode: str = "random") -> dict[str, np.ndarray]:
    """Ray Data task after the join: decode and augment; rows ``pixels`` (B, S, S, 3) uint8, ``label`` = cluster.

    ``random`` is the training augmentation (random resized crop + horizontal flip, fresh
    randomness each epoch); ``center`` is for the held-out images.
    """

    rows = {"image_id": batch["image_id"], "image": batch["image"], "label": batch["cluster"]}
    out = decode_batch(rows, size, mode, stage="transfer")  # type: ignore[arg-type]
    return {"pixels": out["pixels"], "label": out["label"].astype(np.int64)}


def student_batch(batch: dict[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """uint8 ``pixels`` (B, S, S, 3) -> float (B, 3, S, S) standardised per image (as embed and evaluate)."""
    x = standardise(batch["pixels"].to(device, non_blocking=True))  # (B, 3, S, S)
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, batch["label"].to(device, non_blocking=True)


def build_datasets(cfg: Config, labels: pa.Table, k: int, num_workers: int) -> dict[str, ray.data.Dataset]:
    """``train``: joined, balanced, shuffled, augmented anew every epoch; ``val``: the held-out images, fixed.

    Every step is a stateless Ray Data task (no actor holds a CPU), so the stream cannot
    starve the all-to-all shuffle of CPUs on a small cluster.
    """

    t = cfg.transfer
    # Whole shards per block: the join builds its hash of the labels' ids once per block.
    images = read_split(cfg.data, cfg.data.train_split, blocks=False)
    ids = labels["image_id"].to_pylist()
    train_clusters = labels["cluster"].to_numpy()[~is_held_out(ids, t.holdout_fraction, cfg.seed)]
    rates = balanced_rates(train_clusters, k) if t.balanced else None
    join = {"labels": labels, "holdout_fraction": t.holdout_fraction, "seed": cfg.seed}
    decode = {"batch_size": cfg.data.decode_batch_size, "batch_format": "numpy"}
    train = (
        images.map_batches(join_clusters, batch_size=None, batch_format="pyarrow",
                           fn_kwargs={**join, "part": "train", "rates": rates})
        # Unseeded: a new order every epoch (the shards are sorted by class; repeats land apart).
        .random_shuffle()
        .map_batches(decode_clusters, fn_kwargs={"size": t.image_size, "mode": "random"}, **decode)
    )
    out = {"train": train}
    if t.holdout_fraction > 0:
        val = (
            images.map_batches(join_clusters, batch_size=None, batch_format="pyarrow",
                               fn_kwargs={**join, "part": "holdout"})
            .map_batches(decode_clusters, fn_kwargs={"size": t.image_size, "mode": "center"}, **decode)
            .materialize()
        )
        n_val = val.count()
        if n_val < num_workers:
            raise ValueError(
                f"transfer.holdout_fraction={t.holdout_fraction}: {n_val} held-out images for "
                f"{num_workers} workers; raise it or use more data"
            )
        # Each worker scores an equal share (the split would otherwise drop the remainder).
        if n_val % num_workers:
            val = val.limit(n_val - n_val % num_workers).materialize()
        out["val"] = val
    return out
