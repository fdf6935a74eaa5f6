"""Similarity distillation (CompRess, Koohpayegani et al. 2020): the student matches a frozen teacher's similarities.

The other way to transfer (``transfer.method: distill``): instead of cluster ids, the student
gets the teacher's cached embeddings (an embed stage) and learns, over a queue of them, the
teacher's similarity distribution (``ktray.models.similarity``). The model and the loss are
ISD's; only the teacher differs (frozen, its features read from the run directory).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor

from ktray import schema
from ktray.artifacts import STUDENT, feature_files
from ktray.data.decode import decode_batch
from ktray.data.shards import read_split
from ktray.lifecycle import Output
from ktray.models.similarity import build_distill, nearest_agreement, similarity_kl
from ktray.models.trunks import save_weights, standardise
from ktray.rundir import StageDir, filesystem
from ktray.schema import features_to_numpy
from ktray.training import TrainTask, fit, sgd_schedule

if TYPE_CHECKING:
    import ray.data

    from ktray.config import Config


LEARNS_FROM = "embed"  # the upstream stage this student learns from (the pipeline wires it)


def transfer_params(cfg: Config) -> dict[str, Any]:
    """The ``transfer`` section as the student's folder hash sees it: all of it."""
    return cfg.transfer.to_dict()


def check(cfg: Config, features: StageDir) -> None:
    """The features boundary: the embed stage wrote at least one features file."""
    feature_files(features)


def compute(cfg: Config, sd: StageDir, features: StageDir) -> Output:
    """Train the student to match a frozen teacher's similarities over a queue of its embeddings."""
    t = cfg.transfer
    ids, feats = read_teacher_features(features)
    dim = feats.shape[1]
    print(f"transfer: {t.arch} x{t.width:g} student distilled from {features.name} ({len(ids)} images, {dim} dims, "
          f"queue {t.distill_queue}, T_t {t.distill_t_teacher}, T_s {t.distill_t_student}) -> {sd.uri}", flush=True)
    build = partial(build_distill, t.arch, t.width, dim, hidden=t.distill_hidden, queue_size=t.distill_queue,
                    t_teacher=t.distill_t_teacher, t_student=t.distill_t_student)
    task = TrainTask(
        build_model=build,
        batch_fn=distill_batch,
        loss_fn=similarity_kl,
        acc_fn=nearest_agreement,
        forward_targets=True,  # the teacher's embeddings feed the forward
        broadcast_buffers=False,
        **sgd_schedule(t),
        seed=cfg.seed,
        unit="images",
        extra={"teacher_dim": dim},
    )
    result = fit(task, build_datasets(cfg, ids, feats), cfg.compute, sd)
    net = build()
    net.load_state_dict(result.state_dict)
    save_weights(net.trunk, sd.path(STUDENT))
    summary = {
        **result.headline("loss", "images_per_s"),
        "agreement": result.summary["train_acc"],  # same nearest anchor for student and teacher
        "teacher_dim": float(dim),
    }
    print(f"transfer: done; distillation loss {summary['loss']:.4f}, nearest-anchor agreement "
          f"{summary['agreement']:.3f}", flush=True)
    return Output([STUDENT], summary, result.history_rows())


def read_teacher_features(features: StageDir) -> tuple[pa.Array, np.ndarray]:
    """An embed stage's image ids ``(N,)`` and L2-normalised features ``(N, D)`` float32 (the teacher's embeddings)."""
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
    pos = pc.index_in(batch["image_id"], value_set=ids)  # (B,) row in feats, null if none
    keep = pos.is_valid()
    out = batch.filter(keep)
    rows = pos.filter(keep).to_numpy(zero_copy_only=False).astype(np.int64)
    teacher = pa.FixedSizeListArray.from_arrays(pa.array(feats[rows].reshape(-1), pa.float32()), feats.shape[1])
    return out.append_column("teacher", teacher)


def decode_teacher(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Decode + augment (random resized crop + flip) after the join: ``pixels`` and the matching ``teacher`` rows."""

    rows = {"image_id": batch["image_id"], "image": batch["image"]}
    out = decode_batch(rows, size, "random", stage="transfer")  # type: ignore[arg-type]
    where = {str(i): n for n, i in enumerate(batch["image_id"])}
    teacher = np.stack(list(batch["teacher"]))  # (B, D)
    picked = teacher[[where[str(i)] for i in out["image_id"]]] if len(out["image_id"]) else teacher[:0]
    return {"pixels": out["pixels"], "teacher": picked.astype(np.float32)}


def build_datasets(cfg: Config, ids: pa.Array, feats: np.ndarray) -> dict[str, ray.data.Dataset]:
    """``train``: the train split joined with the teacher's embeddings, shuffled, augmented anew every epoch."""

    train = (
        read_split(cfg.data, cfg.data.train_split)
        .map_batches(join_teacher, batch_size=None, batch_format="pyarrow", fn_kwargs={"ids": ids, "feats": feats})
        .random_shuffle()
        .map_batches(decode_teacher, fn_kwargs={"size": cfg.transfer.image_size},
                     batch_size=cfg.data.decode_batch_size, batch_format="numpy")
    )
    train.context.enable_progress_bars = False
    return {"train": train}


def distill_batch(batch: dict[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """``pixels`` (B, S, S, 3) uint8 -> standardised images; ``teacher`` (B, D) float32 -> the targets."""
    x = standardise(batch["pixels"].to(device, non_blocking=True))
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, batch["teacher"].to(device, non_blocking=True).float()
