"""Transfer: train the student from scratch to classify the teacher's clusters (paper Sec. 4).

(``transfer.method: distill`` is the other way: the student matches the frozen teacher's
similarity distribution over a queue of its embeddings; see :func:`run_distill` and ``ktray.isd``.)

"Cluster classification" (CC) carries the teacher's knowledge to a student of any
architecture: the student (AlexNet in the paper) never sees the teacher, only the
pseudo-label each image got from k-means on the teacher's conv4 features.

    shards ──► Ray Data: join on image_id ──► decode + random resized crop + flip ──► Ray Train
    (images)   (labels.parquet, broadcast)    (CPU, streamed)                        student

The join is a hash lookup by ``image_id`` (never by position), so it is correct whatever the
order of the shards or of the labels table. A fixed, seeded fraction of the images (chosen
by a hash of the id, so also order-free) is held out to score pseudo-label accuracy.
"""

from __future__ import annotations

import math
import time
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from ktray import schema

if TYPE_CHECKING:
    import ray.data

    from ktray.config import Config
    from ktray.rundir import StageDir


def read_labels(labels: StageDir, image_ids: pa.Array | None = None) -> tuple[pa.Table, int]:
    """The cluster stage's ``labels.parquet`` (checked against the labels contract) and k.

    With ``image_ids``, the table must label exactly those images (see ``schema.check_labels``).
    """
    import pyarrow.parquet as pq

    from ktray.rundir import filesystem

    fs, path = filesystem(labels.path("labels.parquet"))
    table = pq.read_table(path, filesystem=fs)
    k = schema.check_labels(table, image_ids)
    return table.select(["image_id", "cluster"]), k


def is_holdout(image_ids: list[str] | np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Whether each image is held out: a seeded hash of its id, so the split ignores row order."""
    if fraction <= 0:
        return np.zeros(len(image_ids), dtype=bool)
    salt = f"{seed}:".encode()
    h = np.fromiter((zlib.crc32(salt + str(i).encode()) for i in image_ids), dtype=np.uint64, count=len(image_ids))
    return h < np.uint64(int(fraction * 2**32))


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
        held = is_holdout(batch["image_id"].to_pylist(), holdout_fraction, seed)
        keep &= held if part == "holdout" else ~held
    repeats = keep.astype(np.int64)
    if part == "train" and rates is not None:
        # Fresh entropy on purpose: a fixed seed would draw the same "random" epoch every epoch.
        repeats = np.where(keep, np.random.default_rng().poisson(rates[np.maximum(cluster, 0)]), 0)
    take = np.repeat(np.arange(batch.num_rows), repeats)  # (B',) rows, repeated for balance
    out = batch.take(pa.array(take, pa.int64()))
    return out.append_column("cluster", pa.array(cluster[take].astype(np.int32), pa.int32()))


def attach_clusters(images: pa.Table, labels: pa.Table) -> pa.Table:
    """Every labeled image row with its cluster id (inner join on ``image_id``), whatever either order."""
    return join_clusters(images, labels, part="all")


def decode_clusters(batch: dict[str, np.ndarray], size: int, mode: str = "random") -> dict[str, np.ndarray]:
    """Ray Data task after the join: decode and augment; rows ``pixels`` (B, S, S, 3) uint8, ``label`` = cluster.

    ``random`` is the training augmentation (random resized crop + horizontal flip, fresh
    randomness each epoch); ``center`` is for the held-out images.
    """
    from ktray.data import decode_batch

    rows = {"image_id": batch["image_id"], "image": batch["image"], "label": batch["cluster"]}
    out = decode_batch(rows, size, mode, stage="transfer")  # type: ignore[arg-type]
    return {"pixels": out["pixels"], "label": out["label"].astype(np.int64)}


# --------------------------------------------------------------------------- the student


class Student(nn.Module):
    """The trunk plus a linear classifier over the k clusters (the paper: the whole AlexNet, fc6-fc8).

    AlexNet and VGG16 keep their fc6/fc7 layers (``ktray.models`` builds them with ``fc=True``) and
    fc8 is the new linear layer; ResNets average-pool conv5 into the linear layer.
    """

    def __init__(self, arch: str, width: float, num_classes: int) -> None:
        super().__init__()
        from ktray.models import _init, build_trunk

        self.trunk = build_trunk(arch, width, fc=arch in ("alexnet", "vgg16"))
        dim = self.trunk.out_channels("fc7") if self.trunk.has_fc else self.trunk.out_channels("conv5")
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(dim, num_classes)
        _init(self.fc)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, S, S) -> logits (B, k)
        if self.trunk.has_fc:
            return self.fc(self.trunk.taps(x, ["fc7"])["fc7"])  # fc7: (B, 4096 * width)
        return self.fc(self.pool(self.trunk(x)))  # pooled conv5: (B, C5)


def build_student(arch: str, width: float, num_classes: int) -> Student:
    return Student(arch, width, num_classes)


def student_batch(batch: dict[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """uint8 ``pixels`` (B, S, S, 3) -> float (B, 3, S, S) standardised per image (as embed and evaluate)."""
    x = batch["pixels"].to(device, non_blocking=True).permute(0, 3, 1, 2).float()  # (B, 3, S, S)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
    x = (x - mean) / std.clamp_min(1.0)
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, batch["label"].to(device, non_blocking=True)


# --------------------------------------------------------------------------- stage

STUDENT = "student.pt"


def stage_config(cfg: Config) -> dict[str, Any]:
    """What the student depends on (its folder hash); compute settings are left out, so a run
    interrupted on 2 workers resumes on 4. A cluster-classification student leaves out the
    distill settings it never reads (its folders keep the names they had before distill existed)."""
    from ktray.config import DISTILL_FIELDS

    t = cfg.transfer.to_dict()
    if cfg.transfer.method == "cluster":
        t = {k: v for k, v in t.items() if k not in DISTILL_FIELDS}
    return {
        "transfer": t,
        "seed": cfg.seed,
        "data": {"train_split": cfg.data.train_split, "limit": cfg.data.limit},
    }


def _inputs(cfg: Config, labels: StageDir) -> list[StageDir | str]:
    from ktray.data import data_identity

    return [labels, data_identity(cfg.data)]


def output_dir(cfg: Config, labels: StageDir) -> StageDir:
    """Where :func:`run` writes for this config and these labels."""
    from ktray.rundir import stage_dir

    return stage_dir(cfg.root, "transfer", stage_config(cfg), _inputs(cfg, labels))


def build_datasets(cfg: Config, labels: pa.Table, k: int, num_workers: int) -> dict[str, ray.data.Dataset]:
    """``train``: joined, balanced, shuffled, augmented anew every epoch; ``val``: the held-out images, fixed.

    Every step is a stateless Ray Data task (no actor holds a CPU), so the stream cannot
    starve the all-to-all shuffle of CPUs on a small cluster.
    """
    from ktray.data import read_split

    t = cfg.transfer
    # Whole shards per block, as before the decode-block split (not yet measured on this stage's join).
    images = read_split(cfg.data, cfg.data.train_split, blocks=False)
    ids = labels["image_id"].to_pylist()
    train_clusters = labels["cluster"].to_numpy()[~is_holdout(ids, t.holdout_fraction, cfg.seed)]
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


# --------------------------------------------------------------------------- similarity distillation


def read_teacher_features(features: StageDir) -> tuple[pa.Array, np.ndarray]:
    """An embed stage's image ids ``(N,)`` and L2-normalised features ``(N, D)`` float32 (the teacher's embeddings)."""
    import pyarrow.parquet as pq

    from ktray.kmeans import feature_files, features_to_numpy
    from ktray.rundir import filesystem

    ids, xs = [], []
    for uri, _rows in feature_files(features):
        fs, path = filesystem(uri)
        t = pq.read_table(path, filesystem=fs, columns=["image_id", "feature"])
        schema.feature_dim(t.schema)
        ids.extend(t["image_id"].chunks)
        xs.append(features_to_numpy(t["feature"]))
    x = np.concatenate(xs)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return pa.chunked_array(ids, pa.string()).combine_chunks(), x


def join_teacher(batch: pa.Table, ids: pa.Array, feats: np.ndarray) -> pa.Table:
    """Attach each image's teacher embedding (column ``teacher``), looked up by ``image_id``; images
    the teacher never embedded are dropped. A Ray Data task on whole blocks, like :func:`join_clusters`."""
    import pyarrow.compute as pc

    pos = pc.index_in(batch["image_id"], value_set=ids)  # (B,) row in feats, null if none
    keep = pos.is_valid()
    out = batch.filter(keep)
    rows = pos.filter(keep).to_numpy(zero_copy_only=False).astype(np.int64)
    teacher = pa.FixedSizeListArray.from_arrays(pa.array(feats[rows].reshape(-1), pa.float32()), feats.shape[1])
    return out.append_column("teacher", teacher)


def decode_teacher(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Decode + augment (random resized crop + flip) after the join: ``pixels`` and the matching ``teacher`` rows."""
    from ktray.data import decode_batch

    rows = {"image_id": batch["image_id"], "image": batch["image"]}
    out = decode_batch(rows, size, "random", stage="transfer")  # type: ignore[arg-type]
    where = {str(i): n for n, i in enumerate(batch["image_id"])}
    teacher = np.stack(list(batch["teacher"]))  # (B, D)
    picked = teacher[[where[str(i)] for i in out["image_id"]]] if len(out["image_id"]) else teacher[:0]
    return {"pixels": out["pixels"], "teacher": picked.astype(np.float32)}


def build_distill_datasets(cfg: Config, ids: pa.Array, feats: np.ndarray) -> dict[str, ray.data.Dataset]:
    """``train``: the train split joined with the teacher's embeddings, shuffled, augmented anew every epoch."""
    from ktray.data import read_split

    train = (
        read_split(cfg.data, cfg.data.train_split)
        .map_batches(join_teacher, batch_size=None, batch_format="pyarrow", fn_kwargs={"ids": ids, "feats": feats})
        .random_shuffle()
        .map_batches(decode_teacher, fn_kwargs={"size": cfg.transfer.image_size},
                     batch_size=cfg.data.decode_batch_size, batch_format="numpy")
    )
    train.context.enable_progress_bars = False
    return {"train": train}


def run_distill(cfg: Config, features: StageDir, sd: StageDir, started: float) -> StageDir:
    """Train the student to match a frozen teacher's similarities over a queue of its embeddings."""
    from functools import partial

    from ktray import isd, models, training
    from ktray.pipeline import init_ray
    from ktray.rundir import write_manifest

    init_ray()
    t = cfg.transfer
    ids, feats = read_teacher_features(features)
    dim = feats.shape[1]
    print(f"transfer: {t.arch} x{t.width:g} student distilled from {features.name} ({len(ids)} images, {dim} dims, "
          f"queue {t.distill_queue}, T_t {t.distill_t_teacher}, T_s {t.distill_t_student}) -> {sd.uri}", flush=True)
    build = partial(isd.build_distill, t.arch, t.width, dim, hidden=t.distill_hidden, queue_size=t.distill_queue,
                    t_teacher=t.distill_t_teacher, t_student=t.distill_t_student)
    task = training.TrainTask(
        build_model=build,
        batch_fn=isd.distill_batch,
        loss_fn=isd.similarity_kl,
        acc_fn=isd.nearest_agreement,
        after_step=isd.isd_after_step,
        forward_targets=True,  # the teacher's embeddings feed the forward
        broadcast_buffers=False,
        **training.sgd_schedule(t),
        seed=cfg.seed,
        unit="images",
        extra={"teacher_dim": dim},
    )
    result = training.fit(task, build_distill_datasets(cfg, ids, feats), cfg.compute, sd)
    net = build()
    net.load_state_dict(result.state_dict)
    models.save_weights(net.trunk, sd.path(STUDENT))
    last = result.summary
    summary = {
        "loss": last["loss"],
        "agreement": last["train_acc"],
        "images_per_s": last["images_per_s"],
        "teacher_dim": float(dim),
        "epochs": float(last["epoch"]),
        "resumed_from_epoch": float(result.starts[-1]),
    }
    history = [{"step": int(h["epoch"]), **{k_: v for k_, v in h.items() if k_ != "epoch"}} for h in result.history]
    write_manifest(sd, config=stage_config(cfg), inputs=_inputs(cfg, features), files=[STUDENT],
                   metrics={"summary": summary, "history": history}, started=started)
    print(f"transfer: done; distillation loss {summary['loss']:.4f}, nearest-anchor agreement "
          f"{summary['agreement']:.3f}", flush=True)
    return sd


def run(cfg: Config, labels: StageDir) -> StageDir:
    """Train the student; ``student.pt`` in its folder.

    ``transfer.method: cluster``: ``labels`` is a cluster stage and the student classifies its
    clusters. ``distill``: ``labels`` is an embed stage (the teacher's embeddings) and the
    student matches the teacher's similarities (:func:`run_distill`). Resumes from the last
    epoch checkpoint of an interrupted run of the same folder.
    """
    from functools import partial

    import torch.nn.functional as F

    from ktray import models, training
    from ktray.data import train_ids
    from ktray.rundir import write_manifest

    sd = output_dir(cfg, labels)
    if sd.done():
        return sd
    started = time.time()
    t = cfg.transfer
    if t.method == "distill":
        sd.make()
        return run_distill(cfg, labels, sd, started)
    # The boundary check, before any folder or worker exists: one cluster for every image this
    # stage reads, and none for an image it does not.
    table, k = read_labels(labels, train_ids(cfg.data))
    sd.make()
    from ktray.pipeline import init_ray

    init_ray()  # the job's cluster (RAY_ADDRESS) or a local one
    used = int((np.bincount(table["cluster"].to_numpy(), minlength=k) > 0).sum())
    print(f"transfer: {t.arch} x{t.width:g} student on {table.num_rows} images, {k} clusters "
          f"({used} non-empty), balanced={t.balanced}, holdout {t.holdout_fraction:.0%} -> {sd.uri}", flush=True)
    datasets = build_datasets(cfg, table, k, cfg.compute.num_workers)
    build = partial(build_student, t.arch, t.width, k)
    task = training.TrainTask(
        build_model=build,
        batch_fn=student_batch,
        loss_fn=F.cross_entropy,
        **training.sgd_schedule(t),
        seed=cfg.seed,
        unit="images",
        extra={"num_classes": k},
    )
    result = training.fit(task, datasets, cfg.compute, sd)
    student = build()
    student.load_state_dict(result.state_dict)
    models.save_weights(student.trunk, sd.path(STUDENT))
    last = result.summary
    summary = {
        "loss": last["loss"],
        "train_acc": last["train_acc"],
        "images_per_s": last["images_per_s"],
        "num_classes": float(k),
        "nonempty_clusters": float(used),
        "chance": 1.0 / used,
        "epochs": float(last["epoch"]),
        "resumed_from_epoch": float(result.starts[-1]),
    }
    if "val_acc" in last:
        summary.update({"holdout_acc": last["val_acc"], "holdout_loss": last["val_loss"]})
    history = [{"step": int(h["epoch"]), **{k_: v for k_, v in h.items() if k_ != "epoch"}} for h in result.history]
    write_manifest(
        sd,
        config=stage_config(cfg),
        inputs=_inputs(cfg, labels),
        files=[STUDENT],
        metrics={"summary": summary, "history": history},
        started=started,
    )
    print(f"transfer: done; held-out pseudo-label accuracy {summary.get('holdout_acc', math.nan):.3f} "
          f"(chance {summary['chance']:.4f})", flush=True)
    return sd
